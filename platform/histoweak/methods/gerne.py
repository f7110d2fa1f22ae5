"""GERNE: gradient extrapolation for debiased learning (Asaad et al., ICCV 2025), as applied to
patch-wise tumour classification against the tissue-size shortcut.

Each step sees a biased batch B_b (tiles as they come) and a less-biased
batch B_lb (drawn per group (y, [r_tissue >= tau]), see
``histoweak.methods.base.tissue_groups``) and follows the extrapolated
gradient g_ext = g_lb + beta * (g_lb - g_b). That is the gradient of
``gerne_loss(L_lb, L_b, beta) = (1 + beta) * L_lb - beta * L_b``, so one
backward pass gives it.

BatchNorm: both batches go through the network in *one* forward pass (their
concatenation), so they are normalised with the same batch statistics and
g_b, g_lb are gradients of the same function — the premise of the
extrapolation — and the running statistics are updated once per step, over
both batches. (Two forward passes would normalise each batch by its own
statistics: two different functions.) ``fused=False`` keeps the naive
variant — two forward and two backward passes, gradients combined by hand —
for comparison (``benchmarks/bench_gerne_step.py``).

Batch construction: ``blend`` mixes the group shares of B_lb between the
data's own (0: B_lb is distributed like B_b) and uniform over the groups
(1: group-balanced, the default), as the GERNE paper's construction allows.

Defaults follow the patch-wise paper: ResNet-50, one linear layer with two
outputs, cross-entropy; give ImageNet weights as a local state-dict path
(``weights: /path/resnet50.pth``). Model selection by validation WGA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from histoweak.methods.base import (DataPlan, RunInfo, Stream, Task, average_gradients, check_finite_loss,
                                    register_method)
from histoweak.methods.erm import ERM

__all__ = ["GERNE", "gerne_loss"]


def gerne_loss(loss_lb: torch.Tensor, loss_b: torch.Tensor, beta: float) -> torch.Tensor:
    """The GERNE objective ``(1 + beta) * loss_lb - beta * loss_b``.

    Its gradient is the extrapolated gradient g_lb + beta * (g_lb - g_b), so a
    single backward pass through it replaces two backward passes and a
    gradient combination. ``beta = 0`` is training on the less-biased batch;
    ``beta > 0`` extrapolates away from the biased direction; ``-1 < beta < 0``
    interpolates towards it (``beta = -1`` is training on the biased batch).

    Parameters
    ----------
    loss_lb : scalar loss on the less-biased (group-balanced) batch
    loss_b : scalar loss on the biased batch, computed by the same model
    beta : extrapolation factor
    """
    return (1.0 + beta) * loss_lb - beta * loss_b


@register_method("gerne")
class GERNE(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        backbone: str = "resnet50"
        weights: str | None = None  # the paper's ImageNet ResNet-50: give its state-dict path
        beta: float = 1.0  # extrapolation factor
        blend: float = 1.0  # B_lb group shares: 0 = the data's, 1 = uniform over groups
        fused: bool = True  # one backward pass through gerne_loss; False = the naive two-pass step

        def __post_init__(self):
            if not 0.0 <= self.blend <= 1.0:
                raise ValueError(f"method 'gerne': blend must be in [0, 1], got {self.blend}")

    selection_metric = "val_wga"
    headline_metrics = ("test_wga", "test_bca")
    needs_groups = True

    @classmethod
    def supports(cls, task) -> bool:
        return task.target.startswith("class:") or task.target == "label"  # binary: tumour present or not (eq. 3)

    @classmethod
    def data_plan(cls, hparams, run: RunInfo) -> DataPlan:
        """B_b is the plain stream; B_lb (``batch["balanced"]``) is drawn per group (y, [r_tissue >= tau])."""
        groups = functools.partial(Task(run.target, run.n_classes).groups, tau=run.group_tau)
        return DataPlan(extra={"balanced": Stream(groups)})

    def stream_weights(self, key: str, counts: dict[int, int]) -> dict[int, float]:
        """B_lb's group shares: ``blend`` between the data's own shares (0) and uniform over groups (1)."""
        total = sum(counts.values())
        k = len(counts)
        return {g: self.hparams.blend / k + (1.0 - self.hparams.blend) * n / total for g, n in counts.items()}

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        lb = batch["balanced"]
        n_b = len(batch["image"])
        logits = self(torch.cat([batch["image"], lb["image"]]))  # one forward: shared BatchNorm statistics
        loss_b = self.criterion(logits[:n_b], self.task.targets(batch))
        loss_lb = self.criterion(logits[n_b:], self.task.targets(lb))
        loss = gerne_loss(loss_lb, loss_b, self.hparams.beta)
        return loss, {"loss_b": float(loss_b.detach()), "loss_lb": float(loss_lb.detach())}

    def step(self, batch: dict) -> dict[str, float]:
        if self.hparams.fused:
            return super().step(batch)
        return self._naive_step(batch)

    def _naive_step(self, batch: dict) -> dict[str, float]:
        """Two forward and two backward passes, g_lb + beta (g_lb - g_b) assembled by hand (for comparison)."""
        self.train()
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self.parameters() if p.requires_grad]
        lb = batch["balanced"]
        loss_lb = self.criterion(self(lb["image"]), self.task.targets(lb))
        g_lb = torch.autograd.grad(loss_lb, params, allow_unused=True)
        loss_b = self.criterion(self(batch["image"]), self.task.targets(batch))
        g_b = torch.autograd.grad(loss_b, params, allow_unused=True)
        beta = self.hparams.beta
        loss = gerne_loss(loss_lb.detach(), loss_b.detach(), beta)
        check_finite_loss(loss, self.name)  # as Method.step: refuse before any gradient reaches the weights
        for p, a, b in zip(params, g_lb, g_b):
            if a is not None:
                p.grad = a + beta * (a - b) if b is not None else (1 + beta) * a
        average_gradients(self)
        self.optimizer.step()
        return {"loss": float(loss), "loss_b": float(loss_b.detach()), "loss_lb": float(loss_lb.detach())}
