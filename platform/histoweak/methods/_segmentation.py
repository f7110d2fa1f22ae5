"""Pieces every segmentation method shares: pixel metrics over a split, a fixed set of tiles for figures."""

from __future__ import annotations

import numpy as np
import torch

from histoweak import metrics as M
from histoweak.data.schema import tile_keys

__all__ = ["FIGURE_TILES", "SegmentationMetrics", "images_uint8", "keep_fixed_tiles"]


class SegmentationMetrics:
    """Accumulates a pixel confusion matrix over batches; mIoU, fwIoU, per-class IoU."""

    def __init__(self, n_classes: int):
        self.cm = np.zeros((n_classes, n_classes), np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        self.cm += M.confusion_matrix(truth, pred, len(self.cm))

    def result(self, prefix: str, names: list[str] | None = None) -> dict[str, float]:
        iou = M.iou_per_class(self.cm)
        out = {f"{prefix}_miou": M.mean_iou(self.cm), f"{prefix}_fwiou": M.fw_iou(self.cm),
               f"{prefix}_miou_fg": float(np.nanmean(iou[1:])) if np.isfinite(iou[1:]).any() else float("nan"),
               f"{prefix}_pixel_acc": float(np.trace(self.cm) / max(self.cm.sum(), 1))}
        for c, v in enumerate(iou):
            out[f"{prefix}_iou_{names[c] if names else c}"] = float(v)
        return out


def images_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


#: tiles in the figures of both stages: the same tiles, so stage 2's pictures line up with stage 1's
FIGURE_TILES = 6


def keep_fixed_tiles(samples: dict[str, list], b: dict, tiles: dict[str, np.ndarray], k: int = FIGURE_TILES) -> None:
    """Keep in ``samples`` the ``k`` tiles with the smallest keys (slide, x, y) seen so far, batch ``b`` included.

    A fixed set of tiles for figures, whatever the batch order. ``tiles`` : per-tile values of ``b``, one
    row per tile (e.g. ``{"image": (N, H, W, 3) uint8, "mask": (N, H, W) uint8}``); ``samples`` holds a
    list per name, and the keys (``"<slide>:<x>:<y>"``) under ``key``. A batch without ``slide_id`` is skipped.
    """
    if "slide_id" not in b:
        return
    n = len(b["slide_id"])
    xs, ys = b.get("x", [0] * n), b.get("y", [0] * n)
    samples.setdefault("key", []).extend(tile_keys(b["slide_id"], xs, ys))
    for name, values in tiles.items():
        samples.setdefault(name, []).extend(values[i] for i in range(n))
    order = np.argsort(samples["key"], kind="stable")[:k]
    for name in samples:
        samples[name] = [samples[name][j] for j in order]


