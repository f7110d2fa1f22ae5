"""USegMix phase 2: segment replacement (Park et al., MICCAI 2024, §2.2 and §3.2).

A target image of class c has segments α^t (phase 1's anchors). One at a time, a random target segment is
replaced by a segment α^r of the class-c pool drawn with eq. 1,

    p(α_j | α^t) ∝ exp(−w_j · ‖f^t − f_j‖₂),   w_j = 1 + (times α_j was used),

pasted into α^t's region by the affine map of α^r's bounding box onto α^t's, until the new-area ratio
(replaced + inpainted pixels over the image) reaches the §3.2 range, 30–100 %. The seams are then inpainted
once (``histoweak.methods.usegmix.inpaint``).

- ``ReplacementSampler``: eq. 1 and its use counts (picklable, so a Ray actor can hold it);
- ``paste``: one replacement, pure; returns where the replacement landed and the region to inpaint;
- ``new_area_ratio``: §3.2's ratio;
- ``synthesize``: the loop for one target image, with what a figure needs (the image before inpainting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.transform import AffineTransform, warp

__all__ = ["ReplacementSampler", "SegmentSource", "Synthesis", "new_area_ratio", "paste", "synthesize"]


class ReplacementSampler:
    """Eq. 1: draw a replacement for a target segment from the pool of its class, penalising reuse.

    Parameters
    ----------
    features_by_class : class c -> (N_c, p) float features f_j of the class-c pool segments (phase 1's PCA
        features), indexed by pool index j.
    seed : seed of the sampler's random generator.

    Notes
    -----
    The weight w_j of every pool segment starts at 1 and grows by one each time α_j is used as a replacement
    (``draw`` with ``commit=True``, or ``use``), so a segment already used is less likely to be drawn again for
    targets at the same distance: the paper's balancing of the selection. The state (features, weights,
    generator) is plain numpy and pickles.
    """

    def __init__(self, features_by_class: Mapping[int, np.ndarray], seed: int | None = 0):
        self._features: dict[int, np.ndarray] = {}
        for c, f in features_by_class.items():
            f = np.asarray(f, np.float64)
            if f.ndim != 2 or len(f) == 0:
                raise ValueError(f"replacement sampler: class {c} features must be a non-empty (N_c, p) array, "
                                 f"got shape {f.shape}")
            self._features[int(c)] = f
        self._weights = {c: np.ones(len(f)) for c, f in self._features.items()}
        self._rng = np.random.default_rng(seed)

    @property
    def classes(self) -> list[int]:
        return sorted(self._features)

    def _pool(self, c: int) -> np.ndarray:
        try:
            return self._features[int(c)]
        except KeyError:
            raise ValueError(f"replacement sampler: no pool segments of class {c}; classes: {self.classes}") from None

    def weights(self, c: int) -> np.ndarray:
        """(N_c,) the current weights w_j of class ``c`` (a copy)."""
        self._pool(c)
        return self._weights[int(c)].copy()

    def probabilities(self, c: int, f_t: np.ndarray, exclude: set[int] | None = None) -> np.ndarray:
        """(N_c,) p(α_j | α^t) of eq. 1 for the target feature ``f_t`` (p,); excluded indices get 0.

        Computed stably: the exponents −w_j·D_j are shifted by their maximum before ``exp`` (the shift cancels in
        the normalisation), so large distances never underflow every term to 0.
        """
        pool = self._pool(c)
        f_t = np.asarray(f_t, np.float64).reshape(-1)
        if f_t.shape[0] != pool.shape[1]:
            raise ValueError(f"replacement sampler: target feature has {f_t.shape[0]} dimensions, the class-{c} "
                             f"pool's have {pool.shape[1]}")
        z = -self._weights[int(c)] * np.linalg.norm(pool - f_t, axis=1)
        allowed = np.ones(len(pool), bool)
        if exclude:
            bad = [j for j in exclude if not 0 <= j < len(pool)]
            if bad:
                raise ValueError(f"replacement sampler: excluded indices {sorted(bad)} outside 0..{len(pool) - 1}")
            allowed[list(exclude)] = False
        if not allowed.any():
            raise ValueError(f"replacement sampler: every one of the {len(pool)} class-{c} segments is excluded")
        z = np.where(allowed, z, -np.inf)
        p = np.exp(z - z[allowed].max())
        return p / p.sum()

    def use(self, c: int, j: int) -> None:
        """Record that pool segment ``j`` of class ``c`` was used as a replacement: w_j += 1."""
        n = len(self._pool(c))
        if not 0 <= j < n:
            raise ValueError(f"replacement sampler: pool index {j} outside 0..{n - 1} (class {c})")
        self._weights[int(c)][j] += 1.0

    def draw(self, c: int, f_t: np.ndarray, exclude: set[int] | None = None, commit: bool = True) -> int:
        """Draw a pool index j ~ p(· | α^t) (eq. 1); with ``commit``, record the use (w_j += 1).

        ``commit=False`` leaves the weights alone, for a caller that may still reject the draw (``synthesize``
        skips a replacement that would push the new-area ratio over its range) and then calls ``use``.
        """
        p = self.probabilities(c, f_t, exclude)
        j = int(self._rng.choice(len(p), p=p))
        if commit:
            self.use(c, j)
        return j


def _bbox(mask: np.ndarray, what: str) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1), end-exclusive, of the True pixels of ``mask``."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError(f"paste: the {what} mask is empty")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def paste(image: np.ndarray, target_mask: np.ndarray, repl_image: np.ndarray, repl_mask: np.ndarray,
          band: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eliminate α^t from ``image`` and paste α^r into its region (the affine step of §2.2).

    The affine map is a scale and a translation that takes the bounding box of α^r (``repl_mask`` inside its
    crop) onto the bounding box of α^t, box edge onto box edge: output pixel centre (y + ½) maps to
    r0 + (y + ½ − t0) · h_r / h_t in the crop, likewise for x. The crop's pixels are resampled bilinearly
    (``order=1``) from α^r's pixels only, its mask by nearest neighbour (``order=0``).

    Parameters
    ----------
    image : (H, W, 3) uint8 target image.
    target_mask : (H, W) bool, the target segment α^t.
    repl_image : (h, w, 3) uint8 crop around the replacement α^r (e.g. its bounding box in its source tile).
    repl_mask : (h, w) bool, α^r inside that crop.
    band : half-width in pixels of the band around the pasted segment's boundary that is inpainted too
        (0: none): the boundary of a pasted segment is where the two tissues meet, the artifact §2.2
        inpaints away.

    Returns
    -------
    new_image : (H, W, 3) uint8. Pasted pixels hold the replacement; the rest of α^t (eliminated, not
        covered by α^r) is set to white, no tissue, so a figure before inpainting shows the hole; every
        other pixel is ``image``'s.
    pasted : (H, W) bool, where replacement pixels landed (may extend beyond α^t inside its bounding box).
    seam : (H, W) bool, the region to inpaint: α^t minus ``pasted``, plus the pixels within ``band`` of the
        pasted boundary on either side (so it overlaps ``pasted`` along its rim). The changed area of this
        replacement is ``pasted | seam``.
    """
    image, target_mask, repl_mask = np.asarray(image), np.asarray(target_mask, bool), np.asarray(repl_mask, bool)
    repl_image = np.asarray(repl_image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"paste: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if target_mask.shape != image.shape[:2]:
        raise ValueError(f"paste: target mask {target_mask.shape} does not match the image {image.shape[:2]}")
    if repl_image.shape[:2] != repl_mask.shape or repl_image.ndim != 3 or repl_image.shape[2] != 3:
        raise ValueError(f"paste: replacement crop {repl_image.shape} and mask {repl_mask.shape} must be "
                         "(h, w, 3) and (h, w)")
    if band < 0:
        raise ValueError(f"paste: band must be >= 0 pixels, got {band}")
    t0, t1, u0, u1 = _bbox(target_mask, "target")
    r0, r1, c0, c1 = _bbox(repl_mask, "replacement")
    sy, sx = (r1 - r0) / (t1 - t0), (c1 - c0) / (u1 - u0)  # crop pixels per target pixel
    # warp's inverse map, in (x, y) = (col, row): output pixel -> crop coordinate
    inverse = AffineTransform(matrix=np.array([[sx, 0.0, c0 + (0.5 - u0) * sx - 0.5],
                                               [0.0, sy, r0 + (0.5 - t0) * sy - 0.5],
                                               [0.0, 0.0, 1.0]]))
    shape = image.shape[:2]
    # crop pixels outside α^r take the colour of their nearest α^r pixel: bilinear sampling at the pasted rim then
    # mixes only α^r's colours, never those of its own surroundings in its source tile
    _, (iy, ix) = ndi.distance_transform_edt(~repl_mask, return_indices=True)
    moved = warp(repl_image[iy, ix].astype(np.float64), inverse, output_shape=shape, order=1, mode="edge",
                 preserve_range=True)
    pasted = warp(repl_mask.astype(np.float64), inverse, output_shape=shape, order=0, mode="constant",
                  cval=0.0) > 0.5
    out = image.copy()
    out[target_mask & ~pasted] = 255
    out[pasted] = np.clip(np.rint(moved[pasted]), 0, 255).astype(np.uint8)
    seam = target_mask & ~pasted
    if band and pasted.any():
        disk = _disk(band)
        seam |= ndi.binary_dilation(pasted, disk) & ~ndi.binary_erosion(pasted, disk, border_value=1)
    return out, pasted, seam


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def new_area_ratio(changed: np.ndarray) -> float:
    """§3.2's new-area ratio: replaced and inpainted pixels over all pixels of the image.

    Parameters
    ----------
    changed : (H, W) bool, the union of the pasted and inpainted regions.
    """
    changed = np.asarray(changed, bool)
    if changed.ndim != 2 or changed.size == 0:
        raise ValueError(f"new-area ratio: changed must be a non-empty (H, W) mask, got shape {changed.shape}")
    return float(changed.mean())


class SegmentSource(Protocol):
    """The class-c pool as ``synthesize`` reads it (phase 1's Parquet pool, or anything with these methods)."""

    def n(self, c: int) -> int:
        """Number of pool segments of class c."""

    def features(self, c: int) -> np.ndarray:
        """(N_c, p) features of the class-c segments, by pool index."""

    def crop(self, c: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """((h, w, 3) uint8 image crop, (h, w) bool mask) of pool segment j of class c."""


@dataclass
class Synthesis:
    """One synthetic image and how it was made.

    image : (H, W, 3) uint8, after inpainting.
    changed : (H, W) bool, pasted or inpainted pixels.
    replaced : (target segment index, pool index) per replacement, in order.
    ratio : new-area ratio of ``changed`` (§3.2).
    before : (H, W, 3) uint8, the image after pasting, before inpainting (eliminated pixels white).
    seam : (H, W) bool, the region that was inpainted.
    ok : whether ``ratio`` reached the requested range (False: the segments ran out below it).
    """

    image: np.ndarray
    changed: np.ndarray
    replaced: list[tuple[int, int]]
    ratio: float
    before: np.ndarray
    seam: np.ndarray
    ok: bool = True
    skipped: list[int] = field(default_factory=list)  # target segments whose replacement overshot the range


def synthesize(image: np.ndarray, segments: Sequence[np.ndarray], segment_features: np.ndarray, label: int,
               pool: SegmentSource, sampler: ReplacementSampler, inpainter, rng: np.random.Generator,
               ratio: tuple[float, float] = (0.3, 1.0), max_steps: int | None = None, band: int = 2,
               own: set[int] | frozenset[int] = frozenset()) -> Synthesis:
    """Replace random segments of one target image of class ``label`` until the new-area ratio is in ``ratio``,
    then inpaint the seams once.

    Each step takes a random target segment not yet tried, draws its replacement from the class pool with eq. 1
    (``sampler``; a pool segment is not reused within one image while others are left), pastes it (``paste``)
    and adds its pasted and seam pixels to the changed area. It stops as soon as the ratio reaches ``ratio[0]``;
    a replacement that would take the ratio above ``ratio[1]`` is undone and its target skipped (its draw does
    not count as a use). When the segments (or ``max_steps``) run out below ``ratio[0]``, the result has
    ``ok=False`` and the caller decides (e.g. another target image).

    Parameters
    ----------
    image : (H, W, 3) uint8 target image.
    segments : n (H, W) bool masks, the target image's segments (its anchors from phase 1).
    segment_features : (n, p) their features, in the pool's feature space.
    label : the image's class c; replacements come from the class-c pool.
    pool : the segment pool (``SegmentSource``).
    sampler : eq. 1 over the same pool (its weights carry over between images).
    inpainter : an ``Inpainter``; its seed comes from ``rng``.
    rng : numpy generator for the order of the targets and the inpainting seed.
    ratio : (low, high), 0 <= low <= high <= 1 (§3.2: 30 %–100 %).
    max_steps : at most this many replacements tried (None: every segment may be tried).
    band : seam half-width around each pasted segment, in pixels (``paste``).
    own : class-pool indices of the target image's own segments, never drawn: at distance 0 from their target,
        eq. 1 would give them the largest probability whatever their weight (exp(−w·0) = 1), and a segment pasted
        onto itself changes nothing but its seam.
    """
    lo, hi = ratio
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"synthesize: ratio must be (low, high) with 0 <= low <= high <= 1, got {ratio}")
    image = np.asarray(image)
    feats = np.asarray(segment_features, np.float64)
    if feats.ndim != 2 or len(feats) != len(segments):
        raise ValueError(f"synthesize: {len(segments)} segments but segment features of shape {feats.shape}")
    n_pool = pool.n(label)
    own = {int(j) for j in own}
    if n_pool - len(own) < 1:
        raise ValueError(f"synthesize: the pool has no segments of class {label} from other images")
    current = image.copy()
    pasted_all = np.zeros(image.shape[:2], bool)
    seam_all = np.zeros(image.shape[:2], bool)
    replaced: list[tuple[int, int]] = []
    skipped: list[int] = []
    used: set[int] = set()
    r = 0.0
    for steps, i in enumerate(rng.permutation(len(segments))):
        if r >= lo or (max_steps is not None and steps >= max_steps):
            break
        target = np.asarray(segments[i], bool)
        if not target.any():
            continue
        exclude = own | used if len(own | used) < n_pool else own
        j = sampler.draw(label, feats[i], exclude=exclude, commit=False)
        crop, crop_mask = pool.crop(label, j)
        new, pasted, seam = paste(current, target, crop, crop_mask, band=band)
        # a later paste covers earlier seam pixels with tissue: they are pasted now, not inpainted
        seam_next = (seam_all & ~pasted) | seam
        pasted_next = pasted_all | pasted
        r_next = new_area_ratio(pasted_next | seam_next)
        if r_next > hi:
            skipped.append(int(i))
            continue
        sampler.use(label, j)
        used.add(j)
        current, pasted_all, seam_all, r = new, pasted_next, seam_next, r_next
        replaced.append((int(i), int(j)))
    final = inpainter.inpaint(current, seam_all, seed=int(rng.integers(2**31))) if seam_all.any() else current.copy()
    return Synthesis(image=final, changed=pasted_all | seam_all, replaced=replaced, ratio=r, before=current,
                     seam=seam_all, ok=r >= lo, skipped=skipped)
