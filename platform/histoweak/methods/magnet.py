"""MagNets (Dimitriou & Arandjelović 2023): learn where to look in a gigapixel slide from its slide label.

A MagNet starts from a 56×56 view of the whole slide and, through ``layers`` magnifying layers of ``patches``
patches each, decides where to zoom; only the regions it chooses are read, at the pyramid level its zoom so far
calls for. ``patches ** layers`` last-layer patches, 224×224, go through an ImageNet CNN (timm) into a GRU whose
last output (through an FC 512 → 256 head) is the slide's prediction (§3.2).

One magnifying layer (§3.1, ``models.magnify``), for each of its input images and each of its ``patches``
outputs, with weights of its own per output patch:

1. the input region (the whole slide for layer 1) is read at 112×112 (I′) and average-pooled to 56×56 (I); every
   read goes through the grey filter of §4.2 (grey pixels and the white outside the slide become black);
2. three inception-style convolutions turn I into a 56×56 map; a spatial sparsemax makes it a probability mass;
   its centre of mass and spread give ``(s, t_x, t_y)`` (``magnify.theta_params``: our reading of the paper's
   "expected value" and "expected L2" is written there), with s ≥ ``min_scale`` and t = tanh(·) (eq. 1–4);
3. the output patch is sampled from I′ by θ with a differentiable sampler (``sampler``: bilinear or
   Linearized Multi-Sampling, the paper's) — this is how the gradient reaches θ — and at the same time read
   afresh from the slide at the finer level the accumulated zoom calls for (``slides.regions.read_box``).
   The patch the next layer sees is the fresh read, with the sampler's gradient: ``sampled + (fresh −
   sampled).detach()`` (a straight-through estimator: forward the new pixels, backward through the sampler).

The first patch of layer 2 is "frozen" to the whole of its input (§4.3, ``frozen_patch``). Two auxiliary
classifiers (§3.3; ResNet-18 in the paper, any timm backbone here) predict the slide label from layer 1's and
layer 3's images (layer ``layers``' when there are fewer); the paradoxical loss (Maksoud et al. 2020, as §3.3
states it: layer-3 evidence should predict at least as well as layer-1's) is ``relu(CE_3 − CE_1)`` per slide,
with ``CE_1`` detached, so it pushes the layers that choose what layer 3 sees rather than making layer 1 worse.
Loss = CE(GRU) + ``aux_weight`` · (CE_1 + CE_3) + ``paradoxical_weight`` · paradoxical. Adam, lr 3e-5 with cosine
annealing in the paper (§4.3; ``lr_schedule: {name: cosine}`` in the search space).

Augmentation (§4.2): flips and 90° rotations of the whole slide, drawn per slide and step (``augment``), applied
to every read (``slides.regions``' views), so a zoom path on the turned slide reads the turned pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histoweak.methods._wsi import WholeSlideMethod
from histoweak.methods.base import Hparams, register_method
from histoweak.models.backbones import create_backbone
from histoweak.models.magnify import (InceptionStack, affine_grid, get_sampler, make_theta, spatial_sparsemax,
                                      theta_params)
from histoweak.slides.reader import cached_reader
from histoweak.slides.regions import grey_filter, read_box

__all__ = ["MagNet", "patch_tree_size"]

INPUT = 56  # the magnifying layers' input side (I)
INPUT_HI = 112  # the higher-resolution input the sampler reads (I′)


def patch_tree_size(patches: int, layers: int) -> tuple[int, ...]:
    """Patches out of each layer: P, P², …, P^L (the last is the number of patches the classifier sees)."""
    return tuple(patches ** (l + 1) for l in range(layers))


@register_method("magnet")
class MagNet(WholeSlideMethod):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        lr: float = 3e-5  # §4.3
        weight_decay: float = 0.0
        layers: int = 3  # L magnifying layers (up to 4 in the paper)
        patches: int = 2  # P_l patches per layer (2 or 3)
        sampler: str = "lms"  # "lms" (Linearized Multi-Sampling, the paper's) or "bilinear"
        min_scale: float = 0.05  # eq. 1
        leaf_size: int = 224  # side of the last layer's patches (§3.2)
        frozen_patch: bool = True  # layer 2's first patch is its whole input (§4.3)
        st_width: int = 4  # channels per kernel size in the inception-style convolutions
        st_kernels: tuple[int, ...] = (1, 3, 5)
        gru_hidden: int = 256
        aux_backbone: str | None = "tf_efficientnet_lite0"  # None: no auxiliary classifiers (nor paradoxical loss)
        aux_size: int = 112  # side the auxiliary classifiers see their images at
        aux_weight: float = 1.0
        paradoxical_weight: float = 1.0
        augment: bool = True  # flips and 90° rotations of the slide (§4.2)
        grey_tolerance: int = 15  # §4.2

        def __post_init__(self):
            def bad(key, why):
                raise ValueError(f"method 'magnet': hyperparameter {key!r}: {why}")

            if not 1 <= self.layers <= 4:
                bad("layers", f"must be in 1..4, got {self.layers}")
            if not 1 <= self.patches <= 4:
                bad("patches", f"must be in 1..4, got {self.patches}")
            if not 0 < self.min_scale <= 1:
                bad("min_scale", f"must be in (0, 1], got {self.min_scale}")
            if self.leaf_size < 32:
                bad("leaf_size", f"must be >= 32, got {self.leaf_size}")
            get_sampler(self.sampler)  # fails with the valid names

    def _build(self) -> None:
        hp = self.hparams
        self.sample = get_sampler(hp.sampler)
        self.stacks = nn.ModuleList(InceptionStack(3, hp.st_width, tuple(hp.st_kernels))
                                    for _ in range(sum(patch_tree_size(hp.patches, hp.layers))))
        self.backbone = create_backbone(hp.backbone, hp.weights)
        self.weights_source = self.backbone.weights_source
        self.gru = nn.GRU(self.backbone.num_features, hp.gru_hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hp.gru_hidden, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                  nn.Linear(256, self.task.n_outputs))
        self.aux = nn.ModuleList()
        if hp.aux_backbone:
            for _ in range(2):  # on layer 1's and layer 3's images
                net = create_backbone(hp.aux_backbone, hp.weights)
                self.aux.append(nn.ModuleDict({"net": net, "fc": nn.Linear(net.num_features, self.task.n_outputs)}))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters(), "adam")

    # -- reading --------------------------------------------------------------------------------------
    def _read(self, paths, boxes: np.ndarray, size: int, views) -> tuple[torch.Tensor, list]:
        """(B, 3, size, size) float in [0, 1] of box ``boxes[i]`` of slide ``paths[i]`` (grey-filtered)."""
        imgs, reads = [], []
        for path, box, view in zip(paths, boxes, views):
            rgb, read = read_box(cached_reader(path), tuple(box), size, view)
            imgs.append(grey_filter(rgb, self.hparams.grey_tolerance))
            reads.append(read)
        x = torch.from_numpy(np.stack(imgs)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return x, reads

    # -- the network ----------------------------------------------------------------------------------
    def forward_slides(self, batch: dict, record: bool = False) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        logits, _, records = self._forward(batch, record)
        return logits, records

    def _forward(self, batch: dict, record: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], list[dict]]:
        """(final logits, the auxiliary classifiers' logits (none without them), one record per slide)."""
        hp = self.hparams
        paths = list(batch["path"])
        n_slides = len(paths)
        if self.training and hp.augment:
            views = [(int(k), bool(f)) for k, f in zip(np.random.randint(0, 4, n_slides),
                                                        np.random.randint(0, 2, n_slides))]
        else:
            views = [(0, False)] * n_slides
        # layer 1's input: the whole slide (its canvas), one box per slide
        boxes = np.tile(np.array([[0.0, 0.0, 1.0]]), (n_slides, 1, 1))  # (B, n, 3): cx, cy, half
        hi, reads = self._read(paths, boxes[:, 0], INPUT_HI, views)
        finest = [r.level for r in reads]
        inputs = hi[:, None]  # (B, n, 3, 112, 112)
        trace = {"boxes": [boxes.copy()], "scales": []}
        layer_images = []
        stack = 0
        for layer in range(hp.layers):
            last = layer == hp.layers - 1
            size = hp.leaf_size if last else INPUT_HI
            outs, child_boxes, scales = [], [], []
            for q in range(inputs.shape[1]):
                parent = inputs[:, q]
                small = F.avg_pool2d(parent, INPUT_HI // INPUT)  # I: 56×56
                for j in range(hp.patches):
                    if hp.frozen_patch and layer == 1 and q == 0 and j == 0:  # the whole input (§4.3)
                        ones = parent.new_ones(n_slides)
                        s, tx, ty = ones, ones * 0, ones * 0
                    else:
                        s, tx, ty = theta_params(spatial_sparsemax(self.stacks[stack](small)), hp.min_scale)
                    stack += 1
                    sampled = self.sample(parent, affine_grid(make_theta(s, tx, ty), size))
                    st = torch.stack([tx, ty, s], 1).detach().cpu().numpy().astype(np.float64)
                    pb = boxes[:, q]  # (B, 3)
                    cb = np.stack([pb[:, 0] + pb[:, 2] * st[:, 0], pb[:, 1] + pb[:, 2] * st[:, 1],
                                   pb[:, 2] * st[:, 2]], 1)
                    fresh, reads = self._read(paths, cb, size, views)
                    finest = [min(f, r.level) for f, r in zip(finest, reads)]
                    outs.append(sampled + (fresh - sampled).detach())  # forward the new pixels, backward via θ
                    child_boxes.append(cb)
                    scales.append(st[:, 2])
            inputs = torch.stack(outs, 1)  # (B, n·P, 3, size, size)
            boxes = np.stack(child_boxes, 1)
            trace["boxes"].append(boxes.copy())
            trace["scales"].append(np.stack(scales, 1))
            layer_images.append(inputs)
        # classification layer: CNN per last-layer patch -> GRU over the patches in tree order -> FC head
        n = inputs.shape[1]
        feats = self.backbone(inputs.flatten(0, 1)).view(n_slides, n, -1)
        seq, _ = self.gru(feats)
        step_logits = self.head(seq)  # (B, n, outputs): the prediction after each patch
        aux_logits = [self._aux_predict(i, layer_images[min(k, hp.layers - 1)])
                      for i, k in enumerate((0, 2))] if len(self.aux) else []
        records = []
        for b in range(n_slides):
            rec: dict[str, Any] = {"finest_level": int(finest[b])}
            if record:
                rec["boxes"] = [bx[b] for bx in trace["boxes"]]  # per layer: (n, 3) cx, cy, half
                rec["step_probs"] = step_logits[b].softmax(-1)[:, -1].detach().float().cpu().numpy()
                leaves = F.interpolate(inputs[b].detach(), size=96, mode="area")
                rec["leaves"] = (leaves.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy()
            records.append(rec)
        return step_logits[:, -1], aux_logits, records

    def _aux_predict(self, i: int, images: torch.Tensor) -> torch.Tensor:
        """Auxiliary classifier ``i`` on one layer's images (B, n, 3, H, W): mean of per-image features."""
        b, n = images.shape[:2]
        x = images.flatten(0, 1)
        if x.shape[-1] != self.hparams.aux_size:
            x = F.interpolate(x, size=self.hparams.aux_size, mode="bilinear", antialias=True, align_corners=False)
        feats = self.aux[i]["net"](x).view(b, n, -1).mean(1)
        return self.aux[i]["fc"](feats)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits, aux, _ = self._forward(batch)
        y = self.task.targets(batch)
        loss = F.cross_entropy(logits, y)
        logs = {"ce": float(loss.detach())}
        if aux:
            hp = self.hparams
            ce1 = F.cross_entropy(aux[0], y, reduction="none")
            ce3 = F.cross_entropy(aux[1], y, reduction="none")
            para = F.relu(ce3 - ce1.detach()).mean()
            loss = loss + hp.aux_weight * (ce1.mean() + ce3.mean()) + hp.paradoxical_weight * para
            logs.update(aux1_ce=float(ce1.mean().detach()), aux3_ce=float(ce3.mean().detach()), paradoxical=float(para.detach()))
        return loss, logs

    @classmethod
    def test_figures(cls, pred: dict, run, class_names) -> dict[str, Any]:
        """Table 1's metrics as bars, and Fig. 5 for every test slide: the zoom path, the last layer's patches
        and the GRU's probability of tumour after each patch (``figures.magnet_zoom_figure``)."""
        from histoweak import figures

        out = super().test_figures(pred, run, class_names)
        for i, rec in enumerate(pred.get("records", [])[:12]):
            if "boxes" in rec:
                out[f"magnet_zoom_{pred['slide_id'][i]}.png"] = figures.magnet_zoom_figure(
                    pred["path"][i], rec, label=int(pred["targets"][i]), size_class=str(pred["size_class"][i]))
        return out
