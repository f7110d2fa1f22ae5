"""ERM: empirical risk minimisation — the baseline every method is measured against.

Patch classification with a timm backbone and a linear head: softmax
cross-entropy for single-label tasks, ``MultiLabelSoftMarginLoss`` for
multi-label ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from histoweak.methods.base import Hparams, Method, register_method
from histoweak.models.backbones import create_backbone

__all__ = ["ERM"]


@register_method("erm")
class ERM(Method):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        dropout: float = 0.0

    @classmethod
    def supports(cls, task) -> bool:
        return task.target != "mask"  # patch-level targets

    def _build(self) -> None:
        self.backbone = create_backbone(self.hparams.backbone, self.hparams.weights)
        self.weights_source = self.backbone.weights_source
        self.head = nn.Sequential(nn.Dropout(self.hparams.dropout), nn.Linear(self.backbone.num_features, self.task.n_outputs))
        self.criterion = nn.MultiLabelSoftMarginLoss() if self.task.multilabel else nn.CrossEntropyLoss()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.criterion(self(batch["image"]), self.task.targets(batch)), {}
