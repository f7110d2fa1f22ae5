"""Tissue masks from RGB images, computed on a low-resolution level.

Every detector takes an RGB image and returns a boolean tissue mask of the
same height and width. ``tissue_mask`` picks one by name and applies the
shared clean-up (``remove_small_objects``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, morphology

__all__ = [
    "DETECTORS",
    "dark_background_tissue",
    "grey_filter_tissue",
    "otsu_tissue",
    "saturation_tissue",
    "tissue_mask",
]


def saturation_tissue(rgb: np.ndarray, threshold: float = 0.10, opening_radius: int = 2) -> np.ndarray:
    """HSV-saturation foreground (Ciga & Martel, appendix B.1).

    Pixels below ``threshold`` of the maximum possible saturation are
    background; holes are filled (ducts surrounded by stroma may be regions
    of interest), then a morphological opening removes salt-and-pepper noise.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
    threshold : float
        Fraction of the maximum saturation (the paper uses 0.10).
    opening_radius : int
        Radius of the disk used for the opening, in pixels of ``rgb``.

    Returns
    -------
    (h, w) bool
    """
    sat = color.rgb2hsv(rgb)[..., 1]
    fg = sat >= threshold
    fg = ndi.binary_fill_holes(fg)
    if opening_radius > 0:
        fg = morphology.opening(fg, morphology.disk(opening_radius))
    return fg


def grey_filter_tissue(rgb: np.ndarray, tolerance: int = 15) -> np.ndarray:
    """MagNets' grey filter (sec. 4.2): a pixel whose R, G, B lie within ``tolerance`` of each other is not tissue.

    This removes white background, grey gradients and scanner artefacts.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
    tolerance : int
        Largest channel spread of a "grey" pixel (the paper uses 15).

    Returns
    -------
    (h, w) bool
    """
    rgb = rgb.astype(np.int16)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return spread > tolerance


def otsu_tissue(rgb: np.ndarray) -> np.ndarray:
    """Otsu threshold on grey level; tissue is darker than the bright background.

    Parameters
    ----------
    rgb : (h, w, 3) uint8

    Returns
    -------
    (h, w) bool
    """
    grey = color.rgb2gray(rgb)
    if grey.max() - grey.min() < 1e-6:
        return np.zeros(grey.shape, bool)
    return grey < filters.threshold_otsu(grey)


def dark_background_tissue(rgb: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Tissue on a black background (the multimodal non-linear images of the GERNE paper).

    Parameters
    ----------
    rgb : (h, w, 3) uint8
    threshold : float or None
        Brightness (max channel, 0–255) above which a pixel is tissue; Otsu
        on the max channel when None.

    Returns
    -------
    (h, w) bool
    """
    bright = rgb.max(axis=-1).astype(np.float32)
    if threshold is None:
        if bright.max() - bright.min() < 1e-6:
            return np.zeros(bright.shape, bool)
        threshold = float(filters.threshold_otsu(bright))
    fg = bright > threshold
    return ndi.binary_fill_holes(fg)


DETECTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "saturation": saturation_tissue,
    "grey": grey_filter_tissue,
    "otsu": otsu_tissue,
    "dark": dark_background_tissue,
}


def tissue_mask(rgb: np.ndarray, method: str = "saturation", min_size: int = 64) -> np.ndarray:
    """Tissue mask by a named detector, with connected components under ``min_size`` pixels removed.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
    method : {"saturation", "grey", "otsu", "dark"}
    min_size : int
        Smallest object kept, in pixels of ``rgb`` (``skimage.morphology.remove_small_objects``).

    Returns
    -------
    (h, w) bool
    """
    try:
        detector = DETECTORS[method]
    except KeyError:
        raise ValueError(f"unknown tissue detector {method!r}; valid: {sorted(DETECTORS)}") from None
    fg = detector(rgb)
    if min_size > 0 and fg.any():
        # scikit-image >= 0.26: objects of at most max_size pixels are removed.
        fg = morphology.remove_small_objects(fg, max_size=min_size - 1)
    return fg


def background_seed(rgb: np.ndarray, grey: float = 200, min_size: int = 50, mode: str = "luminance") -> np.ndarray:
    """PSCL's background seed: near-white pixels in regions of at least ``min_size`` pixels.

    Colour thresholding plus ``remove_small_objects`` (thesis §4.3.2, after Kang et al. and
    Han et al.'s ``gen_bg_mask``); the region size keeps isolated bright pixels inside tissue
    from counting as background. The thesis uses ``min_size`` 200 (LUAD-HistoSeg) and 600 (BCSS-WSSS).

    mode : ``"luminance"`` — grey level (0.299 R + 0.587 G + 0.114 B) above ``grey``, as Han et al.'s
        ``gen_bg_mask`` thresholds; ``"rgb"`` — every channel above ``grey``: glass is bright in all three, while
        pale eosin (pink, bright in luminance) has a darker green channel and stays tissue.

    Parameters
    ----------
    rgb : (h, w, 3) or (n, h, w, 3) uint8

    Returns
    -------
    bool array of the same leading shape
    """
    if mode not in ("luminance", "rgb"):
        raise ValueError(f"background seed: mode must be 'luminance' or 'rgb', got {mode!r}")
    if rgb.ndim == 4:
        return np.stack([background_seed(x, grey, min_size, mode) for x in rgb])
    if mode == "rgb":
        white = (rgb[..., :3] > grey).all(-1)
    else:
        white = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) > grey
    if min_size > 1:
        white = morphology.remove_small_objects(white, max_size=min_size - 1, connectivity=1)
    return white
