"""Tiles from one slide: where they are (grid or centered), their pixels, labels and ratios.

Pure functions plus two per-slide steps used by the tiling job:
``plan_slide`` (open the slide, find tissue, choose tile positions) and
``tile_shard`` (read, label and encode one shard of those tiles into a
Parquet file). Neither knows about Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Collection, Iterator, Literal, get_args

import imagecodecs
import numpy as np
import pyarrow as pa
from scipy import ndimage as ndi

from histoweak.data.schema import SCHEMA, write_table_atomic
from histoweak.slides.reader import MaskReader, SlideError, SlideReader
from histoweak.slides.resolution import Resolution, mpp_for_magnification, read_scaled, resolve
from histoweak.slides.tissue import DETECTORS, tissue_mask

__all__ = [
    "PARAM_CHOICES",
    "SlidePlan",
    "SlideSpec",
    "TilingParams",
    "box_fraction",
    "centered_positions",
    "encode_image",
    "decode_image",
    "grid_positions",
    "plan_slide",
    "sample_mask",
    "tile_labels",
    "tile_shard",
]


Mode = Literal["grid", "centered"]
TissueSource = Literal["auto", "mask", "detector"]
ImageFormat = Literal["png", "jpeg"]
# The TilingParams fields that take one of a fixed set of values: the validator and the CLI's choices read this.
PARAM_CHOICES: dict[str, Collection[str]] = {
    "mode": get_args(Mode),
    "tissue_method": tuple(DETECTORS),
    "tissue_source": get_args(TissueSource),
    "image_format": get_args(ImageFormat),
}


@dataclass(frozen=True)
class TilingParams:
    """How slides become tiles. Every field is validated on construction.

    Attributes
    ----------
    level : pyramid level to tile at (0 = full resolution), when no physical resolution is asked for.
    mpp : microns per tile pixel: each slide is read from its coarsest level at least this fine and shrunk to
        it (``slides.resolution``), so slides from scanners with different pyramids give tiles of one scale.
    magnification : objective magnification instead of ``mpp`` (mpp = 10 / magnification: 20 is 0.5 µm/px).
    tile_size : tile side in output pixels (pixels of ``level``, or at ``mpp``).
    tile_um : tile side in microns instead of ``tile_size`` (needs ``mpp`` or ``magnification``).
    assume_mpp : microns per level-0 pixel for slides whose file does not say (recorded in the manifest);
        without it such a slide fails when a physical resolution is asked for.
    stride : step between tiles in output pixels; None: ``tile_size`` (no overlap).
    min_tissue : smallest tissue fraction a tile may hold.
    mode : ``grid`` (sliding window) or ``centered`` (Ciga & Martel B.2: around
        labelled connected components, large ones split by k-means).
    tissue_method : detector used when tissue does not come from a mask.
    tissue_source : ``auto`` (mask if given, else detector), ``mask`` or ``detector``.
    tissue_min_size : ``remove_small_objects`` size, pixels of the detection level.
    tissue_downsample : approximate downsample at which tissue is detected.
    image_format : ``png`` (lossless) or ``jpeg``.
    png_level : zlib level for PNG, 0..9 (1 is ~6x faster to write than 6, ~15 % larger).
    jpeg_quality : JPEG quality, 1..100.
    tiles_per_shard : tiles per Parquet file; a slide with more is split (and
        its shards tile in parallel).
    seed : random seed of k-means in centered mode.
    """

    level: int = 0
    mpp: float | None = None
    magnification: float | None = None
    tile_size: int = 224
    tile_um: float | None = None
    assume_mpp: float | None = None
    stride: int | None = None
    min_tissue: float = 0.5
    mode: Mode = "grid"
    tissue_method: str = "saturation"
    tissue_source: TissueSource = "auto"
    tissue_min_size: int = 64
    tissue_downsample: float = 16.0
    image_format: ImageFormat = "png"
    png_level: int = 1
    jpeg_quality: int = 90
    tiles_per_shard: int = 512
    seed: int = 0

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"tiling parameter {key!r}: {why}")

        if self.level < 0:
            bad("level", f"must be >= 0, got {self.level}")
        for key in ("mpp", "magnification", "tile_um", "assume_mpp"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.mpp is not None and self.magnification is not None:
            bad("magnification", "give mpp or magnification, not both")
        if self.target_mpp is not None and self.level != 0:
            bad("level", f"{self.level} with a physical resolution (mpp/magnification): the level read is chosen "
                         "per slide")
        if self.tile_um is not None:
            if self.target_mpp is None:
                bad("tile_um", "needs mpp or magnification (microns become pixels at that resolution)")
            object.__setattr__(self, "tile_size", int(round(self.tile_um / self.target_mpp)))
        if self.tile_size < 8:
            bad("tile_size", f"must be >= 8, got {self.tile_size}")
        if self.stride is not None and self.stride < 1:
            bad("stride", f"must be >= 1, got {self.stride}")
        if not 0.0 <= self.min_tissue <= 1.0:
            bad("min_tissue", f"must be in [0, 1], got {self.min_tissue}")
        for key, valid in PARAM_CHOICES.items():
            if getattr(self, key) not in valid:
                bad(key, f"unknown {getattr(self, key)!r}; valid: {list(valid)}")
        if not 0 <= self.png_level <= 9:
            bad("png_level", f"must be in 0..9, got {self.png_level}")
        if not 1 <= self.jpeg_quality <= 100:
            bad("jpeg_quality", f"must be in 1..100, got {self.jpeg_quality}")
        if self.tiles_per_shard < 1:
            bad("tiles_per_shard", f"must be >= 1, got {self.tiles_per_shard}")
        if self.tissue_downsample < 1:
            bad("tissue_downsample", f"must be >= 1, got {self.tissue_downsample}")

    @property
    def step(self) -> int:
        return self.stride or self.tile_size

    @property
    def target_mpp(self) -> float | None:
        """The physical resolution asked for (µm per tile pixel), None when tiling by level."""
        return self.mpp if self.magnification is None else mpp_for_magnification(self.magnification)

    def resolution(self, reader: SlideReader) -> Resolution:
        """Where this slide is read (``slides.resolution.resolve``): by mpp when one is asked for, else the level."""
        if self.target_mpp is not None:
            return resolve(reader, mpp=self.target_mpp, assume_mpp=self.assume_mpp)
        return resolve(reader, level=self.level, assume_mpp=self.assume_mpp)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SlideSpec:
    """One slide to tile, as listed in a directory, glob or ``slides.csv``."""

    slide_id: str
    path: str
    mask_path: str | None = None
    label: int | None = None
    split: str = "train"

    def __post_init__(self):
        if not self.slide_id or "/" in self.slide_id or self.slide_id.startswith("."):
            raise ValueError(f"slide_id {self.slide_id!r} must be a non-empty file name without '/'")


@dataclass
class SlidePlan:
    """What ``plan_slide`` found: where the slide is read, tile positions (output pixels) and their tissue
    fractions."""

    slide_id: str
    dimensions: tuple[int, int]
    resolution: Resolution
    positions: np.ndarray  # (n, 2) int64, top-left (x, y) in output pixels (of `level` when tiling by level)
    tissue: np.ndarray  # (n,) float32, tissue fraction used for selection
    candidates: int  # positions considered before the tissue filter
    notes: list[str] = field(default_factory=list)

    @property
    def downsample(self) -> float:
        """Level-0 pixels per tile pixel."""
        return self.resolution.downsample

    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel (the file's, or the assumed one)."""
        return self.resolution.slide_mpp

    def shards(self, tiles_per_shard: int) -> list[np.ndarray]:
        """Indices into ``positions`` for each shard, in reading order."""
        n = len(self.positions)
        return [np.arange(i, min(i + tiles_per_shard, n)) for i in range(0, n, tiles_per_shard)]


# -- pure helpers -------------------------------------------------------------


def grid_positions(width: int, height: int, tile_size: int, stride: int) -> np.ndarray:
    """Top-left corners of every tile that fits entirely inside a ``width`` x ``height`` image.

    Returns
    -------
    (n, 2) int64
        (x, y) in row-major order.
    """
    if width < tile_size or height < tile_size:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(0, width - tile_size + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - tile_size + 1, stride, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def box_fraction(binary: np.ndarray, boxes: np.ndarray, scale: float) -> np.ndarray:
    """Fraction of true pixels of ``binary`` inside each box, by a summed-area table.

    Parameters
    ----------
    binary : (h, w) bool
        A mask at a coarser resolution than the boxes.
    boxes : (n, 4) float
        (x0, y0, x1, y1) in the boxes' own pixels.
    scale : float
        Box pixels per ``binary`` pixel.

    Returns
    -------
    (n,) float32
        Boxes falling outside ``binary`` count the outside as false.
    """
    h, w = binary.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = binary.astype(np.int64).cumsum(0).cumsum(1)
    b = np.asarray(boxes, float) / scale
    x0 = np.clip(np.floor(b[:, 0] + 0.5), 0, w).astype(int)
    y0 = np.clip(np.floor(b[:, 1] + 0.5), 0, h).astype(int)
    x1 = np.clip(np.floor(b[:, 2] + 0.5), 0, w).astype(int)
    y1 = np.clip(np.floor(b[:, 3] + 0.5), 0, h).astype(int)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-9)
    covered = np.maximum((x1 - x0) * (y1 - y0), 1)
    # `inside / covered` is the coverage of the part inside the image; the rest counts as empty.
    inside_frac = np.clip(covered / area, 0, 1)
    return (inside / covered * inside_frac).astype(np.float32)


def sample_mask(mask: np.ndarray, mask_downsample: float, x0: float, y0: float, size: int, downsample: float) -> np.ndarray:
    """The class-index map of one tile, by nearest-neighbour sampling at the tile's pixel centres.

    Parameters
    ----------
    mask : (H, W) uint8
        Class indices at ``mask_downsample`` level-0 pixels per mask pixel.
    x0, y0 : float
        Tile's top-left corner in level-0 pixels.
    size : int
        Tile side in pixels.
    downsample : float
        Level-0 pixels per tile pixel.

    Returns
    -------
    (size, size) uint8
        When mask and tile share a resolution this is an exact crop.
    """
    centres = (np.arange(size) + 0.5) * downsample
    cols = np.floor((x0 + centres) / mask_downsample).astype(np.int64)
    rows = np.floor((y0 + centres) / mask_downsample).astype(np.int64)
    np.clip(cols, 0, mask.shape[1] - 1, out=cols)
    np.clip(rows, 0, mask.shape[0] - 1, out=rows)
    return mask[np.ix_(rows, cols)]


def tile_labels(mask: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Class presence, class fractions and tissue fraction of one tile's class-index map.

    Class c is present iff at least one pixel has index c (GERNE eq. 2); class 0 is background.

    Parameters
    ----------
    mask : (h, w) uint8
    n_classes : int
        Including background.

    Returns
    -------
    labels : (n_classes,) uint8
        Multi-hot presence.
    class_ratios : (n_classes,) float32
        Fraction of pixels per class (sums to 1).
    tissue_ratio : float
        ``1 - class_ratios[0]``.
    """
    if mask.size and int(mask.max()) >= n_classes:
        raise ValueError(f"mask holds class {int(mask.max())} but only {n_classes} classes are defined")
    counts = np.bincount(mask.ravel(), minlength=n_classes).astype(np.float64)
    ratios = (counts / max(mask.size, 1)).astype(np.float32)
    return (counts > 0).astype(np.uint8), ratios, float(1.0 - ratios[0])


def encode_image(rgb: np.ndarray, fmt: str = "png", png_level: int = 1, jpeg_quality: int = 90) -> bytes:
    """Encode (h, w, 3) or (h, w) uint8 as PNG or JPEG bytes."""
    if fmt == "png":
        return bytes(imagecodecs.png_encode(rgb, level=png_level))
    if fmt == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(rgb, level=jpeg_quality))
    raise ValueError(f"unknown image format {fmt!r}; valid: ['jpeg', 'png']")


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG or JPEG bytes (recognised by their signature) to uint8."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return imagecodecs.png_decode(data)
    if data[:2] == b"\xff\xd8":
        return imagecodecs.jpeg8_decode(data)
    raise ValueError("not a PNG or JPEG image")


def centered_positions(mask: np.ndarray, mask_downsample: float, downsample: float, tile_size: int,
                       level_dims: tuple[int, int], seed: int = 0, max_points: int = 5000) -> np.ndarray:
    """Tiles centred on labelled connected components (Ciga & Martel, appendix B.2).

    Each connected component of each non-background class gets a tile centred
    on it; a component larger than a tile is split into
    k = ceil(1 + area / tile_size**2) parts by k-means on its pixel
    coordinates, and each part's centre gets a tile.

    Parameters
    ----------
    mask : (H, W) uint8 class indices at ``mask_downsample``.
    downsample : level-0 pixels per tile pixel.
    tile_size : tile side Δ in pixels of the tile level.
    level_dims : (width, height) of the tile level; tiles are kept inside it.

    Returns
    -------
    (n, 2) int64
        Top-left (x, y) in pixels of the tile level, unique, row-major.
    """
    from sklearn.cluster import KMeans

    scale = mask_downsample / downsample  # tile-level pixels per mask pixel
    centres: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for cls in np.unique(mask):
        if cls == 0:
            continue
        comps, n = ndi.label(mask == cls)
        if n == 0:
            continue
        objects = ndi.find_objects(comps)
        for i, sl in enumerate(objects, start=1):
            rr, cc = np.nonzero(comps[sl] == i)
            pts = np.stack([cc + sl[1].start + 0.5, rr + sl[0].start + 0.5], axis=1) * scale
            area = len(pts) * scale * scale
            if area <= tile_size * tile_size:
                centres.append(pts.mean(axis=0, keepdims=True))
                continue
            k = math.ceil(1 + area / tile_size**2)
            if len(pts) > max_points:
                pts = pts[rng.choice(len(pts), max_points, replace=False)]
            k = min(k, len(pts))
            km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(pts)
            centres.append(km.cluster_centers_)
    if not centres:
        return np.zeros((0, 2), np.int64)
    c = np.concatenate(centres)
    w, h = level_dims
    tl = np.round(c - tile_size / 2).astype(np.int64)
    tl[:, 0] = np.clip(tl[:, 0], 0, max(w - tile_size, 0))
    tl[:, 1] = np.clip(tl[:, 1], 0, max(h - tile_size, 0))
    tl = np.unique(tl, axis=0)
    return tl[np.lexsort((tl[:, 0], tl[:, 1]))]


# -- per-slide steps ----------------------------------------------------------


def _open_mask(spec: SlideSpec, reader: SlideReader) -> MaskReader | None:
    return MaskReader(spec.mask_path, reader.dimensions) if spec.mask_path else None


def plan_slide(spec: SlideSpec, params: TilingParams) -> SlidePlan:
    """Open a slide (and mask), detect tissue at low resolution and choose tile positions.

    Raises
    ------
    SlideError
        Unreadable slide or mask, a mask of the wrong size, a level that does
        not exist, or a slide with no tile reaching ``min_tissue``.
    """
    with SlideReader(spec.path) as reader:
        res = params.resolution(reader)
        mask_reader = _open_mask(spec, reader)
        ds = res.downsample
        lw, lh = res.dimensions(reader)
        size = params.tile_size
        use_mask = mask_reader is not None and params.tissue_source in ("auto", "mask")
        if params.tissue_source == "mask" and mask_reader is None:
            raise SlideError(spec.path, "tissue_source='mask' but the slide has no mask")

        if params.mode == "centered":
            if mask_reader is None:
                raise SlideError(spec.path, "centered extraction needs a mask (labelled regions to centre on)")
            work_ds = max(ds, max(reader.dimensions) / 8192)
            work_mask, work_mds = mask_reader.read(work_ds)
            positions = centered_positions(work_mask, work_mds, ds, size, (lw, lh), seed=params.seed)
        else:
            positions = grid_positions(lw, lh, size, params.step)
        candidates = len(positions)
        boxes = np.concatenate([positions, positions + size], axis=1).astype(float) * ds  # level-0 px

        if use_mask:
            coarse, cds = mask_reader.read(max(params.tissue_downsample, 1.0))
            tissue = box_fraction(coarse > 0, boxes, cds)
        else:
            tlevel = reader.level_for_downsample(params.tissue_downsample)
            if reader.level_downsamples[tlevel] < params.tissue_downsample * 0.999 and not reader.is_pyramidal:
                tlevel = 0
            rgb = reader.read_level(tlevel) if reader.is_pyramidal or max(reader.dimensions) <= 4096 else reader.thumbnail(4096)
            tds = reader.dimensions[0] / rgb.shape[1]
            fg = tissue_mask(rgb, params.tissue_method, params.tissue_min_size)
            tissue = box_fraction(fg, boxes, tds)

        keep = tissue >= params.min_tissue if candidates else np.zeros(0, bool)
        if candidates == 0:
            raise SlideError(spec.path, f"no tile position: the slide is {lw}x{lh} at level {res.level}"
                             f"{'' if res.native else f' scaled by {res.scale:.4g}'}, smaller than a {size}px tile"
                             if params.mode == "grid" else "no labelled region in the mask")
        if not keep.any():
            raise SlideError(spec.path, f"no tissue: none of {candidates} tiles reaches min_tissue={params.min_tissue}"
                             f" (best {float(tissue.max()):.3f}, tissue from {'mask' if use_mask else params.tissue_method})")
        return SlidePlan(
            slide_id=spec.slide_id,
            dimensions=reader.dimensions,
            resolution=res,
            positions=positions[keep],
            tissue=tissue[keep],
            candidates=candidates,
        )


def _iter_tiles(reader: SlideReader, res: Resolution, positions: np.ndarray, size: int,
                max_band: int = 16) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, (size, size, 3) uint8) for each position (output pixels), reading runs of a row as one band.

    Bands are used only where they give the same pixels as a per-tile read: a level read as is, at an
    integer downsample. A resolution between levels reads each tile by ``read_scaled``.
    """
    ds, level = res.downsample, res.level
    if not res.native:
        for k in np.lexsort((positions[:, 0], positions[:, 1])):
            x, y = positions[k]
            yield int(k), read_scaled(reader, (round(x * ds), round(y * ds)), (size, size), res)
        return
    integer_ds = abs(ds - round(ds)) < 1e-9
    order = np.lexsort((positions[:, 0], positions[:, 1]))
    i = 0
    while i < len(order):
        j = i + 1
        x_start, y = positions[order[i]]
        while (integer_ds and j < len(order) and j - i < max_band and positions[order[j], 1] == y
               and positions[order[j], 0] - positions[order[j - 1], 0] <= size):
            j += 1
        run = order[i:j]
        if len(run) == 1:
            x, y = positions[run[0]]
            yield int(run[0]), reader.read_region((round(x * ds), round(y * ds)), level, (size, size))
        else:
            x_end = positions[run[-1], 0] + size
            band = reader.read_region((round(x_start * ds), round(y * ds)), level, (int(x_end - x_start), size))
            for k in run:
                off = int(positions[k, 0] - x_start)
                yield int(k), band[:, off:off + size]
        i = j


def tile_shard(spec: SlideSpec, params: TilingParams, plan: SlidePlan, index: np.ndarray, out_path: str | Path,
               n_classes: int, source: str, seconds: dict[str, float] | None = None) -> int:
    """Read, label, encode and write one shard of a slide's tiles as one Parquet file (atomically).

    Tiles whose exact tissue fraction (from the mask) falls below
    ``min_tissue`` are dropped here. Returns the number of rows written; ``seconds`` (if given) gets the time
    spent opening (slide and mask), reading, labelling, encoding and writing added to its keys.
    """
    clock = _Clock(seconds)
    ds = plan.downsample
    size = params.tile_size
    positions = plan.positions[index]
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    with SlideReader(spec.path) as reader:
        mask_reader = _open_mask(spec, reader)
        mask, mds = mask_reader.read(ds) if mask_reader else (None, None)
        use_mask = mask is not None and params.tissue_source in ("auto", "mask")
        res = plan.resolution
        clock.lap("open")
        for k, rgb in _iter_tiles(reader, res, positions, size):
            clock.lap("read")
            x, y = positions[k]
            x0, y0 = round(x * ds), round(y * ds)
            if mask is not None:
                tmask = sample_mask(mask, mds, x0, y0, size, ds)
                labels, ratios, mask_tissue = tile_labels(tmask, n_classes)
                if use_mask and mask_tissue < params.min_tissue:
                    continue
                rows["mask"].append(encode_image(tmask, "png", png_level=params.png_level))
                rows["labels"].append(labels)
                rows["class_ratios"].append(ratios)
                tissue = mask_tissue if use_mask else float(plan.tissue[index[k]])
            else:
                rows["mask"].append(None)
                rows["labels"].append(None)
                rows["class_ratios"].append(None)
                tissue = float(plan.tissue[index[k]])
            clock.lap("label")
            rows["image"].append(encode_image(rgb, params.image_format, params.png_level, params.jpeg_quality))
            rows["x"].append(x0)
            rows["y"].append(y0)
            rows["tissue_ratio"].append(tissue)
            clock.lap("encode")
    n = len(rows["x"])
    rows.update(
        slide_id=[spec.slide_id] * n, source=[source] * n, split=[spec.split] * n, level=[res.level] * n,
        downsample=[ds] * n, size=[size] * n, label=[spec.label] * n, group=[None] * n, mpp=[res.mpp] * n,
        scale=[res.scale] * n,
    )
    table = pa.table({name: pa.array(rows[name], type=SCHEMA.field(name).type) for name in SCHEMA.names}, schema=SCHEMA)
    write_table_atomic(table, out_path)
    clock.lap("write")
    return n


class _Clock:
    """Adds the time since the last ``lap`` to ``seconds[key]`` (nothing when ``seconds`` is None)."""

    def __init__(self, seconds: dict[str, float] | None):
        import time

        self.seconds, self.now = seconds, time.perf_counter
        self.last = self.now()

    def lap(self, key: str) -> None:
        if self.seconds is not None:
            t = self.now()
            self.seconds[key] = self.seconds.get(key, 0.0) + t - self.last
            self.last = t
