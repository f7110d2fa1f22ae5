"""ERM: empirical risk minimisation — the baseline every method is measured against.

Patch classification with a timm backbone and a linear head: softmax
cross-entropy for single-label tasks, ``MultiLabelSoftMarginLoss`` for
multi-label ones.

Batch mixing baselines (``mix``; single-label targets only), through timm, applied to each training batch in
``ERM._loss`` (USegMix's Fig. 1 compares against them):

- ``"mixup"`` (Zhang et al. 2018): every image becomes ``lam * x_i + (1 - lam) * x_j`` and its target
  ``lam * onehot(y_i) + (1 - lam) * onehot(y_j)``, ``lam ~ Beta(mix_alpha, mix_alpha)`` once per batch, ``j``
  the batch reversed (timm's ``Mixup``, mode "batch"); soft-target cross-entropy (timm's
  ``SoftTargetCrossEntropy``).
- ``"cutmix"`` (Yun et al. 2019): a box of the reversed batch's image is pasted into each image; the target
  mass of the pasted image is the box's share of the image (timm corrects ``lam`` for boxes clipped at the
  border).
- ``"cutout"`` (DeVries & Taylor 2017, as timm's ``RandomErasing``, mode "const"): with probability
  ``cutout_prob`` a random box of 2-33 % of each image is set to 0; targets unchanged. timm expects
  normalised images, where 0 is the mean colour; histoweak's batches are in [0, 1] (no normalisation), so the
  box is black.

timm's ``Mixup`` pairs a batch with its reverse and needs an even size: in an odd batch the last image is left
unmixed (one-hot target). Mixing applies where ERM's loss runs: a subclass that replaces ``_loss`` (GERNE) fails
at build with ``mix`` set, rather than silently not mixing. Evaluation never mixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from histoweak.methods.base import Hparams, Method, register_method
from histoweak.models.backbones import create_backbone

__all__ = ["ERM", "MIX_MODES"]

#: values of ERM's ``mix`` hyperparameter
MIX_MODES = ("none", "cutout", "mixup", "cutmix")


@register_method("erm")
class ERM(Method):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        dropout: float = 0.0
        mix: str = "none"  # batch mixing baseline: one of MIX_MODES (see the module docstring)
        mix_alpha: float = 1.0  # mixup / cutmix: lam ~ Beta(mix_alpha, mix_alpha)
        cutout_prob: float = 1.0  # cutout: probability that an image gets an erased box

        def __post_init__(self):
            _check_mix(self)

    @classmethod
    def supports(cls, task) -> bool:
        return task.target != "mask"  # patch-level targets

    def _build(self) -> None:
        self.backbone = create_backbone(self.hparams.backbone, self.hparams.weights)
        self.weights_source = self.backbone.weights_source
        self.head = nn.Sequential(nn.Dropout(self.hparams.dropout), nn.Linear(self.backbone.num_features, self.task.n_outputs))
        self.criterion = nn.MultiLabelSoftMarginLoss() if self.task.multilabel else nn.CrossEntropyLoss()
        mix = self.hparams.mix
        if mix != "none":
            _check_mix(self.hparams, self.name)  # a subclass's Hparams may replace ERM's __post_init__
            if self.task.multilabel:
                raise ValueError(f"method {self.name!r}: hyperparameter 'mix' = {mix!r} mixes single-label targets;"
                                 f" target {self.task.target!r} is multi-label (use mix: none)")
            if type(self)._loss is not ERM._loss:
                raise ValueError(f"method {self.name!r}: hyperparameter 'mix' = {mix!r} applies in ERM's loss, "
                                 f"which {self.name!r} replaces (use mix: none)")
        self._mixer = None
        if mix in ("mixup", "cutmix"):
            alpha = self.hparams.mix_alpha
            self._mixer = Mixup(mixup_alpha=alpha if mix == "mixup" else 0.0,
                                cutmix_alpha=alpha if mix == "cutmix" else 0.0, prob=1.0, mode="batch",
                                label_smoothing=0.0, num_classes=self.task.n_outputs)
            self.criterion = SoftTargetCrossEntropy()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = self._mix(batch["image"], self.task.targets(batch))
        return self.criterion(self(images), targets), {}

    def _mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as ``mix`` makes it: images (N, 3, H, W), and targets (N,) int or, for mixup and cutmix,
        (N, n_outputs) soft. The input tensors are left as they are (timm mixes in place: a copy is mixed)."""
        mix = self.hparams.mix
        if mix == "none":
            return images, targets
        images = images.clone()
        if mix == "cutout":
            RandomErasing(self.hparams.cutout_prob, mode="const", device=images.device)(images)
            return images, targets
        soft = nn.functional.one_hot(targets, self.task.n_outputs).to(torch.float32)
        n = len(images) - len(images) % 2  # timm's Mixup needs an even batch: an odd one's last image stays as is
        if n:
            images[:n], soft[:n] = self._mixer(images[:n], targets[:n])
        return images, soft


def _check_mix(hp, method: str = "erm") -> None:
    """Raise ``ValueError`` naming the hyperparameter unless ``mix``, ``mix_alpha`` and ``cutout_prob`` are valid."""
    if hp.mix not in MIX_MODES:
        raise ValueError(f"method {method!r}: hyperparameter 'mix' = {hp.mix!r}; valid: {list(MIX_MODES)}")
    if not hp.mix_alpha > 0:
        raise ValueError(f"method {method!r}: hyperparameter 'mix_alpha' must be > 0, got {hp.mix_alpha}")
    if not 0.0 <= hp.cutout_prob <= 1.0:
        raise ValueError(f"method {method!r}: hyperparameter 'cutout_prob' must be in [0, 1], got {hp.cutout_prob}")
