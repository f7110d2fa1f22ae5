"""Macenko stain normalisation to one reference tile (Ciga & Martel §2.3; Macenko et al. 2009), with torchstain.

A platform-wide option of the stream (``TrainConfig.stain_norm``): the driver picks one reference tile
from the training split (``pick_reference``), fits the reference stain matrix and maximum concentrations
on it (``fit_reference``), and every image the run sees — training, validation, test, sampled batches —
is normalised to it (``normalize_images``), in the Ray Data tasks that decode them.

Tiles without enough stained pixels for the method (nearly white, or a single stain) cannot be
normalised; they are left as they are and counted, never dropped.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["fit_reference", "normalize_images", "pick_reference"]


def _normalizer(reference: dict | None = None):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    n = NumpyMacenkoNormalizer()
    if reference is not None:
        n.HERef = np.asarray(reference["he"], np.float64)
        n.maxCRef = np.asarray(reference["max_c"], np.float64)
    return n


def fit_reference(image: np.ndarray) -> dict[str, list]:
    """The reference stain vectors (3, 2) and 99th-percentile concentrations (2,) of an (H, W, 3) uint8 tile,
    as JSON-able lists ``{"he": ..., "max_c": ...}``.

    Raises
    ------
    ValueError
        The tile has too few stained pixels to estimate two stains.
    """
    n = _normalizer()
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an unstained tile: handled below
            n.fit(np.ascontiguousarray(image))
    except (ValueError, np.linalg.LinAlgError, IndexError) as exc:
        raise ValueError(f"stain reference: cannot fit Macenko stains on this tile ({exc})") from None
    if not (np.isfinite(n.HERef).all() and np.isfinite(n.maxCRef).all()):
        raise ValueError("stain reference: cannot fit Macenko stains on this tile (non-finite stain matrix)")
    return {"he": n.HERef.tolist(), "max_c": np.asarray(n.maxCRef).tolist()}


def normalize_images(images: np.ndarray, reference: dict) -> tuple[np.ndarray, int]:
    """Each (H, W, 3) uint8 image of ``images`` (N, H, W, 3) normalised to ``reference`` (``fit_reference``).

    Returns the normalised images (uint8, new array) and how many were left unchanged because their own
    stains could not be estimated.
    """
    n = _normalizer(reference)
    out = np.empty_like(images)
    skipped = 0
    for i, img in enumerate(images):
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an unstained tile: kept as it is, counted
                norm, _, _ = n.normalize(np.ascontiguousarray(img), stains=False)
            if not np.isfinite(norm).all():
                raise ValueError("non-finite")
            out[i] = np.clip(norm, 0, 255).astype(np.uint8)
        except (ValueError, np.linalg.LinAlgError, IndexError):
            out[i] = img
            skipped += 1
    return out, skipped


def pick_reference(tissue_ratio: np.ndarray, keys: list[str]) -> int:
    """Index of the reference tile: the most tissue, ties broken by the smallest key (``slide:x:y``), so the
    choice depends on the training split only, never on the order rows arrive in."""
    order = sorted(range(len(keys)), key=lambda i: (-float(tissue_ratio[i]), keys[i]))
    if not order:
        raise ValueError("stain reference: the training split has no tiles")
    return order[0]
