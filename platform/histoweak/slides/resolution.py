"""Where to read a slide for a resolution, and the read itself: one function for tiling, prediction and MagNets.

A resolution is asked for as microns per pixel (``mpp``), as an objective magnification (``10 / mpp``: 20x is
0.5 µm/px, 40x 0.25), as a pyramid level, or as a downsample (level-0 pixels per output pixel). ``resolve``
turns any of them into a ``Resolution``: the output's downsample, the pyramid level read (the coarsest level
that still holds at least the requested resolution) and the scale from that level to the output.
``read_scaled`` reads a region at it: the level's pixels, resized to the output by area (each output pixel
the mean of the level pixels it covers, by the fraction covered). Masks are sampled with nearest neighbour at the output
pixels' centres (``tiling.sample_mask``), so class indices are never blended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from histoweak.slides.reader import SlideError, SlideReader

__all__ = ["MPP_AT_1X", "Resolution", "level_at_most", "mpp_for_magnification", "read_scaled", "resize_area",
           "resolve", "slide_mpp"]

#: µm per pixel times objective magnification, the usual convention (20x ≈ 0.5 µm/px, 40x ≈ 0.25 µm/px)
MPP_AT_1X = 10.0
#: a level within this relative distance of the requested downsample is read as is (no resampling)
SNAP = 1e-3


def mpp_for_magnification(magnification: float) -> float:
    """µm per pixel of an objective magnification (``MPP_AT_1X / magnification``)."""
    if not magnification > 0:
        raise ValueError(f"magnification must be > 0, got {magnification}")
    return MPP_AT_1X / magnification


@dataclass(frozen=True)
class Resolution:
    """A resolution on one slide: what ``read_scaled`` reads and what a tile row records.

    Attributes
    ----------
    downsample : level-0 pixels per output pixel
    level : the pyramid level read
    level_downsample : level-0 pixels per pixel of ``level``
    slide_mpp : µm per level-0 pixel (from the file, or assumed), None when neither says
    mpp_assumed : ``slide_mpp`` is the user's ``assume_mpp``, not the file's
    """

    downsample: float
    level: int
    level_downsample: float
    slide_mpp: float | None = None
    mpp_assumed: bool = False

    @property
    def scale(self) -> float:
        """Output pixels per pixel of the level read (1: read as is; < 1: shrunk)."""
        return self.level_downsample / self.downsample

    @property
    def native(self) -> bool:
        return abs(self.scale - 1.0) <= SNAP

    @property
    def mpp(self) -> float | None:
        """µm per output pixel (the achieved resolution), None when the slide's mpp is unknown."""
        return self.slide_mpp * self.downsample if self.slide_mpp else None

    def dimensions(self, reader: SlideReader) -> tuple[int, int]:
        """(width, height) of the whole slide in output pixels."""
        if self.native:
            return tuple(int(v) for v in reader.level_dimensions[self.level])
        w, h = reader.dimensions
        return int(math.floor(w / self.downsample)), int(math.floor(h / self.downsample))


def level_at_most(reader: SlideReader, downsample: float) -> int:
    """The coarsest level whose downsample is at most ``downsample`` (level 0 when none is): the level that still
    holds at least the requested resolution."""
    best = 0
    for level, ds in enumerate(reader.level_downsamples):
        if ds <= downsample * (1 + SNAP):
            best = level
    return best


def slide_mpp(reader: SlideReader, assume_mpp: float | None = None) -> tuple[float, bool]:
    """µm per level-0 pixel of a slide and whether it was assumed.

    Raises
    ------
    SlideError
        When the file has no mpp metadata and ``assume_mpp`` is not given.
    """
    if reader.mpp:
        return reader.mpp, False
    if assume_mpp:
        return float(assume_mpp), True
    raise SlideError(reader.path, "no microns-per-pixel metadata (openslide.mpp-x/y), so a physical resolution "
                                  "cannot be found; give --assume-mpp (µm per level-0 pixel) or tile by --level")


def resolve(reader: SlideReader, *, mpp: float | None = None, magnification: float | None = None,
            level: int | None = None, downsample: float | None = None,
            assume_mpp: float | None = None) -> Resolution:
    """The ``Resolution`` of a slide for exactly one of ``mpp``, ``magnification``, ``level`` or ``downsample``.

    A physical request (``mpp``, ``magnification``) reads the coarsest level at least that fine and shrinks
    it to the target; a level within 0.1 % of the target is read as is (the achieved mpp is then that
    level's). ``downsample`` does the same in level-0 pixels (MagNets' zoom).

    Raises
    ------
    SlideError
        A level that does not exist, a slide without mpp (and no ``assume_mpp``) for a physical request, or a
        request finer than level 0 (upsampling would invent pixels).
    ValueError
        Not exactly one request, or a non-positive one.
    """
    given = {k: v for k, v in dict(mpp=mpp, magnification=magnification, level=level, downsample=downsample).items()
             if v is not None}
    if len(given) != 1:
        raise ValueError(f"resolve: give exactly one of mpp, magnification, level, downsample; got {sorted(given)}")
    (kind, value), = given.items()
    if kind != "level" and not value > 0:
        raise ValueError(f"resolve: {kind} must be > 0, got {value}")
    known = reader.mpp or assume_mpp
    if kind == "level":
        if not 0 <= value < reader.level_count:
            raise SlideError(reader.path, f"level {value} requested but the slide has {reader.level_count}")
        ds = float(reader.level_downsamples[value])
        return Resolution(ds, int(value), ds, known, not reader.mpp and bool(assume_mpp))
    if kind in ("mpp", "magnification"):
        target = value if kind == "mpp" else mpp_for_magnification(value)
        base, assumed = slide_mpp(reader, assume_mpp)
        want = target / base
        if want < 1 - SNAP:
            raise SlideError(reader.path, f"{target:.4g} µm/px requested, but level 0 is {base:.4g} µm/px"
                                          f"{' (assumed)' if assumed else ''}: finer than the slide holds")
    else:
        want, base, assumed = float(value), known, not reader.mpp and bool(assume_mpp)
    want = max(want, 1.0)
    lvl = level_at_most(reader, want)
    lds = float(reader.level_downsamples[lvl])
    if abs(lds / want - 1) <= SNAP:
        want = lds
    return Resolution(want, lvl, lds, base, assumed)


def _area_taps(n_out: int, n_in: int, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Input pixel indices and weights (n_out, K): output pixel i is ``sum_k w[i, k] * in[idx[i, k]]`` when
    ``n_out`` output pixels span the first ``extent`` input pixels; a weight is the share of output pixel i
    that input pixel ``idx[i, k]`` covers (rows sum to 1)."""
    f = extent / n_out
    lo = np.arange(n_out) * f
    idx = np.floor(lo).astype(np.int64)[:, None] + np.arange(int(math.ceil(f)) + 1)[None, :]
    w = np.minimum(lo[:, None] + f, idx + 1) - np.maximum(lo[:, None], idx)
    w = np.where(idx < n_in, np.clip(w, 0, None), 0) / f
    return np.minimum(idx, n_in - 1), w.astype(np.float32)


def resize_area(rgb: np.ndarray, size: tuple[int, int], extent: tuple[float, float] | None = None) -> np.ndarray:
    """``rgb`` (h, w, 3) uint8 resized to ``size`` = (width, height).

    Shrinking averages by area, exactly: each output pixel is the mean of the input pixels it covers, weighted
    by the fraction covered (OpenCV's ``INTER_AREA``; PIL's box filter counts a pixel wholly or not at all,
    20 grey levels off on noise at a 1.4x shrink). ``extent`` = (width, height) in input pixels that the
    output spans (default: all of ``rgb``), for a region whose edge falls inside a pixel. Enlarging (only
    MagNets' deepest zoom asks for more than level 0 holds) is bilinear.
    """
    w, h = (int(v) for v in size)
    ew, eh = extent if extent is not None else (rgb.shape[1], rgb.shape[0])
    if (w, h) == (rgb.shape[1], rgb.shape[0]) and (ew, eh) == (w, h):
        return rgb
    if w > ew or h > eh:
        box = (0.0, 0.0, float(ew), float(eh))
        return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR, box=box))
    idx, wt = _area_taps(h, rgb.shape[0], eh)
    rows = sum(wt[:, k, None, None] * rgb[idx[:, k]].astype(np.float32) for k in range(idx.shape[1]))  # (h, W, 3)
    idx, wt = _area_taps(w, rgb.shape[1], ew)
    out = sum(wt[None, :, k, None] * rows[:, idx[:, k]] for k in range(idx.shape[1]))  # (h, w, 3)
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255), dtype=np.uint8)


def read_scaled(reader: SlideReader, location: tuple[int, int], size: tuple[int, int], res: Resolution) -> np.ndarray:
    """The pixels of a region at ``res``: top-left ``location`` in level-0 pixels, ``size`` = (width, height) in
    output pixels. The region is read from ``res.level`` (it covers ``size * res.downsample`` level-0 pixels)
    and shrunk to ``size`` by ``resize_area``; at a native resolution this is one ``read_region``.

    Returns
    -------
    (height, width, 3) uint8, white outside the slide
    """
    w, h = (int(v) for v in size)
    if res.native:
        return reader.read_region(location, res.level, (w, h))
    factor = res.downsample / res.level_downsample  # level pixels per output pixel (> 1)
    ew, eh = w * factor, h * factor
    region = reader.read_region(location, res.level, (math.ceil(ew - 1e-6), math.ceil(eh - 1e-6)))
    return resize_area(region, (w, h), (ew, eh))
