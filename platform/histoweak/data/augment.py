"""Random augmentations on batches of uint8 images, as pure functions of (batch, rng).

Geometric transforms are applied to images and masks alike; colour jitter
to images only. Applied after any ``materialize()`` so each epoch differs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["colour_jitter", "flip_rot90", "augment_batch"]


def flip_rot90(images: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator):
    """Random horizontal flip, vertical flip and rotation by k·90° per sample (the dihedral group D4).

    Parameters
    ----------
    images : (N, H, W, C) uint8, H == W
    masks : (N, H, W) uint8 or None
    rng : numpy Generator

    Returns
    -------
    images, masks : same shapes, new arrays.
    """
    n = len(images)
    k = rng.integers(0, 4, n)
    flip = rng.random(n) < 0.5
    out_i = np.empty_like(images)
    out_m = None if masks is None else np.empty_like(masks)
    for i in range(n):
        img = np.rot90(images[i], k[i], axes=(0, 1))
        img = img[:, ::-1] if flip[i] else img
        out_i[i] = img
        if masks is not None:
            m = np.rot90(masks[i], k[i], axes=(0, 1))
            out_m[i] = m[:, ::-1] if flip[i] else m
    return out_i, out_m


def colour_jitter(images: np.ndarray, rng: np.random.Generator, brightness: float = 0.1, contrast: float = 0.1,
                  saturation: float = 0.1) -> np.ndarray:
    """Per-sample brightness, contrast and saturation scaling, each drawn from [1 - x, 1 + x].

    Parameters
    ----------
    images : (N, H, W, 3) uint8

    Returns
    -------
    (N, H, W, 3) uint8
    """
    n = len(images)
    x = images.astype(np.float32)
    b = rng.uniform(1 - brightness, 1 + brightness, (n, 1, 1, 1)).astype(np.float32)
    c = rng.uniform(1 - contrast, 1 + contrast, (n, 1, 1, 1)).astype(np.float32)
    s = rng.uniform(1 - saturation, 1 + saturation, (n, 1, 1, 1)).astype(np.float32)
    x *= b
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * c + mean
    grey = x.mean(axis=3, keepdims=True)
    x = (x - grey) * s + grey
    return np.clip(x, 0, 255).astype(np.uint8)


def augment_batch(batch: dict, seed: int | None = None, colour: bool = True) -> dict:
    """Flip/rot90 (images and masks) and colour jitter (images) on a decoded batch dict; a batch without images
    (a slide table's rows: the method reads and augments its own pixels) is returned as is."""
    if "image" not in batch:
        return batch
    rng = np.random.default_rng(seed)
    images, masks = flip_rot90(batch["image"], batch.get("mask"), rng)
    if colour:
        images = colour_jitter(images, rng)
    out = dict(batch)
    out["image"] = images
    if masks is not None:
        out["mask"] = masks
    return out
