"""One reader for whole-slide images (through OpenSlide) and plain images.

Coordinates follow OpenSlide: ``read_region`` takes the top-left corner in
level-0 pixels and a size in pixels of the requested level.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, UnidentifiedImageError

__all__ = ["MaskReader", "SlideError", "SlideReader", "cached_reader"]

# Plain images can be large; the decompression-bomb guard is for untrusted web input.
Image.MAX_IMAGE_PIXELS = None


class SlideError(RuntimeError):
    """A slide or mask that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class SlideReader:
    """Read a whole-slide image through OpenSlide, or a plain image through PIL.

    Parameters
    ----------
    path : str or Path
        SVS, NDPI, MRXS, pyramidal TIFF, … (anything OpenSlide opens), or a
        PNG/JPEG/TIFF without a pyramid (one level).

    Raises
    ------
    SlideError
        If the file is missing, truncated, corrupt or of an unsupported format.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(self.path, "file does not exist")
        try:
            self._slide = openslide.open_slide(str(self.path))
        except (openslide.OpenSlideUnsupportedFormatError, UnidentifiedImageError):
            raise SlideError(self.path, "unsupported format: neither OpenSlide nor PIL can open it") from None
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(self.path, f"corrupt or unreadable slide ({exc})") from None
        # ImageSlide defers decoding; force it so a truncated image fails here, by name.
        if isinstance(self._slide, openslide.ImageSlide):
            try:
                self._slide.read_region((0, 0), 0, (1, 1))
                self._image = self._slide._image  # noqa: SLF001 — PIL keeps it open either way
                self._image.load()
            except (OSError, ValueError, SyntaxError) as exc:
                raise SlideError(self.path, f"corrupt or truncated image ({exc})") from None
        #: pixels ``read_region`` returned, at the levels read / as level-0 area (their size times the level's
        #: downsample squared): what a method that reads only where it looks (MagNets) is measured by
        self.pixels_read = 0
        self.level0_pixels_read = 0.0

    # -- context management ---------------------------------------------------
    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    # -- geometry --------------------------------------------------------------
    @property
    def is_pyramidal(self) -> bool:
        return not isinstance(self._slide, openslide.ImageSlide)

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self._slide.dimensions

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    @property
    def mpp(self) -> float | None:
        """Micrometres per level-0 pixel (mean of x and y), or None when the file does not say."""
        props = self._slide.properties
        vals = [props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)]
        vals = [float(v) for v in vals if v not in (None, "")]
        if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
            return None
        return float(np.mean(vals))

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._slide.properties)

    def level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution level whose downsample is at least ``downsample`` (or the last level)."""
        for level, ds in enumerate(self.level_downsamples):
            if ds >= downsample * 0.999:
                return level
        return self.level_count - 1

    # -- pixels ----------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB pixels of a region.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in level-0 pixels.
        level : int
        size : (width, height)
            In pixels of ``level``.

        Returns
        -------
        (height, width, 3) uint8
            Pixels outside the slide are white.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} out of range (slide has {self.level_count})")
        try:
            rgba = np.asarray(self._slide.read_region(tuple(map(int, location)), level, tuple(map(int, size))))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(self.path, f"read failed at {tuple(location)} level {level} ({exc})") from None
        self.pixels_read += int(size[0]) * int(size[1])
        self.level0_pixels_read += int(size[0]) * int(size[1]) * float(self.level_downsamples[level]) ** 2
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() < 255:  # transparent = outside the scanned area: show it as background
            rgb = rgb.copy()
            rgb[alpha == 0] = 255
        return np.ascontiguousarray(rgb)

    def read_level(self, level: int) -> np.ndarray:
        """Whole level as (height, width, 3) uint8; meant for low-resolution levels."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """(h, w, 3) uint8 thumbnail whose longer side is at most ``max_size``."""
        return np.asarray(self._slide.get_thumbnail((max_size, max_size)).convert("RGB"))

    def __repr__(self) -> str:
        return f"SlideReader({str(self.path)!r}, levels={self.level_count}, dims={self.dimensions})"


_OPEN: "OrderedDict[str, SlideReader]" = OrderedDict()


def cached_reader(path: str | Path, max_open: int = 32) -> SlideReader:
    """A ``SlideReader`` of ``path`` kept open in this process (least recently used closed beyond ``max_open``).

    For models that read regions of many slides step after step (MagNets, attention-MIL): a worker opens each
    slide once, not once per read. Its pixel counters accumulate over the process's reads.
    """
    key = str(Path(path).resolve())
    reader = _OPEN.pop(key, None) or SlideReader(key)
    _OPEN[key] = reader
    while len(_OPEN) > max_open:
        _OPEN.popitem(last=False)[1].close()
    return reader


class MaskReader:
    """A class-index mask (single-channel uint8) aligned to a slide.

    The mask is stored at the slide's level-0 size or at a lower resolution;
    its downsample follows from the size ratio and must be the same along x
    and y. Multi-page (pyramidal) TIFF masks use the page closest to the
    resolution asked for, so tiling at a low level never loads level 0.

    Parameters
    ----------
    path : str or Path
        TIFF (tiled/pyramidal or not) or PNG.
    slide_dimensions : (width, height)
        Level-0 size of the slide the mask belongs to.
    """

    def __init__(self, path: str | Path, slide_dimensions: tuple[int, int]):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(self.path, "mask file does not exist")
        self.slide_dimensions = tuple(int(v) for v in slide_dimensions)
        self._pages = self._list_pages()
        w0, h0 = self.slide_dimensions
        mw, mh = self._pages[0][0]
        dsx, dsy = w0 / mw, h0 / mh
        # A mask may be rounded to whole pixels at its own resolution: allow one pixel of slack.
        if abs(w0 / dsy - mw) > 1.0 or abs(h0 / dsx - mh) > 1.0 or dsx < 0.999:
            raise SlideError(
                self.path,
                f"mask of the wrong size: {mw}x{mh} does not match slide {w0}x{h0} "
                f"at any single downsample (x {dsx:.4g}, y {dsy:.4g})",
            )
        self.downsample = float((dsx + dsy) / 2)

    def _list_pages(self) -> list[tuple[tuple[int, int], int]]:
        """[((width, height), page index)] for every single-channel page, largest first."""
        suffix = self.path.suffix.lower()
        try:
            if suffix in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(self.path) as tif:
                    pages = [(p.imagewidth, p.imagelength, i, p.samplesperpixel, p.dtype) for i, p in enumerate(tif.pages)]
                good = [((w, h), i) for w, h, i, spp, dt in pages if spp == 1 and dt == np.uint8]
                if not good:
                    raise SlideError(self.path, "mask must be a single-channel uint8 class-index image")
                return sorted(good, key=lambda p: -p[0][0])
            with Image.open(self.path) as im:
                if im.mode not in ("L", "P"):
                    raise SlideError(self.path, f"mask must be a single-channel class-index image, got mode {im.mode}")
                return [(im.size, 0)]
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 — any decoder failure is a bad mask
            raise SlideError(self.path, f"corrupt or unreadable mask ({exc})") from None

    def read(self, downsample: float = 1.0) -> tuple[np.ndarray, float]:
        """The mask at the coarsest stored resolution that is at least as fine as ``downsample``.

        Returns
        -------
        mask : (h, w) uint8
        mask_downsample : float
            Level-0 pixels per mask pixel (mean of x and y).
        """
        w0 = self.slide_dimensions[0]
        chosen = self._pages[0]
        for size, idx in self._pages:
            if w0 / size[0] <= downsample * 1.001:
                chosen = (size, idx)
        (w, h), idx = chosen
        try:
            if self.path.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                arr = tifffile.imread(self.path, key=idx)
            else:
                with Image.open(self.path) as im:
                    arr = np.asarray(im)
        except Exception as exc:  # noqa: BLE001
            raise SlideError(self.path, f"corrupt or unreadable mask ({exc})") from None
        if arr.shape != (h, w):
            raise SlideError(self.path, f"mask page {idx} has shape {arr.shape}, expected {(h, w)}")
        ds = (self.slide_dimensions[0] / w + self.slide_dimensions[1] / h) / 2
        return np.ascontiguousarray(arr, dtype=np.uint8), float(ds)
