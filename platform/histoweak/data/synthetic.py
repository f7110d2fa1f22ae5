"""Synthetic H&E-like slides with pixel ground truth, written as real pyramidal TIFFs.

The embedded default dataset. Deterministic from a seed; every property a
method's claim depends on is a documented knob of ``SynthPreset``:

- ``shortcut`` (0–1): how strongly tissue amount predicts tumour. Tumours
  grow only where the main tissue is at least ``shortcut * max_depth / 2``
  deep, and of the ``fragments`` small tissue islands scattered around only
  a share ``(1 - shortcut) / 2`` are tumour, so at high values tiles with
  little tissue are rarely tumour, as GERNE's paper observes on real slides;
  at 0 tumour reaches the edges and half the islands are tumour.
- ``class_mix``: relative areas of stroma, lymphocytes and necrosis.
- ``tumor_count``, ``tumor_radius``: tumour geometry (smooth, convex-ish blobs).
- ``tumor_prob``: chance that a slide holds tumour at all (slide label).
- ``partial`` (0–1): partial activation, as CAMs see real tissue. Each class
  shows its full look (colour, nucleus density and colour, stromal fibres)
  only in smooth "discriminative cores" (about a third of the tissue);
  elsewhere its look is blended towards the average tissue by ``partial``,
  so at 0.7 only 30 % of the class-specific contrast remains outside cores
  (a weaker but real cue), and at 1 none does.
- ``metastasis``: metastasis size classes, Camelyon-like (the ``camelyon``
  preset). Each entry is (size class, min radius, max radius, clusters), radii
  as fractions of the slide side. The tumour slides take the classes in turn
  (every class appears), and a slide's tumour is its class's clusters only,
  drawn wholly inside the main tissue (``tumor_radius``, ``tumor_count`` and
  tumour islands are not used). Such presets have exactly
  ``round(tumor_prob * n_slides)`` tumour slides (at least 3 of each label
  from 6 slides on) and splits stratified by label and size class, so every
  split holds both labels from 6 slides on.

Slides are tiled TIFFs whose reduced levels are successive pages marked
``subfiletype=1`` (so OpenSlide sees every level), JPEG-compressed, with
µm/px in the resolution tags. Masks are lossless uint8 pyramids of class
indices at the same size.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

__all__ = ["CLASSES", "PRESETS", "SynthPreset", "render_slide", "synthesize", "write_pyramid"]

CLASSES = ("background", "tumor", "stroma", "lymphocytes", "necrosis")
BG, TUMOR, STROMA, LYMPH, NECROSIS = range(5)

# RGB of the class's cytoplasm/matrix and of its nuclei, H&E-like.
_HE_BASE = np.array([[242, 240, 244], [205, 140, 190], [232, 165, 195], [200, 170, 215], [235, 195, 205]], np.float32)
_HE_NUC = np.array([[242, 240, 244], [95, 45, 130], [120, 60, 140], [55, 35, 120], [150, 90, 150]], np.float32)
# Multimodal non-linear imaging on black (GERNE's dataset): false colours per modality.
_MM_BASE = np.array([[6, 6, 8], [150, 60, 170], [40, 160, 90], [60, 90, 170], [150, 140, 40]], np.float32)
_MM_NUC = np.array([[6, 6, 8], [230, 120, 240], [20, 90, 50], [140, 170, 250], [90, 80, 20]], np.float32)
# Nuclei per 1000 px² and blob size (gaussian sigma, px) per class.
_NUC_DENSITY = np.array([0.0, 6.0, 1.5, 16.0, 2.5], np.float32)
_NUC_SIGMA = {TUMOR: 3.0, STROMA: 1.6, LYMPH: 1.6, NECROSIS: 1.0}


@dataclass(frozen=True)
class SynthPreset:
    """Knobs of the synthetic generator (see the module docstring)."""

    name: str = "default"
    size: int = 2048  # level-0 side, pixels
    n_slides: int = 6
    mpp: float = 0.5
    tissue_fraction: float = 0.55  # area of the main tissue mass / slide area
    tissue_pieces: int = 1  # separate tissue masses
    fragments: int = 6  # small tissue islands (see ``shortcut``)
    fragment_radius: tuple[float, float] = (0.012, 0.03)  # fraction of the slide side
    class_mix: tuple[float, float, float] = (0.6, 0.25, 0.15)  # stroma, lymphocytes, necrosis
    tumor_prob: float = 1.0
    tumor_count: tuple[int, int] = (1, 3)
    tumor_radius: tuple[float, float] = (0.08, 0.16)  # fraction of the slide side
    shortcut: float = 0.5
    partial: float = 0.0  # 0-1: how much of each region loses its class's look outside "discriminative cores"
    dark_background: bool = False
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test
    # (size class, min radius, max radius as fractions of the side, clusters); see the module docstring
    metastasis: tuple[tuple[str, float, float, int], ...] = ()

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"synthetic preset {self.name!r}, {key!r}: {why}")

        if self.size < 256:
            bad("size", f"must be >= 256, got {self.size}")
        if self.n_slides < 1:
            bad("n_slides", f"must be >= 1, got {self.n_slides}")
        if not 0 <= self.shortcut <= 1:
            bad("shortcut", f"must be in [0, 1], got {self.shortcut}")
        if not 0 <= self.partial <= 1:
            bad("partial", f"must be in [0, 1], got {self.partial}")
        if not 0 <= self.tumor_prob <= 1:
            bad("tumor_prob", f"must be in [0, 1], got {self.tumor_prob}")
        if not 0 < self.tissue_fraction < 1:
            bad("tissue_fraction", f"must be in (0, 1), got {self.tissue_fraction}")
        if len(self.class_mix) != 3 or min(self.class_mix) < 0 or sum(self.class_mix) <= 0:
            bad("class_mix", "must be three non-negative weights (stroma, lymphocytes, necrosis)")
        if abs(sum(self.splits) - 1) > 1e-6 or len(self.splits) != 3:
            bad("splits", f"must be three fractions summing to 1, got {self.splits}")
        if self.metastasis:
            from histoweak.data.slide_table import SIZE_CLASSES

            names = [m[0] if isinstance(m, (tuple, list)) and m else None for m in self.metastasis]
            if len(set(names)) != len(names):
                bad("metastasis", f"size class names must be unique, got {names}")
            for m in self.metastasis:
                if not isinstance(m, (tuple, list)) or len(m) != 4:
                    bad("metastasis", f"each entry must be (size class, min radius, max radius, clusters), got {m!r}")
                name, lo, hi, count = m
                if name not in SIZE_CLASSES[1:]:
                    bad("metastasis", f"size class {name!r} is not one of {list(SIZE_CLASSES[1:])}")
                if not 0 < lo <= hi < 0.5:
                    bad("metastasis", f"{name!r}: radii must satisfy 0 < min <= max < 0.5, got ({lo}, {hi})")
                if not isinstance(count, (int, np.integer)) or count < 1:
                    bad("metastasis", f"{name!r}: clusters must be an integer >= 1, got {count!r}")


PRESETS: dict[str, SynthPreset] = {
    "default": SynthPreset(),
    "tiny": SynthPreset(name="tiny", size=1024, n_slides=3, fragments=3),
    "weak-shortcut": SynthPreset(name="weak-shortcut", shortcut=0.1, fragments=2),
    "strong-shortcut": SynthPreset(name="strong-shortcut", shortcut=0.9, fragments=12),
    # Slide classification, Camelyon-like: small tissue pieces on white, half the slides with one metastasis
    # of a size class. On a 56x56 overview of the slide (73 level-0 px a pixel) a macro metastasis spans
    # 4-7 overview pixels, a micro one 1-2 and an ITC cluster (25-41 px across) well under one.
    "camelyon": SynthPreset(
        name="camelyon", size=4096, n_slides=24, tissue_fraction=0.15, tissue_pieces=3, fragments=4,
        tumor_prob=0.5, shortcut=0.0,
        metastasis=(("macro", 0.035, 0.06, 1), ("micro", 0.010, 0.018, 1), ("itc", 0.003, 0.005, 2)),
    ),
    "multimodal": SynthPreset(name="multimodal", dark_background=True),
    # PSCL's weakly-supervised segmentation: all classes mixed in every slide, partial activation.
    "wsss": SynthPreset(name="wsss", n_slides=6, tissue_fraction=0.6, fragments=4, class_mix=(0.4, 0.3, 0.3),
                        tumor_count=(2, 4), tumor_radius=(0.06, 0.12), shortcut=0.0, partial=0.7),
    # GERNE's study: multimodal images on black, tumour masses in a few tissue pieces and many small
    # islands, so small-tissue tiles exist in both classes; ``shortcut`` sets how rarely they are tumour.
    "gerne": SynthPreset(name="gerne", n_slides=20, tissue_fraction=0.3, tissue_pieces=3, fragments=60,
                         fragment_radius=(0.003, 0.01), tumor_count=(2, 4), tumor_radius=(0.08, 0.16),
                         dark_background=True),
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field."""
    f = max(1, int(sigma // 4))  # large blurs are computed on a coarse grid, then interpolated
    coarse = (-(-shape[0] // f), -(-shape[1] // f))
    g = ndi.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma / f, mode="wrap")
    if f > 1:
        g = ndi.zoom(g, f, order=1, grid_mode=True, mode="grid-wrap")[: shape[0], : shape[1]]
    return (g - g.mean()) / (g.std() + 1e-8)


def _blob(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    """Normalised elliptical radius: < 1 inside the ellipse."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    return np.sqrt(u * u + v * v)


def _label_map(preset: SynthPreset, rng: np.random.Generator, n: int, has_tumor: bool,
               metastasis: tuple[str, float, float, int] | None = None) -> np.ndarray:
    """(n, n) uint8 class map at low resolution; ``metastasis``: the tumour slide's size class entry."""
    noise = _smooth_noise(rng, (n, n), n / 24)
    # Main tissue: a few overlapping ellipses with a wobbly outline, grown to the target area.
    field = np.full((n, n), np.inf, np.float32)
    for _ in range(preset.tissue_pieces):
        r = np.sqrt(preset.tissue_fraction / preset.tissue_pieces / np.pi) * n
        cy, cx = rng.uniform(0.3, 0.7, 2) * n if preset.tissue_pieces == 1 else rng.uniform(0.15, 0.85, 2) * n
        field = np.minimum(field, _blob((n, n), cy, cx, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), rng.uniform(0, np.pi)))
    field = field + 0.18 * noise
    thresh = np.quantile(field, preset.tissue_fraction)
    tissue = field < thresh
    tissue = ndi.binary_fill_holes(ndi.binary_opening(tissue, iterations=2))
    main_tissue = tissue.copy()
    tumour_islands = np.zeros((n, n), bool)
    for _ in range(preset.fragments):  # small islands, tumour with probability (1 - shortcut) / 2
        r = rng.uniform(*preset.fragment_radius) * n
        cy, cx = rng.uniform(0.05, 0.95, 2) * n
        island = (_blob((n, n), cy, cx, r, r * rng.uniform(0.6, 1.4), rng.uniform(0, np.pi)) < 1 + 0.3 * noise) & ~tissue
        if has_tumor and rng.random() < (1 - preset.shortcut) / 2 and metastasis is None:
            tumour_islands |= island
        tissue |= island

    # Non-tumour tissue classes from competing smooth fields, weighted by the class mix.
    mix = np.asarray(preset.class_mix, np.float32) / sum(preset.class_mix)
    fields = np.stack([_smooth_noise(rng, (n, n), n / 20) + 2.2 * np.log(max(m, 1e-6) + 1e-6) for m in mix])
    labels = np.where(tissue, (np.argmax(fields, axis=0) + STROMA).astype(np.uint8), np.uint8(BG))

    if has_tumor and metastasis is not None:
        _metastasis(labels, rng, main_tissue, noise, metastasis)
    elif has_tumor:
        depth = ndi.distance_transform_edt(main_tissue).astype(np.float32)
        min_depth = preset.shortcut * depth.max() * 0.5
        allowed = depth >= max(min_depth, 1.0)
        candidates = np.argwhere(allowed)
        if len(candidates):
            tumor = np.zeros((n, n), bool)
            for _ in range(rng.integers(preset.tumor_count[0], preset.tumor_count[1] + 1)):
                cy, cx = candidates[rng.integers(len(candidates))]
                r = rng.uniform(*preset.tumor_radius) * n
                shape = _blob((n, n), cy, cx, r * rng.uniform(0.7, 1.0), r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
                tumor |= shape < 1 + 0.25 * _smooth_noise(rng, (n, n), max(r / 3, 1))
            labels[tumor & allowed] = TUMOR
            # Necrotic cores inside large tumours.
            core = ndi.distance_transform_edt(labels == TUMOR) > preset.tumor_radius[1] * n * 0.6
            labels[core & (noise > 0.3)] = NECROSIS
    labels[tumour_islands] = TUMOR
    return labels


def _metastasis(labels: np.ndarray, rng: np.random.Generator, main_tissue: np.ndarray, noise: np.ndarray,
                metastasis: tuple[str, float, float, int]) -> None:
    """Paint one size class's tumour clusters into ``labels`` (in place), each wholly inside the main tissue.

    A cluster's centre lies at least its radius deep in the main tissue when such a place exists, so the
    class's size is not cut off at the tissue's edge; the centre pixel is always tumour, so even a cluster
    smaller than a pixel of this map leaves a trace.
    """
    n = labels.shape[0]
    _, r_lo, r_hi, clusters = metastasis
    depth = ndi.distance_transform_edt(main_tissue).astype(np.float32)
    inside = main_tissue & (depth >= 1.0)
    if not inside.any():
        inside = main_tissue if main_tissue.any() else labels > 0
    tumor = np.zeros((n, n), bool)
    for _ in range(clusters):
        r = rng.uniform(r_lo, r_hi) * n
        deep = np.argwhere(inside & (depth >= r))
        candidates = deep if len(deep) else np.argwhere(inside)
        cy, cx = candidates[rng.integers(len(candidates))]
        shape = _blob((n, n), cy, cx, r * rng.uniform(0.7, 1.0), r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
        tumor |= shape < 1 + 0.25 * _smooth_noise(rng, (n, n), max(r / 3, 1))
        tumor[cy, cx] = True
    labels[tumor & inside] = TUMOR
    # Necrotic cores inside the largest metastases only.
    core = ndi.distance_transform_edt(labels == TUMOR) > r_hi * n * 0.6
    labels[core & (noise > 0.3)] = NECROSIS


def _class_look(preset: SynthPreset, rng: np.random.Generator, n: int, mask: np.ndarray) -> np.ndarray:
    """(n, n) float32 weight of each pixel's class look: 1 in discriminative cores (~1/3 of the area), 1 - partial elsewhere."""
    field = _smooth_noise(rng, (n, n), n / 48)
    core = 1.0 / (1.0 + np.exp(-(field - 0.45) * 6.0))  # soft: about a third of the area is core
    return (1.0 - preset.partial * (1.0 - core)).astype(np.float32)


def render_slide(preset: SynthPreset, seed: int, has_tumor: bool | None = None,
                 size_class: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one slide.

    Parameters
    ----------
    preset : the generator's knobs.
    seed : the slide's content follows from it.
    has_tumor : whether the slide holds tumour; None: drawn with ``preset.tumor_prob``.
    size_class : for presets with ``metastasis``, the name of the tumour slide's size class;
        None: drawn from the seed. Must be None (or ``"negative"``) for a slide without tumour.

    Returns
    -------
    rgb : (size, size, 3) uint8
    mask : (size, size) uint8
        Class indices into ``CLASSES``.
    """
    rng = np.random.default_rng(seed)
    if has_tumor is None:
        has_tumor = bool(rng.random() < preset.tumor_prob)
    metastasis = None
    if size_class not in (None, "negative") and not preset.metastasis:
        raise ValueError(f"synthetic preset {preset.name!r} has no metastasis size classes; got {size_class!r}")
    if preset.metastasis and has_tumor:
        by_name = {m[0]: m for m in preset.metastasis}
        if size_class is None:
            size_class = preset.metastasis[rng.integers(len(preset.metastasis))][0]
        if size_class not in by_name:
            raise ValueError(f"synthetic preset {preset.name!r}: unknown size class {size_class!r} for a tumour "
                             f"slide; valid: {sorted(by_name)}")
        metastasis = by_name[size_class]
    elif size_class not in (None, "negative"):
        raise ValueError(f"size class {size_class!r} given for a slide without tumour")
    n = preset.size
    factor = 4
    low = _label_map(preset, rng, n // factor, has_tumor, metastasis)
    mask = np.repeat(np.repeat(low, factor, axis=0), factor, axis=1)
    if mask.shape[0] != n:
        mask = np.pad(mask, ((0, n - mask.shape[0]), (0, n - mask.shape[1])), mode="edge")

    base, nuc_col = (_MM_BASE, _MM_NUC) if preset.dark_background else (_HE_BASE, _HE_NUC)
    tissue = (mask > 0)[..., None]
    look = _class_look(preset, rng, n, mask) if preset.partial > 0 else None  # 1 in cores, 1 - partial elsewhere

    def blend(per_class: np.ndarray) -> np.ndarray:
        """``per_class[mask]``, pulled towards the tissue average where the class is not discriminative."""
        v = per_class[mask]
        if look is None:
            return v
        avg = per_class[1:].mean(0)
        w = look if v.ndim == 2 else look[..., None]
        return np.where(tissue if v.ndim == 3 else mask > 0, avg + w * (v - avg), v).astype(np.float32)

    # Stain variation: smooth, slide-wide, per channel, in tissue only.
    low_var = np.stack([_smooth_noise(rng, (n // 16 + 1, n // 16 + 1), 6) for _ in range(3)], -1) * 9.0
    variation = np.repeat(np.repeat(low_var, 16, axis=0), 16, axis=1)[:n, :n]
    img = blend(base) + variation * tissue
    # Fibre-like streaks in stroma; a 1024-px texture tiled over the slide keeps this cheap.
    t = min(n, 1024)
    streak = ndi.gaussian_filter(rng.standard_normal((t, t), dtype=np.float32), (0.8, 5.0), mode="wrap") * 40
    streak = np.tile(streak, (n // t + 1, n // t + 1))[:n, :n]
    fibres = (mask == STROMA) * (look if look is not None else 1.0)
    img += fibres[..., None] * streak[..., None] * np.array([0.3, 0.8, 0.6], np.float32)
    # Nuclei: random seeds with a class-dependent density, blurred into blobs of a class-dependent size.
    uniform = rng.random((n, n), dtype=np.float32)
    seeds = uniform < blend(_NUC_DENSITY / 1000.0)
    nuclei = np.zeros((n, n), np.float32)
    for sigma in sorted(set(_NUC_SIGMA.values())):
        classes = [c for c, s in _NUC_SIGMA.items() if s == sigma]
        sel = (seeds & np.isin(mask, classes)).astype(np.float32)
        nuclei += ndi.gaussian_filter(sel, sigma) * (2 * np.pi * sigma * sigma)
    alpha = np.clip(nuclei * 1.6, 0, 1)[..., None] * tissue
    img = img * (1 - alpha) + blend(nuc_col) * alpha
    grain = rng.standard_normal((t, t, 3), dtype=np.float32) * 5
    img += np.tile(grain, (n // t + 1, n // t + 1, 1))[:n, :n]
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _reduce(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a[:h, :w]
    if a.ndim == 3:
        return a.reshape(h // 2, 2, w // 2, 2, a.shape[2]).mean(axis=(1, 3)).round().astype(np.uint8)
    return a[::2, ::2]  # class indices: nearest, never averaged


def write_pyramid(path: str | Path, image: np.ndarray, mpp: float | None = None, tile: int = 256,
                  min_size: int = 256, compression: str | None = None) -> Path:
    """Write a tiled pyramidal TIFF that OpenSlide opens with all its levels.

    Reduced levels are successive pages marked ``subfiletype=1`` (as SubIFDs
    OpenSlide would show a single level). RGB uses JPEG by default, class
    masks (2-D) lossless zlib.
    """
    path = Path(path)
    rgb = image.ndim == 3
    compression = compression or ("jpeg" if rgb else "zlib")
    kwargs = dict(tile=(tile, tile), compression=compression, photometric="rgb" if rgb else "minisblack", metadata=None)
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    tmp = path.with_name(f".{path.name}.tmp")
    level = image
    with tifffile.TiffWriter(tmp) as tif:
        ds = 1
        while True:
            res = {}
            if mpp:
                res = dict(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
            tif.write(level, subfiletype=0 if ds == 1 else 1, **kwargs, **res)
            if max(level.shape[:2]) // 2 < min_size:
                break
            level = _reduce(level)
            ds *= 2
    tmp.replace(path)
    return path


def _split_counts(n: int, splits: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) slide counts; every split with a non-zero share gets a slide from 3 slides on."""
    n_val = max(int(n >= 3 and splits[1] > 0), round(splits[1] * n))
    n_test = max(int(n >= 3 and splits[2] > 0), round(splits[2] * n))
    return n - n_val - n_test, n_val, n_test


def _deal(n: int, counts: tuple[int, ...]) -> list[int]:
    """Split index of each of ``n`` ordered items, dealt so that every prefix holds each split's share
    (to within one item) and the totals are ``counts`` exactly: a stratified assignment of an ordered list."""
    assigned = [0] * len(counts)
    out = []
    for k in range(1, n + 1):
        s = max(range(len(counts)), key=lambda j: counts[j] * k - assigned[j] * n)  # largest deficit, in integers
        assigned[s] += 1
        out.append(s)
    return out


def _layout(preset: SynthPreset, seed: int) -> list[tuple[bool, str | None, str]]:
    """(has tumour, size class or None, split) of each slide, from ``seed``.

    Without ``metastasis``: tumour drawn per slide with ``tumor_prob`` (slides 0 and 1 forced to both labels)
    and splits in slide order. With it: exactly ``round(tumor_prob * n)`` tumour slides, at random (at
    least 3 of each label from 6 slides on), the size classes in turn over them, and each label's slides
    dealt over the splits in size-class order, so each split holds both labels and a share of each class.
    """
    names = ("train", "val", "test")
    n = preset.n_slides
    rng = np.random.default_rng(seed)
    if not preset.metastasis:
        flags = rng.random(n) < preset.tumor_prob
        if preset.tumor_prob not in (0.0, 1.0) and n >= 2:  # both labels present
            flags[0], flags[1] = True, False
        n_train, n_val, _ = _split_counts(n, preset.splits)
        return [(bool(f), None, names[0 if i < n_train else 1 if i < n_train + n_val else 2])
                for i, f in enumerate(flags)]
    n_tumor = round(preset.tumor_prob * n)
    if 0 < preset.tumor_prob < 1:
        least = 3 if n >= 6 else 1 if n >= 2 else 0
        n_tumor = min(max(n_tumor, least), n - least)
    tumor = sorted(int(i) for i in rng.permutation(n)[:n_tumor])
    classes = {i: preset.metastasis[k % len(preset.metastasis)][0] for k, i in enumerate(tumor)}
    order = {name: k for k, (name, *_) in enumerate(preset.metastasis)}
    split = {}
    for group in ([i for i in range(n) if i not in classes], sorted(tumor, key=lambda i: (order[classes[i]], i))):
        for i, s in zip(group, _deal(len(group), _split_counts(len(group), preset.splits))):
            split[i] = names[s]
    return [(i in classes, classes.get(i), split[i]) for i in range(n)]


def synthesize(out_dir: str | Path, preset: SynthPreset | str = "default", seed: int = 0, **overrides) -> Path:
    """Write a synthetic dataset: slides, masks, ``classes.json`` and ``slides.csv``.

    Parameters
    ----------
    out_dir : directory to create (existing slides with the same name are rewritten).
    preset : a ``SynthPreset`` or the name of one in ``PRESETS``.
    seed : every slide's content follows from (seed, slide index).
    overrides : fields of the preset to change, e.g. ``n_slides=3, shortcut=0.9``.

    Returns
    -------
    Path to ``slides.csv``.
    """
    if isinstance(preset, str):
        try:
            preset = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown synthetic preset {preset!r}; valid: {sorted(PRESETS)}") from None
    preset = replace(preset, **overrides) if overrides else preset
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (has_tumor, size_class, split) in enumerate(_layout(preset, seed)):
        slide_id = f"{preset.name}-{seed}-{i:03d}"
        rgb, mask = render_slide(preset, seed * 100_003 + i, has_tumor=has_tumor, size_class=size_class)
        write_pyramid(out / "slides" / f"{slide_id}.tiff", rgb, mpp=preset.mpp)
        write_pyramid(out / "masks" / f"{slide_id}.tiff", mask, mpp=preset.mpp)
        row = dict(slide_id=slide_id, path=f"slides/{slide_id}.tiff", mask_path=f"masks/{slide_id}.tiff",
                   label=int((mask == TUMOR).any()), split=split)
        if preset.metastasis:
            row["size_class"] = size_class if row["label"] else "negative"
        rows.append(row)
    (out / "classes.json").write_text(json.dumps({str(i): c for i, c in enumerate(CLASSES)}, indent=2))
    (out / "preset.json").write_text(json.dumps({**asdict(preset), "seed": seed}, indent=2))
    with open(out / "slides.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "slides.csv"
