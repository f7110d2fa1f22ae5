"""A small ordinal-grade synthetic patch dataset: colorectal-like BN / WD / MD / PD tiles.

The data-scarce, four-class setting USegMix targets (Wang & Kwak, §3.1: benign, well-, moderately- and
poorly-differentiated colorectal tumour). The classes differ in **structure**, not colour:

- **BN** — a few regular round glands, each with an open lumen and a single layer of evenly spaced small
  nuclei along its basement membrane, in fibrous stroma;
- **WD** — more, smaller, slightly irregular glands; the nuclear layer thicker (stratified) and less even;
- **MD** — irregular glands that fuse into complexes, many with several small "cribriform" lumens instead of
  one; crowded, larger nuclei;
- **PD** — no glands: solid sheets of crowded, larger, pleomorphic nuclei and single tumour cells in stroma.

Every tile draws a continuous **disorder** ``d = clip((grade + N(0, DISORDER_SPREAD)) / 3, 0, 1)`` and
everything structural (gland count, size, outline irregularity, epithelial thickness, lumen count, share of
solid sheets, nuclear size, spacing and pleomorphism) is a smooth function of ``d``. Neighbouring grades
therefore overlap and are harder to tell apart than distant ones: the dataset is ordinal, as the quadratic
kappa of the paper's Table 1 assumes.

Colour is shared by all grades (the house's H&E palette of ``synthetic.py``) and every tile gets its own
stain variation — independent hematoxylin and eosin intensities in HED space (Ruifrok & Johnston's colour
deconvolution, as in HED-jitter stain augmentation), brightness and a small tint — plus a random share of
stroma, so a tile's mean colour says little about its grade.

Deterministic from a seed: tile ``i`` of grade ``g`` in split ``s`` uses ``default_rng([seed, s, g, i])``,
so adding tiles never changes the existing ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed

from histoweak.data.synthetic import LYMPH, STROMA, TUMOR, _HE_BASE, _HE_NUC, _blob, _smooth_noise

__all__ = ["DISORDER_SPREAD", "GRADES", "SPLITS", "grade_disorder", "render_grade_tile", "write_grade_dataset"]

GRADES = ("BN", "WD", "MD", "PD")
SPLITS = ("train", "val", "test")
#: std of a tile's disorder around its grade, in grade units: neighbours overlap, distant grades barely
DISORDER_SPREAD = 0.3

_LUMEN = np.array([244, 236, 242], np.float32)  # pale, faintly eosinophilic secretion


def _lerp(a: float, b: float, d: float) -> float:
    return a + (b - a) * d


def _smoothstep(lo: float, hi: float, d: float) -> float:
    t = min(max((d - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3 - 2 * t)


def grade_disorder(grade: int, rng: np.random.Generator) -> float:
    """A tile's disorder in [0, 1]: ``(grade + N(0, DISORDER_SPREAD)) / 3``, clipped (BN ~ 0, PD ~ 1)."""
    return float(np.clip((grade + rng.normal(0.0, DISORDER_SPREAD)) / 3.0, 0.0, 1.0))


def _centres(rng: np.random.Generator, n: int, count: int, min_dist: float, margin: float) -> list[tuple[float, float]]:
    """Up to ``count`` dart-thrown points in [-margin, n + margin)² at least ``min_dist`` apart."""
    pts: list[tuple[float, float]] = []
    for _ in range(count * 30):
        if len(pts) == count:
            break
        p = rng.uniform(-margin, n + margin, 2)
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist ** 2 for q in pts):
            pts.append((float(p[0]), float(p[1])))
    return pts


def _layout(d: float, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where epithelium and lumens lie in a tile of disorder ``d``.

    Returns
    -------
    epi, lumen : (n, n) bool, disjoint
    basal : (n, n) bool
        Epithelium of glands (not of solid sheets): where nuclei line up along the basement membrane.
    """
    s = n / 128.0
    solid = _smoothstep(0.62, 0.95, d)  # share of the tumour that grows as solid sheets (PD)
    n_glands = int(round(_lerp(4.5, 7.5, min(d / 0.7, 1.0)) * (1.0 - solid) * rng.uniform(0.75, 1.25)))
    radius = s * _lerp(24.0, 16.0, min(d / 0.7, 1.0))
    # Benign glands keep apart; higher grades crowd until neighbours fuse (MD).
    spacing = radius * _lerp(2.1, 1.25, _smoothstep(0.2, 0.7, d))
    irregular = _lerp(0.03, 0.32, min(d / 0.75, 1.0))
    thickness = _lerp(0.38, 0.6, min(d / 0.7, 1.0))  # epithelial band / gland radius
    cribriform = _smoothstep(0.4, 0.7, d)
    wobble = _smooth_noise(rng, (n, n), 4.0 * s)
    wobble_in = _smooth_noise(rng, (n, n), 3.0 * s)
    epi = np.zeros((n, n), bool)
    lumen = np.zeros((n, n), bool)
    for cy, cx in _centres(rng, n, n_glands, spacing, margin=0.4 * radius):
        r = radius * rng.uniform(0.8, 1.2)
        aspect = rng.uniform(1.0, _lerp(1.25, 1.8, d))
        rho = _blob((n, n), cy, cx, r, r * aspect, rng.uniform(0, np.pi)) + irregular * wobble
        gland = rho < 1.0
        if rng.random() < cribriform:  # several small punched-out lumens instead of one
            holes = np.zeros((n, n), bool)
            for _ in range(rng.integers(2, 6)):
                a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.45) * r
                hr = r * rng.uniform(0.13, 0.22)
                holes |= _blob((n, n), cy + rr * np.sin(a), cx + rr * aspect * np.cos(a), hr, hr, 0.0) < 1.0
            hole = holes & gland & (rho < 0.8)
        else:
            hole = (rho + 0.5 * irregular * wobble_in) < (1.0 - thickness)
        epi |= gland
        lumen |= hole
    basal = epi.copy()
    if solid > 0:
        share = solid * rng.uniform(0.45, 0.8)
        field = _smooth_noise(rng, (n, n), 12.0 * s)
        sheets = field > np.quantile(field, 1.0 - share)
        epi |= sheets
        lumen &= ~sheets
        basal &= ~sheets
    return epi & ~lumen, lumen, basal & ~lumen


def _place_nuclei(rng: np.random.Generator, allowed: np.ndarray, min_dist: float, max_tries: int) -> np.ndarray:
    """(K, 2) dart-thrown points on ``allowed`` pixels, at least ``min_dist`` apart (greedy: near-even spacing)."""
    cand = np.argwhere(allowed)
    if len(cand) == 0:
        return np.zeros((0, 2), np.float32)
    # About eight darts per nucleus that fits already pack the region nearly full.
    tries = min(max_tries, int(8 * len(cand) / min_dist ** 2) + 1)
    cand = cand[rng.permutation(len(cand))[:tries]].tolist()
    r = int(np.ceil(min_dist))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = yy * yy + xx * xx < min_dist * min_dist
    n0, n1 = allowed.shape
    blocked = np.zeros((n0 + 2 * r, n1 + 2 * r), bool)  # padded so a disc never needs clipping
    out = []
    for y, x in cand:
        if blocked[y + r, x + r]:
            continue
        out.append((y, x))
        blocked[y:y + 2 * r + 1, x:x + 2 * r + 1] |= disc
    return np.asarray(out, np.float32).reshape(-1, 2) + rng.uniform(-0.5, 0.5, (len(out), 2)).astype(np.float32)


def _stamp(alpha: np.ndarray, centres: np.ndarray, radii: np.ndarray, aspect: np.ndarray, angle: np.ndarray,
           vesicular: float = 0.0) -> None:
    """Draw soft-edged elliptical nuclei into ``alpha`` (max-composited, in place).

    ``vesicular`` in [0, 1) pales a nucleus's centre against its rim (open chromatin of high-grade nuclei).
    """
    if len(centres) == 0:
        return
    n0, n1 = alpha.shape
    h = int(np.ceil((radii * aspect).max())) + 2
    off = np.arange(-h, h + 1)
    # Every nucleus drawn at once in its own (2h+1)² window, then max-composited into the image.
    iy = np.floor(centres[:, 0]).astype(np.int64)[:, None, None] + off[None, :, None]
    ix = np.floor(centres[:, 1]).astype(np.int64)[:, None, None] + off[None, None, :]
    dy, dx = iy - centres[:, 0, None, None], ix - centres[:, 1, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    r, a = radii[:, None, None], aspect[:, None, None]
    q = np.sqrt(((c * dx + s * dy) / (r * a)) ** 2 + ((-s * dx + c * dy) / r) ** 2)
    v = np.clip((1.0 - q) * r * 1.2, 0.0, 1.0) * (1.0 - vesicular * np.clip(1.0 - q * 1.6, 0.0, 1.0))
    iy, ix = np.broadcast_arrays(iy, ix)
    inside = (iy >= 0) & (iy < n0) & (ix >= 0) & (ix < n1) & (v > 0)
    np.maximum.at(alpha.reshape(-1), iy[inside] * n1 + ix[inside], v[inside].astype(alpha.dtype))


def _stain_variation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tile's own staining: H and E intensities scaled and shifted independently in HED space (as HED-jitter
    stain augmentation, Tellez et al. 2018), then a global brightness and a per-channel offset."""
    hed = rgb2hed(np.clip(img, 0, 255) / 255.0)
    scale = np.array([rng.uniform(0.75, 1.35), rng.uniform(0.7, 1.35), 1.0])
    bias = np.array([rng.normal(0, 0.006), rng.normal(0, 0.006), 0.0])
    out = hed2rgb(hed * scale + bias) * 255.0
    return out * rng.uniform(0.95, 1.02) + rng.normal(0, 3.0, 3)


def render_grade_tile(grade: int, rng: np.random.Generator, size: int = 128,
                      disorder: float | None = None) -> np.ndarray:
    """Render one H&E-like tile of a colorectal grade.

    Parameters
    ----------
    grade : index into ``GRADES`` (0 = BN, 1 = WD, 2 = MD, 3 = PD).
    rng : the tile's random generator (its whole content follows from it).
    size : side in pixels (>= 32); structures scale with it (128 px is the reference).
    disorder : pin the tile's disorder in [0, 1] instead of drawing it around ``grade / 3`` (figures of
        the continuum); ``grade`` is then only validated.

    Returns
    -------
    (size, size, 3) uint8 RGB
    """
    if grade not in range(len(GRADES)):
        raise ValueError(f"grade {grade!r}: must be an index into GRADES {GRADES} (0..{len(GRADES) - 1})")
    if size < 32:
        raise ValueError(f"size {size!r}: must be >= 32 pixels")
    if disorder is not None and not 0.0 <= disorder <= 1.0:
        raise ValueError(f"disorder {disorder!r}: must be in [0, 1]")
    d = grade_disorder(grade, rng) if disorder is None else float(disorder)
    n, s = size, size / 128.0
    epi, lumen, basal = _layout(d, rng, n)

    # Matrix: fibrous stroma, epithelial cytoplasm, pale lumens; house colours, shared by all grades.
    streak = ndi.gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), (0.8 * s, 4.0 * s), mode="wrap")
    streak = ndi.rotate(streak, rng.uniform(0, 180), reshape=False, mode="grid-wrap", order=1)
    streak *= 14.0 / (streak.std() + 1e-6)
    img = np.empty((n, n, 3), np.float32)
    img[:] = _HE_BASE[STROMA]
    img += streak[..., None] * np.array([0.3, 0.8, 0.6], np.float32)
    img[epi] = _HE_BASE[TUMOR] + 6.0 * _smooth_noise(rng, (n, n), 2.0 * s)[epi, None]
    img[lumen] = _LUMEN + 4.0 * _smooth_noise(rng, (n, n), 3.0 * s)[lumen, None]
    # Goblet cells (mucin vacuoles) of benign crypts thin out with disorder.
    goblet = _place_nuclei(rng, basal & (ndi.distance_transform_edt(~lumen) < 3.5 * s),
                           min_dist=5.0 * s, max_tries=int(60 * (1 - min(d / 0.6, 1.0)) * s * s))
    gob = np.zeros((n, n), np.float32)
    _stamp(gob, goblet, np.full(len(goblet), 1.6 * s), np.full(len(goblet), 1.3), rng.uniform(0, np.pi, len(goblet)))
    img = img * (1 - 0.8 * gob[..., None]) + _LUMEN * 0.8 * gob[..., None]

    # Epithelial nuclei: one even layer along the basement membrane at low disorder, stratified, crowded,
    # enlarged and pleomorphic as disorder grows; solid sheets are packed throughout.
    r_nuc = s * _lerp(1.8, 2.8, d)
    depth = ndi.distance_transform_edt(np.pad(epi, 1, constant_values=False))[1:-1, 1:-1]
    layer = r_nuc * _lerp(1.3, 5.0, min(d / 0.7, 1.0))  # how deep into the epithelium nuclei sit
    allowed = (basal & (depth >= 0.8 * r_nuc) & (depth <= 0.8 * r_nuc + layer)) | (epi & ~basal)
    centres = _place_nuclei(rng, allowed, min_dist=r_nuc * _lerp(3.0, 2.1, d), max_tries=4000)
    k = len(centres)
    pleo = _lerp(0.06, 0.28, d)
    nuc = np.zeros((n, n), np.float32)
    _stamp(nuc, centres, r_nuc * np.exp(rng.normal(0, pleo, k)), rng.uniform(1.0, _lerp(1.5, 1.3, d), k),
           rng.uniform(0, np.pi, k), vesicular=_lerp(0.0, 0.2, d))
    # Single infiltrating tumour cells in stroma (PD), spindle fibroblasts and a few lymphocytes (all grades).
    stroma = ~epi & ~lumen
    single = _place_nuclei(rng, stroma & (rng.random((n, n)) < 0.3), min_dist=3.0 * r_nuc,
                           max_tries=int(150 * _smoothstep(0.65, 1.0, d) * s * s))
    _stamp(nuc, single, r_nuc * np.exp(rng.normal(0, pleo, len(single))), np.full(len(single), 1.15),
           rng.uniform(0, np.pi, len(single)), vesicular=_lerp(0.0, 0.2, d))
    fib = _place_nuclei(rng, stroma, min_dist=9.0 * s, max_tries=int(40 * s * s))
    fibro = np.zeros((n, n), np.float32)
    _stamp(fibro, fib, np.full(len(fib), 1.1 * s), rng.uniform(2.2, 3.2, len(fib)), rng.uniform(0, np.pi, len(fib)))
    lym = _place_nuclei(rng, stroma, min_dist=4.0 * s, max_tries=int(rng.integers(0, 25) * s * s))
    _stamp(fibro, lym, np.full(len(lym), 1.5 * s), np.ones(len(lym)), np.zeros(len(lym)))

    chromatin = 1.0 + 0.12 * rng.standard_normal((n, n), dtype=np.float32)
    a = np.clip(nuc * 0.95 * chromatin, 0, 1)[..., None]
    img = img * (1 - a) + _HE_NUC[TUMOR] * a
    a = np.clip(fibro * 0.9, 0, 1)[..., None]
    img = img * (1 - a) + 0.5 * (_HE_NUC[STROMA] + _HE_NUC[LYMPH]) * a
    img = ndi.gaussian_filter(img, (0.5 * s, 0.5 * s, 0))  # optics: no pixel-sharp edges
    img = _stain_variation(img, rng)
    img += rng.standard_normal((n, n, 3), dtype=np.float32) * 4.0
    return np.clip(img, 0, 255).astype(np.uint8)


def write_grade_dataset(out_dir: str | Path, n_train: int = 24, n_val: int = 24, n_test: int = 60, size: int = 128,
                        seed: int = 0) -> Path:
    """Write a class-per-folder PNG dataset ``out_dir/{train,val,test}/{BN,WD,MD,PD}/<name>.png``.

    ``n_*`` tiles per class and split, named ``<grade>_<split>_<index>.png``; the layout ``histoweak import
    folder`` reads. Tile ``i`` of grade ``g`` in split ``s`` uses ``np.random.default_rng([seed, s, g, i])``.

    Returns
    -------
    Path to ``out_dir``.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, k in counts.items():
        if k < 0:
            raise ValueError(f"n_{split} {k!r}: must be >= 0")
    out = Path(out_dir)
    for si, split in enumerate(SPLITS):
        for g, name in enumerate(GRADES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                tile = render_grade_tile(g, np.random.default_rng([seed, si, g, i]), size=size)
                Image.fromarray(tile).save(folder / f"{name}_{split}_{i:04d}.png")
    return out
