"""GERNE: gradient extrapolation for debiased learning (Asaad et al., ICCV 2025), as applied to
patch-wise tumour classification against the tissue-size shortcut.

Each step draws two batches from the training split's groups (y, a), a = [r_tissue >= tau]
(``histoweak.methods.base.tissue_groups``), both with classes balanced, p(y) = 1/K (Alg. 1, Eq. 2):

- the biased batch B_b keeps each class's own group shares alpha_ya (the within-class share of group a);
- the less-biased batch B_lb blends them towards uniform with ``c`` (Eq. 4):
  (1 - c) alpha_ya + c / A, A the groups of class y (2 here).

The step follows the extrapolated gradient g_ext = g_lb + beta (g_lb - g_b), the gradient of
``gerne_loss(L_lb, L_b, beta) = (1 + beta) L_lb - beta L_b`` (one backward pass). B_b and B_lb go through the
network in two forward passes, as Alg. 1 computes the two losses: each is normalised by its own BatchNorm
statistics. (A single forward of their concatenation would share the statistics and compute another pair of
gradients; it is not offered.) Measured (``benchmarks/gerne_bn_audit.py``, EfficientNet-Lite0, SGD lr 0.01,
c = 0.5, beta = 1, i.e. k = 1, the group weights of resampling in expectation): with per-batch statistics L_b
climbs from 0.5 to 17 within 60 steps; with one joint forward it peaks at 9; with BatchNorm frozen (eval mode) it
stays at 0.7 without learning. The -beta L_b term is an ascent on the samples of B_b: cross-entropy's gradient
vanishes on the samples it fits but not on those it is pushed to misfit, and per-batch statistics give the
network one more way to tell B_b from B_lb.

In expectation the effective group weights are alpha_ya + k (1/A - alpha_ya) with k = c (beta + 1): k = 0 is
ERM on class-balanced batches, k = 1 (c = 1, beta = 0; or c = 0.5, beta = 1) is group-balanced resampling, and
k > 1 extrapolates past it. Past k_max = alpha_max / (alpha_max - 1/A) the over-represented group of some class
gets a negative weight (gradient ascent on it), which the paper reports as divergence; its Eq. 9 bound is
``beta_bound``: beta_max = alpha_max / (c (alpha_max - 1/A)) - 1, computed from the training split's group
counts in ``data_plan`` (logged as ``data.beta_max``). A beta beyond it is refused before training; a sweep's
beta values beyond it are dropped with a printed line (``check_sweep``).

Defaults follow the papers: ResNet-50 (give ImageNet weights as a local state-dict path, ``weights:
/path/resnet50.pth``), one linear layer with two outputs, cross-entropy, SGD with momentum 0.9 and weight decay
0.01 (ICCV paper, §4.1.1). Model selection by validation WGA.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from histoweak.methods.base import DataPlan, RunInfo, Stream, Task, register_method
from histoweak.methods.erm import ERM

__all__ = ["GERNE", "batch_weights", "beta_bound", "gerne_loss", "within_class_shares"]


def gerne_loss(loss_lb: torch.Tensor, loss_b: torch.Tensor, beta: float) -> torch.Tensor:
    """The GERNE objective ``(1 + beta) * loss_lb - beta * loss_b``.

    Its gradient is the extrapolated gradient g_lb + beta * (g_lb - g_b), so a
    single backward pass through it replaces two backward passes and a
    gradient combination. ``beta = 0`` is training on the less-biased batch;
    ``beta > 0`` extrapolates away from the biased direction; ``-1 < beta < 0``
    interpolates towards it (``beta = -1`` is training on the biased batch).

    Parameters
    ----------
    loss_lb : scalar loss on the less-biased batch
    loss_b : scalar loss on the biased batch, computed by the same model
    beta : extrapolation factor
    """
    return (1.0 + beta) * loss_lb - beta * loss_b


def within_class_shares(counts: dict[int, int]) -> dict[int, float]:
    """alpha_ya: each group's share of its class, groups indexed ``2 * y + a`` (``tissue_groups``).

    counts : group -> rows (groups without rows may be left out or given as 0)
    """
    totals: dict[int, int] = {}
    for g, n in counts.items():
        totals[g // 2] = totals.get(g // 2, 0) + n
    return {g: n / totals[g // 2] for g, n in counts.items() if n > 0}


def batch_weights(counts: dict[int, int], c: float) -> dict[int, float]:
    """Group shares of a batch with classes balanced, p(y) = 1/K, and within class (1 - c) alpha_ya + c / A_y
    (Eq. 2, 4): ``c = 0`` is GERNE's biased batch B_b, ``c > 0`` its less-biased batch B_lb (c = 1: groups uniform
    within each class). A_y counts the groups of class y that have rows; the shares sum to 1."""
    alpha = within_class_shares(counts)
    classes = sorted({g // 2 for g in alpha})
    groups_of = {y: [g for g in alpha if g // 2 == y] for y in classes}
    return {g: ((1.0 - c) * a + c / len(groups_of[g // 2])) / len(classes) for g, a in alpha.items()}


def beta_bound(counts: dict[int, int], c: float) -> float:
    """The largest beta at which no group's effective weight alpha_ya + c (beta + 1) (1/A_y - alpha_ya) is negative
    (Eq. 9: beta_max = alpha_max / (c (alpha_max - 1/A)) - 1); ``inf`` when ``c = 0`` or every class's groups are
    equally represented (extrapolating then changes no weight's sign)."""
    alpha = within_class_shares(counts)
    size = {y: sum(1 for g in alpha if g // 2 == y) for y in {g // 2 for g in alpha}}
    bound = math.inf
    for g, a in alpha.items():
        u = 1.0 / size[g // 2]
        if c > 0 and a > u + 1e-12:
            bound = min(bound, a / (c * (a - u)) - 1.0)
    return bound


def _group_counts(run: RunInfo) -> dict[int, int]:
    """Rows of the training split per group (y, [r_tissue >= run.group_tau]), read in the driver."""
    task = Task(run.target, run.n_classes)
    meta = run.meta(["label" if run.target == "label" else "labels", "tissue_ratio"])
    groups = task.groups(meta, run.group_tau)
    values, n = np.unique(groups, return_counts=True)
    return {int(g): int(k) for g, k in zip(values, n)}


@register_method("gerne")
class GERNE(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        backbone: str = "resnet50"
        weights: str | None = None  # the paper's ImageNet ResNet-50: give its state-dict path
        optimizer: str | None = "sgd"  # the paper's SGD, momentum 0.9 ...
        weight_decay: float = 0.01  # ... and weight decay 0.01 (ICCV paper, §4.1.1)
        beta: float = 1.5  # extrapolation factor (Eq. 9 bounds it from above: ``beta_bound``)
        c: float = 0.5  # B_lb's within-class group shares: (1 - c) alpha + c / A (0: as B_b, 1: uniform)

        def __post_init__(self):
            super().__post_init__()
            if not 0.0 <= self.c <= 1.0:
                raise ValueError(f"method 'gerne': c must be in [0, 1], got {self.c}")
            if self.beta < -1.0:
                raise ValueError(f"method 'gerne': beta must be >= -1 (-1: the biased batch alone), got {self.beta}")

    selection_metric = "val_wga"
    headline_metrics = ("test_wga", "test_bca")
    needs_groups = True

    @classmethod
    def supports(cls, task) -> bool:
        return task.target.startswith("class:") or task.target == "label"  # binary: tumour present or not (eq. 3)

    @classmethod
    def data_plan(cls, hparams, run: RunInfo) -> DataPlan:
        """B_b (the main batch) and B_lb (``batch["balanced"]``), both drawn per group; an epoch is as many steps as
        one pass over the training split at ``batch_size``. Refuses a beta beyond ``beta_bound`` on this split."""
        counts = _group_counts(run)
        bound = beta_bound(counts, hparams.c)
        if hparams.beta > bound:
            raise ValueError(f"method 'gerne': beta {hparams.beta:g} is beyond its bound {bound:.3f} at c = "
                             f"{hparams.c:g} on this training split (group_tau {run.group_tau:g}, rows per group "
                             f"{counts}): some group would get a negative weight (Eq. 9); use beta <= {bound:.3f}")
        groups = functools.partial(Task(run.target, run.n_classes).groups, tau=run.group_tau)
        state = {"beta_max": bound if math.isfinite(bound) else "inf", "k": hparams.c * (hparams.beta + 1.0),
                 **{f"group_count_{g}": n for g, n in sorted(counts.items())}}
        return DataPlan(main=Stream(groups), extra={"balanced": Stream(groups)},
                        steps_per_epoch=max(1, sum(counts.values()) // run.batch_size), state=state)

    @classmethod
    def check_sweep(cls, fixed: dict[str, Any], params: dict[str, dict], run_for: Callable[[dict], RunInfo]
                    ) -> dict[str, dict]:
        """Drop the values of a swept ``hparams.beta`` beyond the smallest bound over the sweep's c and group_tau
        values (a printed line says which); a fixed beta beyond it, or nothing left, is refused."""
        def values(key: str, default):
            spec = params.get(key)
            if spec is None:
                return [fixed.get(key, default)]
            kind, v = next(iter(spec.items()))
            return list(v) if kind in ("grid", "choice") else [v[0], v[1]]  # a range: its ends

        cs = values("hparams.c", cls.Hparams.c)
        taus = values("train.group_tau", None)
        bound = math.inf
        for tau in taus:
            counts = _group_counts(run_for({"group_tau": tau}))
            bound = min(bound, *(beta_bound(counts, float(c)) for c in cs))
        spec = params.get("hparams.beta")
        if spec is None:
            beta = float(fixed.get("hparams.beta", cls.Hparams.beta))
            if beta > bound:
                raise ValueError(f"method 'gerne': beta {beta:g} is beyond its bound {bound:.3f} (Eq. 9) for c in "
                                 f"{cs} and group_tau in {taus}; use beta <= {bound:.3f}")
            return params
        kind, v = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            kept = [b for b in v if b <= bound]
            if not kept:
                raise ValueError(f"method 'gerne': every swept beta {list(v)} is beyond its bound {bound:.3f} "
                                 f"(Eq. 9) for c in {cs} and group_tau in {taus}")
            if len(kept) < len(v):
                print(f"histoweak: gerne: beta values {[b for b in v if b > bound]} dropped: beyond the bound "
                      f"{bound:.3f} (Eq. 9) for c in {cs} and group_tau in {taus}")
            return {**params, "hparams.beta": {kind: kept}}
        lo, hi = v
        if lo > bound:
            raise ValueError(f"method 'gerne': the swept beta range [{lo}, {hi}] is beyond its bound {bound:.3f}")
        if hi > bound:
            print(f"histoweak: gerne: beta range [{lo}, {hi}] clipped to [{lo}, {bound:.3f}] (Eq. 9 bound)")
            return {**params, "hparams.beta": {kind: [lo, bound]}}
        return params

    def stream_weights(self, key: str, counts: dict[int, int]) -> dict[int, float]:
        """B_b (main, key ""): classes balanced, each class's own group shares; B_lb: blended with ``c``."""
        return batch_weights(counts, self.hparams.c if key == "balanced" else 0.0)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        lb = batch["balanced"]
        loss_b = self.criterion(self(batch["image"]), self.task.targets(batch))  # two forward passes (Alg. 1)
        loss_lb = self.criterion(self(lb["image"]), self.task.targets(lb))
        loss = gerne_loss(loss_lb, loss_b, self.hparams.beta)
        return loss, {"loss_b": float(loss_b.detach()), "loss_lb": float(loss_lb.detach())}
