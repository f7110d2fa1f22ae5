"""What whole-slide methods share (MagNets, and the baselines of its Table 1): a slide table in, slide labels out,
pixels read counted per slide, AUROC overall and per metastasis size class.

A whole-slide method declares ``table = "slides"``: its runs stream a slide table (``data.slide_table``), one
row per slide (``slide_id``, ``path``, ``label``, ``size_class``), and it reads the pixels it needs itself,
through ``slides.reader.cached_reader`` (one open reader per slide and worker process) and
``slides.regions.read_box``. A subclass implements ``forward_slides(batch, record)``; this base turns it into
the contract's loss, predictions and split metrics:

- ``val/test_auroc`` and ``_auroc_<size class>`` (``metrics.auroc_by_size_class``);
- ``_pixels_read_per_slide`` (pixels taken from the file, at the levels read), ``_level0_pixels_per_slide``,
  ``_tiling_pixels_per_slide`` (what tiling the slide's tissue at the finest level the method read would take,
  224-px tiles; ``slides.regions.tiling_pixels``) and ``_pixels_ratio`` (tiling / read, ratio of the sums);
- ``_seconds_per_slide`` (wall time of the forward pass, reads included).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from histoweak import metrics as M
from histoweak.methods.base import Method
from histoweak.slides.reader import cached_reader
from histoweak.slides.regions import tiling_pixels

__all__ = ["WholeSlideMethod", "slide_batch_size"]

#: tile side of the tiling that a method's pixels read are compared with
TILING_TILE = 224


def slide_batch_size(batch: dict) -> int:
    return len(batch["path"])


class WholeSlideMethod(Method):
    """Base of methods that read slides, not tiles (see the module docstring)."""

    table: ClassVar[str] = "slides"
    selection_metric: ClassVar[str] = "val_auroc"
    headline_metrics: ClassVar[tuple[str, ...]] = ("test_auroc", "test_auroc_macro", "test_auroc_micro",
                                                   "test_auroc_itc", "test_pixels_ratio")

    @classmethod
    def supports(cls, task) -> bool:
        return task.target == "label"  # one label per slide

    # -- to implement -------------------------------------------------------------------------------
    def forward_slides(self, batch: dict, record: bool = False) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """(logits (B, n_outputs), one record per slide). A record holds at least ``finest_level`` (the finest
        pyramid level read for it), and ``pixels`` / ``level0_pixels`` / ``seconds`` when the method does not read
        the slide in this call (cached features: what their first reading took); with ``record`` it may hold what the method's figures need."""
        raise NotImplementedError

    # -- the contract -------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits, _ = self.forward_slides(batch)
        return F.cross_entropy(logits, self.task.targets(batch)), {}

    def forward(self, batch: dict) -> torch.Tensor:
        return self.forward_slides(batch)[0]

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        self.eval()
        return self.forward_slides(batch)[0].softmax(1)

    @torch.no_grad()
    def evaluate_batches(self, batches, prefix: str) -> tuple[dict[str, float], dict]:
        """Slide-level metrics over a split, pixels read counted by the readers, and the per-slide records
        (``pred``: targets, probs, slide_id, path, size_class, pixels, records) for ``test_figures``."""
        self.eval()
        pred: dict[str, list] = {k: [] for k in ("targets", "probs", "slide_id", "path", "size_class", "pixels",
                                                 "level0_pixels", "tiling_pixels", "seconds", "records")}
        for batch in batches:
            readers = [cached_reader(p) for p in batch["path"]]
            before = [(r.pixels_read, r.level0_pixels_read) for r in readers]
            t0 = time.perf_counter()
            logits, records = self.forward_slides({k: (v.to(self.device) if torch.is_tensor(v) else v)
                                                   for k, v in batch.items()}, record=True)
            seconds = (time.perf_counter() - t0) / len(readers)
            pred["targets"].append(self.task.targets(batch).cpu().numpy())
            pred["probs"].append(logits.softmax(1).float().cpu().numpy())
            for r, (p0, l0), rec, sid, path, size in zip(readers, before, records, batch["slide_id"], batch["path"],
                                                         batch.get("size_class") or [None] * len(readers)):
                # a method that caches what it read (frozen features) says what the reads took
                pred["pixels"].append(rec.get("pixels", r.pixels_read - p0))
                pred["level0_pixels"].append(rec.get("level0_pixels", r.level0_pixels_read - l0))
                pred["tiling_pixels"].append(tiling_pixels(r, rec["finest_level"], TILING_TILE))
                pred["seconds"].append(rec.get("seconds", seconds))  # cached: the first reading's time
                pred["slide_id"].append(sid)
                pred["path"].append(path)
                pred["size_class"].append(size or "unknown")
                pred["records"].append(rec)
        if not pred["probs"]:
            return {}, {}
        out = {k: (np.concatenate(v) if k in ("targets", "probs") else
                   v if k == "records" else np.asarray(v, dtype=object if k in ("slide_id", "path", "size_class")
                                                        else np.float64))
               for k, v in pred.items()}
        return self.slide_metrics(out, prefix), out

    @staticmethod
    def slide_metrics(pred: dict, prefix: str) -> dict[str, float]:
        """The split's metrics from ``evaluate_batches``' predictions (see the module docstring)."""
        y, p = pred["targets"], pred["probs"][:, 1]
        out = {f"{prefix}_{'auroc' if k == 'all' else 'auroc_' + k}": v
               for k, v in M.auroc_by_size_class(y, p, pred["size_class"]).items()}
        out[f"{prefix}_acc"] = M.accuracy(y, pred["probs"].argmax(1))
        out[f"{prefix}_bca"] = M.balanced_accuracy(y, pred["probs"].argmax(1))
        out[f"{prefix}_pixels_read_per_slide"] = float(np.mean(pred["pixels"]))
        out[f"{prefix}_level0_pixels_per_slide"] = float(np.mean(pred["level0_pixels"]))
        out[f"{prefix}_tiling_pixels_per_slide"] = float(np.mean(pred["tiling_pixels"]))
        out[f"{prefix}_pixels_ratio"] = float(np.sum(pred["tiling_pixels"]) / max(np.sum(pred["pixels"]), 1))
        out[f"{prefix}_seconds_per_slide"] = float(np.mean(pred["seconds"]))
        return out

    @classmethod
    def test_figures(cls, pred: dict, run, class_names) -> dict[str, Any]:
        """AUROC per size class and pixels read per slide against tiling (``figures.slide_metric_figures``)."""
        from histoweak import figures

        return figures.slide_metric_figures(pred)

    @classmethod
    def sweep_figures(cls, train: dict, swept: dict, tile_table: str, n_classes: int):
        """Slides per split and size class (a table on the sweep's run)."""
        from histoweak.data.slide_table import read_slide_table

        rows: dict[tuple[str, str], int] = {}
        for r in read_slide_table(tile_table):
            key = (r["split"], r.get("size_class") or "unknown")
            rows[key] = rows.get(key, 0) + 1
        table = [{"split": s, "size_class": c, "slides": n} for (s, c), n in sorted(rows.items())]
        return {}, {"slide_counts": table}
