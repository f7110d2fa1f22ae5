"""Regions of a slide read where a model looks, at the level its zoom calls for (MagNets), and the tile grid a
tiling model reads instead (attention-MIL), both counted in pixels by the reader.

Coordinates: a slide's *canvas* is the square of side ``max(width, height)`` level-0 pixels centred on the
slide (MagNets' resize-and-pad, §3.1: the shorter side is padded). A box on it is ``(cx, cy, half)`` in
normalised canvas coordinates, ``[-1, 1]`` from the left/top edge to the right/bottom edge, as
``torch.nn.functional.affine_grid`` uses them: the box covers ``[cx - half, cx + half] × [cy - half, cy + half]``.
Pixels outside the slide are not read; they come back white, like OpenSlide's transparent border, and the grey
filter (``tissue.grey_filter_tissue``) makes them black as the paper's padding.

A *view* is the canvas seen through one of the 8 symmetries of the square (``dihedral``: ``(k, flip)``, k
quarter turns counter-clockwise by ``np.rot90``, then an optional left-right flip): reading box ``b`` of the
view returns ``view_pixels(read of canvas box view_to_canvas(b))``, so a model that zooms on an augmented slide
reads the same pixels, turned, as on the original (tested against turning the whole slide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from histoweak.slides.reader import SlideReader
from histoweak.slides.resolution import resize_area, resolve
from histoweak.slides.tissue import grey_filter_tissue

__all__ = ["Read", "grey_filter", "read_box", "tile_grid", "tiling_pixels", "view_to_canvas",
           "view_pixels"]

IDENTITY = (0, False)


@dataclass(frozen=True)
class Read:
    """What one ``read_box`` read: the level, its downsample, and the pixels it took from the file."""

    level: int
    downsample: float
    pixels: int  # at the level read (only the part of the box inside the slide)
    level0_pixels: float  # the same area in level-0 pixels


def view_to_canvas(cx: float, cy: float, dihedral: tuple[int, bool] = IDENTITY) -> tuple[float, float]:
    """The canvas coordinates of view point ``(cx, cy)``; a box keeps its half-size (the symmetries map squares
    centred at a point to squares centred at its image)."""
    k, flip = dihedral
    x, y = (-cx, cy) if flip else (cx, cy)  # undo the flip, then each turn
    for _ in range(k % 4):  # np.rot90 (counter-clockwise) shows image point (-v, u) at point (u, v)
        x, y = -y, x
    return x, y


def view_pixels(canvas_rgb: np.ndarray, dihedral: tuple[int, bool] = IDENTITY) -> np.ndarray:
    """Pixels of a canvas read as the view shows them: ``np.rot90`` k times, then the left-right flip (what
    ``view_to_canvas`` maps back)."""
    k, flip = dihedral
    out = np.rot90(canvas_rgb, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def read_box(reader: SlideReader, box: tuple[float, float, float], out_size: int,
             dihedral: tuple[int, bool] = IDENTITY) -> tuple[np.ndarray, Read]:
    """The pixels of a square box of the slide's (view of its) canvas, resized to ``out_size`` × ``out_size``.

    Reads from the coarsest pyramid level that still has at least ``out_size`` pixels across the box
    (``resolution.resolve``, as tiling and prediction do), only the part of the box inside the slide, and
    shrinks with ``resolution.resize_area``.

    Parameters
    ----------
    box : (cx, cy, half) in normalised view coordinates (see the module docstring)
    out_size : side of the returned image
    dihedral : the view's symmetry (k, flip)

    Returns
    -------
    rgb : (out_size, out_size, 3) uint8, white outside the slide
    read : the level, downsample and pixel counts of the read
    """
    cx, cy, half = (float(v) for v in box)
    if not half > 0:
        raise ValueError(f"{reader.path}: box half-size must be > 0, got {half}")
    cx, cy = view_to_canvas(cx, cy, dihedral)
    w, h = reader.dimensions
    side0 = max(w, h)
    ox, oy = (w - side0) / 2.0, (h - side0) / 2.0  # canvas origin in level-0 px (<= 0 on the padded axis)
    left, top = ox + (cx - half + 1) / 2 * side0, oy + (cy - half + 1) / 2 * side0
    extent = half * side0  # box side in level-0 px
    res = resolve(reader, downsample=extent / out_size)
    level, ds = res.level, res.level_downsample
    side = max(1, int(round(extent / ds)))  # box side in pixels of the level read
    canvas = np.full((side, side, 3), 255, np.uint8)
    # the part of the box inside the slide, in level-0 px, snapped to the level's pixel grid
    x0, y0 = max(left, 0.0), max(top, 0.0)
    x1, y1 = min(left + extent, float(w)), min(top + extent, float(h))
    pixels = 0
    if x1 > x0 and y1 > y0:
        c0, r0 = int(math.floor((x0 - left) / ds)), int(math.floor((y0 - top) / ds))
        c1, r1 = min(side, int(math.ceil((x1 - left) / ds))), min(side, int(math.ceil((y1 - top) / ds)))
        if c1 > c0 and r1 > r0:
            loc = (int(round(left + c0 * ds)), int(round(top + r0 * ds)))
            region = reader.read_region(loc, level, (c1 - c0, r1 - r0))
            canvas[r0:r1, c0:c1] = region
            pixels = (c1 - c0) * (r1 - r0)
    canvas = resize_area(canvas, (out_size, out_size))
    return view_pixels(canvas, dihedral), Read(level, ds, pixels, pixels * ds * ds)


def grey_filter(rgb: np.ndarray, tolerance: int = 15) -> np.ndarray:
    """MagNets' grey filter (§4.2) applied to an image: "grey" pixels (white background, gradients, artefacts;
    channel spread <= ``tolerance``) become black. (..., 3) uint8 -> same."""
    out = rgb.copy()
    out[~grey_filter_tissue(rgb, tolerance)] = 0
    return out


def tile_grid(reader: SlideReader, level: int, tile: int, min_tissue: float = 0.05,
              thumbnail: int = 1024) -> list[tuple[int, int]]:
    """Level-0 top-left corners of the tiles of ``level``'s ``tile`` × ``tile`` grid that hold at least
    ``min_tissue`` tissue (grey filter on a thumbnail): what tiling the slide's tissue at that level reads."""
    thumb = reader.thumbnail(thumbnail)
    tissue = grey_filter_tissue(thumb)
    w, h = reader.dimensions
    ds = float(reader.level_downsamples[level])
    step0 = tile * ds  # tile side in level-0 px
    sy, sx = tissue.shape[0] / h, tissue.shape[1] / w  # thumbnail px per level-0 px
    out = []
    for y in np.arange(0, h, step0):
        for x in np.arange(0, w, step0):
            r0, r1 = int(y * sy), max(int(y * sy) + 1, int(math.ceil(min(y + step0, h) * sy)))
            c0, c1 = int(x * sx), max(int(x * sx) + 1, int(math.ceil(min(x + step0, w) * sx)))
            if tissue[r0:r1, c0:c1].mean() >= min_tissue:
                out.append((int(x), int(y)))
    return out


def tiling_pixels(reader: SlideReader, level: int, tile: int = 224, min_tissue: float = 0.05) -> int:
    """Pixels that tiling the slide's tissue at ``level`` with ``tile``-px tiles reads (tiles × tile²)."""
    return len(tile_grid(reader, level, tile, min_tissue)) * tile * tile
