"""The whole-slide baselines of MagNets' Table 1, on the same slide tables and the same pixel accounting.

- ``mean_rgb``: logistic regression on the mean colour of the slide's grey-filtered thumbnail (§4.2's filter;
  the mean is over every pixel of the square canvas, the black ones included, so the amount of tissue counts
  too). Standardised by a BatchNorm without affine parameters, then one linear layer: a logistic regression
  trained by the platform's loop like any method.
- ``attention_mil``: the usual way, which reads everything: every tile of the slide's tissue at ``level``
  (``tile`` px, tissue from the grey filter on a thumbnail, ``slides.regions.tile_grid``) through a frozen
  ImageNet backbone, then gated attention pooling (Ilse et al. 2018) and a linear classifier. The backbone is
  frozen, so each slide's tile features are computed once per process and cached (with the pixels their
  reads took, which are what the run reports per slide); no augmentation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histoweak.methods._wsi import WholeSlideMethod
from histoweak.methods.base import Hparams, register_method
from histoweak.models.backbones import create_backbone
from histoweak.slides.reader import cached_reader
from histoweak.slides.regions import grey_filter, read_box, tile_grid

__all__ = ["AttentionMIL", "MeanRGB"]


class _Cached:
    """Per-process cache of per-slide values (features), with the pixels their reads took."""

    def __init__(self):
        self.values: dict[tuple, dict[str, Any]] = {}

    def get(self, key: tuple, compute) -> dict[str, Any]:
        """``{"value", "finest_level", "pixels", "level0_pixels", "seconds"}``: what computing the value read and
        how long it took, the first time (a cached slide costs its first reading, not nothing)."""
        if key not in self.values:
            reader = cached_reader(key[0])
            p0, l0, t0 = reader.pixels_read, reader.level0_pixels_read, time.perf_counter()
            value, level = compute(reader)
            self.values[key] = {"value": value, "finest_level": level, "pixels": reader.pixels_read - p0,
                                "level0_pixels": reader.level0_pixels_read - l0, "seconds": time.perf_counter() - t0}
        return self.values[key]


@register_method("mean_rgb")
class MeanRGB(WholeSlideMethod):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        backbone: str = "none"  # no CNN: three colour features
        weights: str | None = None
        lr: float = 1e-2
        weight_decay: float = 0.0
        thumbnail: int = 256  # side of the square thumbnail the mean is taken over
        grey_tolerance: int = 15

    _cache = _Cached()

    def _build(self) -> None:
        self.head = nn.Sequential(nn.BatchNorm1d(3, affine=False), nn.Linear(3, self.task.n_outputs))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters(), "adam")

    def _features(self, reader):
        rgb, read = read_box(reader, (0.0, 0.0, 1.0), self.hparams.thumbnail)
        return grey_filter(rgb, self.hparams.grey_tolerance).reshape(-1, 3).mean(0) / 255.0, read.level

    def forward_slides(self, batch: dict, record: bool = False):
        key = (self.hparams.thumbnail, self.hparams.grey_tolerance)
        got = [self._cache.get((p, *key), self._features) for p in batch["path"]]
        x = torch.as_tensor(np.stack([g["value"] for g in got]), dtype=torch.float32, device=self.device)
        return self.head(x), [{k: v for k, v in g.items() if k != "value"} for g in got]


@register_method("attention_mil")
class AttentionMIL(WholeSlideMethod):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        lr: float = 1e-4
        level: int = 0  # pyramid level tiled (0: full resolution, the usual 20×/40×)
        tile: int = 224
        min_tissue: float = 0.05  # tiles with less tissue (grey filter on a thumbnail) are not read
        attention_dim: int = 128
        grey_tolerance: int = 15

    _cache = _Cached()

    def _build(self) -> None:
        hp = self.hparams
        self.backbone = create_backbone(hp.backbone, hp.weights)
        self.weights_source = self.backbone.weights_source
        self.backbone.requires_grad_(False)
        d, a = self.backbone.num_features, hp.attention_dim
        self.embed = nn.Sequential(nn.Linear(d, a), nn.ReLU())
        self.att_v, self.att_u, self.att_w = nn.Linear(a, a), nn.Linear(a, a), nn.Linear(a, 1)
        self.classifier = nn.Linear(a, self.task.n_outputs)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return self.make_optimizer(params, "adam")

    @torch.no_grad()
    def _features(self, reader):
        hp = self.hparams
        level = min(hp.level, reader.level_count - 1)
        corners = tile_grid(reader, level, hp.tile, hp.min_tissue)
        if not corners:  # no tissue found: the whole slide as one tile
            rgb, read = read_box(reader, (0.0, 0.0, 1.0), hp.tile)
            tiles, level = [grey_filter(rgb, hp.grey_tolerance)], read.level
        else:
            tiles = [grey_filter(reader.read_region(c, level, (hp.tile, hp.tile)), hp.grey_tolerance) for c in corners]
        self.backbone.eval()
        feats = []
        for i in range(0, len(tiles), 32):
            x = torch.from_numpy(np.stack(tiles[i:i + 32])).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            feats.append(self.backbone(x).float().cpu())
        return torch.cat(feats), level

    def forward_slides(self, batch: dict, record: bool = False):
        hp = self.hparams
        key = (hp.backbone, hp.weights, hp.level, hp.tile, hp.min_tissue, hp.grey_tolerance)
        got = [self._cache.get((p, *key), self._features) for p in batch["path"]]
        logits, records = [], []
        for g in got:
            h = self.embed(g["value"].to(self.device))
            a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h)))  # gated attention (Ilse eq. 9)
            w = F.softmax(a, dim=0)
            logits.append(self.classifier((w * h).sum(0)))
            records.append({**{k: v for k, v in g.items() if k != "value"}, "tiles": len(g["value"])})
        return torch.stack(logits), records
