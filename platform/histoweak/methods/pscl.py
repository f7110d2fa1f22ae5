"""PSCL: weakly-supervised segmentation from patch labels (thesis ch. 4).

Stage 1 (``pscl``): a timm encoder (``features_only``), a 1×1 convolution with
one output per class on its feature map, global average pooling, and the
multi-label soft-margin loss on the patch labels (§4.3.1), plus
λ · PSCL (``pscl_loss``: supervised contrastive loss over feature-map pixels
labelled by CAM argmax where the largest CAM exceeds τ, eq. 4.6–4.8). CAMs
(eq. 4.3) are ReLU(w_iᵀf) / max over the last encoder stage, gated by the class
score (eq. 4.4–4.5: a class whose sigmoid score is not above 0.8 has no CAM) before
the contrastive loss picks its pixels; the background seed (colour threshold +
remove_small_objects) is an extra channel. ``pseudo_labels`` implements eq. 4.9,
where the patch labels gate the classes (the thesis's pseudo-label section: the
labels are known there, and a score gate could only drop a present class).
Model selection by the validation mIoU of the pseudo-labels against pixel
ground truth.

Whether λ acts: ``pscl_grad_ratio``, logged per epoch (``train_pscl_grad_ratio``), is
‖∇ λ·L_pscl‖ / ‖∇ L_cls‖ over the encoder's weights on the epoch's first step. Near
0.05 the contrastive term barely moves the encoder; the thesis's λ = 0.1 is a
choice at its scale (Swin-T, 224 px), not a constant to carry to another encoder.

Background seed: the thesis thresholds colour (§4.3.2, Table 5.8) without giving the
rule; ``bg_mode: rgb`` (default) keeps pixels bright in every channel (glass), so
pale eosin stays tissue; ``luminance`` is Han et al.'s grey-level ``gen_bg_mask``.

Stage 2 (``pscl-seg``): an FPN-style decoder over the encoder's multi-scale
features (built from ``feature_info``), initialised from a stage-1
checkpoint's encoder, trained on the pseudo-labels written by stage 1 with
cross-entropy or the noise-reduced loss (eq. 4.10–4.11, confidences from the
stage-1 CAMs).

Defaults follow the thesis: Swin-T (give ImageNet weights as a local path),
τ = 0.25, λ = 0.1, gating threshold 0.8. timm's Swin returns channels-last
feature maps; they are permuted to channels-first here.

Data parallel: with several training workers the contrastive loss is over the
pixels of all workers' batches (``gather_across_workers``), as it is in one
process on their concatenation (``tests/test_distributed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histoweak import metrics as M
from histoweak.checkpoint import load_checkpoint
from histoweak.methods._segmentation import FIGURE_TILES, SegmentationMetrics, images_uint8 as _images_uint8, keep_fixed_tiles
from histoweak.methods.base import (Hparams, Method, RunInfo, SweepContext, Task, gather_across_workers,
                                    register_method)
from histoweak.methods.pscl_loss import DEFAULT_TEMPERATURE, pscl_loss
from histoweak.models.backbones import create_backbone
from histoweak.slides.tissue import background_seed

__all__ = ["FIGURE_TILES", "PSCL", "PSCLSegmentation", "SegmentationMetrics", "gate_cams", "keep_fixed_tiles",
           "load_stage1", "normalise_cams", "pseudo_labels_from_cams", "write_pseudo_labels"]


def normalise_cams(activations: torch.Tensor) -> torch.Tensor:
    """CAM_i = ReLU(A_i) / max ReLU(A_i) per image and class (eq. 4.3); all-zero maps stay zero."""
    a = F.relu(activations)
    peak = a.flatten(2).amax(2)[..., None, None]
    return a / peak.clamp_min(1e-8)


def gate_cams(cams: torch.Tensor, scores: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """Zero the CAMs of classes whose score does not exceed ``threshold`` (eq. 4.4–4.5).

    cams : (N, K, h, w); scores : (N, K) class probabilities (sigmoid of the logits).
    """
    return cams * (scores > threshold).to(cams.dtype)[..., None, None]


def pseudo_labels_from_cams(cams: torch.Tensor, present: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Eq. 4.9: [argmax(CAMs) + 1] · (1 − bkg), absent classes gated out by the patch labels.

    cams : (N, K, H, W) at tile resolution (classes 1..K, no background channel)
    present : (N, K) {0, 1} patch labels of those classes
    background : (N, H, W) bool background seed
    Returns (N, H, W) int64 class indices (0 = background).
    """
    gated = cams * present.to(cams.dtype)[..., None, None]
    return (gated.argmax(1) + 1) * (~background).long()


class _Encoder(nn.Module):
    """timm ``features_only`` encoder returning channels-first maps (Swin's channels-last ones are permuted)."""

    def __init__(self, name: str, weights):
        super().__init__()
        self.body = create_backbone(name, weights, features_only=True)
        self.weights_source = self.body.weights_source
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for f, c in zip(self.body(x), self.channels):
            if f.shape[1] != c and f.shape[-1] == c:
                f = f.permute(0, 3, 1, 2)
            out.append(f.contiguous())
        return out


@register_method("pscl")
class PSCL(Method):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        backbone: str = "swin_tiny_patch4_window7_224"
        weights: str | None = None  # ImageNet Swin-T: give its state-dict path
        lam: float = 0.1  # weight of the PSCL loss (0 = the CAM baseline)
        tau: float = 0.25  # PSCL activation threshold on the largest CAM
        temperature: float = DEFAULT_TEMPERATURE
        background: bool = True  # the background seed is a PSCL class
        bg_grey: float = 200.0  # background seed: pixels above this level ...
        bg_min_size: int = 200  # ... in regions of at least this many pixels (200 LUAD, 600 BCSS)
        bg_mode: str = "rgb"  # "rgb": every channel above bg_grey (a colour threshold); "luminance": grey level
        gate: bool = True  # gate the CAMs the PSCL loss contrasts by class score (eq. 4.4-4.5)
        gate_threshold: float = 0.8
        feature_level: int = -1  # which encoder feature map carries the CAMs (-1: the last)
        max_pixels: int | None = 8192  # PSCL on a uniform sample of at most this many kept pixels
        # epochs of the classification loss alone before PSCL joins (0: from the first step, as the thesis trains;
        # its ablation, §5, found PSCL introduced after 5 classification epochs worse than training with it throughout)
        warmup_epochs: int = 0

        def __post_init__(self):
            if self.lam < 0:
                raise ValueError(f"method 'pscl': lam must be >= 0, got {self.lam}")
            if not 0 <= self.tau < 1:
                raise ValueError(f"method 'pscl': tau must be in [0, 1), got {self.tau}")
            if self.warmup_epochs < 0:
                raise ValueError(f"method 'pscl': warmup_epochs must be >= 0, got {self.warmup_epochs}")
            if self.bg_mode not in ("rgb", "luminance"):
                raise ValueError(f"method 'pscl': bg_mode must be 'rgb' or 'luminance', got {self.bg_mode!r}")

    selection_metric = "val_miou"
    headline_metrics = ("test_miou", "test_fwiou")
    eval_columns = ("mask", "slide_id", "x", "y")  # pixel ground truth; tile keys pick the figures' fixed tiles
    stage2_keys = frozenset({"loss", "epochs", "steps_per_epoch", "batch_size", "lr", "decoder_width"})

    @classmethod
    def check_stage2(cls, settings: dict) -> None:
        if settings.get("loss", "ce") not in ("ce", "nr"):
            raise ValueError("stage2.loss must be 'ce' or 'nr'")

    @classmethod
    def stage2(cls, best: dict, ctx: SweepContext) -> dict[str, float]:
        """Stage 2 from the best trial: write its pseudo-labels (eq. 4.9), train the ``pscl-seg`` decoder on them
        as the sweep's child run ``stage2``, log its test metrics on the sweep as ``stage2_*``."""
        ckpt = best.get("best_checkpoint")
        if not ckpt:
            raise ValueError(f"sweep {ctx.name!r}: the best trial has no checkpoint for stage 2")
        st = {"loss": "ce", "epochs": 3, "batch_size": 16, "lr": 1e-3, **ctx.settings}
        print(f"histoweak: stage 2 on the pseudo-labels of {best['trial']} ({st['loss']} loss)")
        pseudo = write_pseudo_labels(ckpt, ctx.tile_table, str(ctx.directory / "pseudo_labels"), ctx.n_classes)
        hp = {"stage1": ckpt, "loss": st["loss"], "lr": st["lr"],
              **({"decoder_width": st["decoder_width"]} if "decoder_width" in st else {})}
        out = ctx.train("stage2", {"method": "pscl-seg", "target": "mask", "hparams": hp, "epochs": st["epochs"],
                                   "batch_size": st["batch_size"], "steps_per_epoch": st.get("steps_per_epoch")},
                        str(pseudo), {"pseudo_labels": str(pseudo), "stage1_trial": best["trial"]})
        ctx.log_metrics({f"stage2_{k}": v for k, v in out.test.items()})
        print("histoweak: stage 2 (decoder on pseudo-labels), test: "
              + ", ".join(f"{k} {v:.4f}" for k, v in out.test.items() if k.endswith(("miou", "fwiou", "miou_fg"))))
        return out.test

    @classmethod
    def test_figures(cls, pred: dict, run: RunInfo, class_names: list[str] | None) -> dict:
        """The CAM histogram at each class's pixels and the CAM overlays of the fixed test tiles."""
        from histoweak import figures

        if "cam_hist" not in pred:
            return {}
        names = class_names or [str(c) for c in range(pred["cam_hist"].shape[0] + 1)]
        out = {"test_cam_histogram.png": figures.cam_histogram_figure(pred["cam_hist"], names,
                                                                      "test: CAM activation at each class's pixels")}
        if pred.get("image"):
            out["test_cam_overlays.png"] = figures.cam_overlay_figure(
                pred, names, "test tiles (fixed set): CAMs, pseudo-labels and ground truth")
        return out

    @classmethod
    def supports(cls, task: Task) -> bool:
        return task.multilabel  # patch labels: presence of each class

    def _build(self) -> None:
        self.encoder = _Encoder(self.hparams.backbone, self.hparams.weights)
        self.weights_source = self.encoder.weights_source
        self.classifier = nn.Conv2d(self.encoder.channels[self.hparams.feature_level], self.task.n_outputs, 1)
        self.criterion = nn.MultiLabelSoftMarginLoss()
        self._pscl_generator = torch.Generator().manual_seed(0)
        self._pscl_on = self.hparams.warmup_epochs == 0
        self._measure_ratio = True

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """PSCL joins the classification loss after ``warmup_epochs`` epochs; the epoch's first step measures
        ``pscl_grad_ratio``."""
        self._pscl_on = epoch >= self.hparams.warmup_epochs
        self._measure_ratio = True

    def _activations(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N, K), activations A (N, K, h, w), features f (N, D, h, w))."""
        f = self.encoder(images)[self.hparams.feature_level]
        a = self.classifier(f)
        return a.mean((2, 3)), a, f

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._activations(images)[0]

    def background(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W) bool background seed of images in [0, 1]."""
        seed = background_seed(_images_uint8(images), self.hparams.bg_grey, self.hparams.bg_min_size,
                               self.hparams.bg_mode)
        return torch.from_numpy(seed).to(images.device)

    def cams(self, logits: torch.Tensor, activations: torch.Tensor, gate: bool = False) -> torch.Tensor:
        """Normalised CAMs of classes 1..K at feature resolution; with ``gate``, gated by the class scores."""
        cams = normalise_cams(activations)
        if gate:
            cams = gate_cams(cams, torch.sigmoid(logits), self.hparams.gate_threshold)
        return cams

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"]
        logits, a, f = self._activations(images)
        loss_cls = self.criterion(logits, self.task.targets(batch))
        if self.hparams.lam == 0 or not self._pscl_on:
            return loss_cls, {"loss_cls": float(loss_cls.detach())}
        with torch.no_grad():  # pseudo-labels for the contrastive loss: no gradient through the CAMs
            cams = self.cams(logits, a, gate=self.hparams.gate).float()
            if self.hparams.background:
                bg = self.background(images)[:, None].float()
                bg = F.adaptive_avg_pool2d(bg, cams.shape[-2:]) > 0.5
                cams = torch.cat([bg.to(cams.dtype), cams], 1)
        # Eq. 4.8 contrasts every kept pixel of the step's batch with every other; under data parallelism that
        # batch is the union of the workers' batches, so each worker computes the loss over the gathered pixels
        # (the same value everywhere, and the same max_pixels sample: the generators advance in step) and
        # the averaged gradient is the single-process one on the concatenated batch.
        loss_pscl = pscl_loss(gather_across_workers(f.float()), gather_across_workers(cams), tau=self.hparams.tau,
                              temperature=self.hparams.temperature, max_pixels=self.hparams.max_pixels,
                              generator=self._pscl_generator)
        loss = loss_cls + self.hparams.lam * loss_pscl
        logs = {"loss_cls": float(loss_cls.detach()), "loss_pscl": float(loss_pscl.detach())}
        if self._measure_ratio and torch.is_grad_enabled():
            self._measure_ratio = False
            logs["pscl_grad_ratio"] = self.grad_ratio(loss_cls, self.hparams.lam * loss_pscl)
        return loss, logs

    def grad_ratio(self, loss_cls: torch.Tensor, weighted_pscl: torch.Tensor) -> float:
        """‖∇ weighted_pscl‖ / ‖∇ loss_cls‖ over the encoder's weights (the graph is kept for the step's backward)."""
        if not (weighted_pscl.requires_grad and loss_cls.requires_grad):  # e.g. no pixel kept: no PSCL gradient
            return 0.0
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        g_cls = torch.autograd.grad(loss_cls, params, retain_graph=True, allow_unused=True)
        g_pscl = torch.autograd.grad(weighted_pscl, params, retain_graph=True, allow_unused=True)
        norm = lambda gs: float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))
        return norm(g_pscl) / max(norm(g_cls), 1e-12)

    @torch.no_grad()
    def tile_cams(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class scores (N, K), CAMs (N, K, H, W) upsampled to the tile)."""
        self.eval()
        logits, a, _ = self._activations(images)
        cams = F.interpolate(self.cams(logits, a).float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(logits), cams

    @torch.no_grad()
    def pseudo_labels(self, batch: dict) -> torch.Tensor:
        """Eq. 4.9 for a batch with patch ``labels``: (N, H, W) int64, 0 = background."""
        _, cams = self.tile_cams(batch["image"])
        return pseudo_labels_from_cams(cams, self.task.targets(batch) > 0, self.background(batch["image"]))

    def evaluate_batches(self, batches, prefix: str) -> tuple[dict[str, float], dict]:
        """Pseudo-label mIoU/fwIoU/per-class IoU against the masks, and patch-label F1; samples for figures."""
        seg = SegmentationMetrics(self.task.n_classes)
        targets, probs = [], []
        hist = np.zeros((self.task.n_outputs, 20), np.int64)  # CAM values at each class's true pixels
        covered = np.zeros(self.task.n_outputs, np.int64)  # a class's true pixels where its CAM exceeds tau
        samples: dict[str, list] = {"image": [], "mask": [], "pseudo": [], "cams": [], "key": []}
        for b in batches:
            b = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in b.items()}
            scores, cams = self.tile_cams(b["image"])
            pseudo = pseudo_labels_from_cams(cams, self.task.targets(b) > 0, self.background(b["image"]))
            targets.append(self.task.targets(b).cpu().numpy())
            probs.append(scores.cpu().numpy())
            if "mask" not in b:
                continue
            mask = b["mask"].cpu().numpy()
            seg.update(mask, pseudo.cpu().numpy())
            c = cams.cpu().numpy()
            for k in range(self.task.n_outputs):
                on = mask == k + 1
                if on.any():
                    hist[k] += np.histogram(c[:, k][on], bins=20, range=(0, 1))[0]
                    covered[k] += int((c[:, k][on] > self.hparams.tau).sum())
            keep_fixed_tiles(samples, b, {"image": _images_uint8(b["image"]), "mask": mask.astype(np.uint8),
                                          "pseudo": pseudo.cpu().numpy().astype(np.uint8),
                                          "cams": (c * 255).astype(np.uint8)})
        out = {}
        if probs:
            t, p = np.concatenate(targets).astype(int), (np.concatenate(probs) > 0.5).astype(int)
            out.update({f"{prefix}_{k}": v for k, v in M.f1_scores(t, p).items()})
        if seg.cm.sum():
            out.update(seg.result(prefix, self.class_names))
            out.update(self._cam_coverage(hist, covered, prefix))
        return out, {"cam_hist": hist, **samples}

    def _cam_coverage(self, hist: np.ndarray, covered: np.ndarray, prefix: str) -> dict[str, float]:
        """What PSCL is meant to change, per class c (thesis Fig. 5.1): ``<prefix>_coverage_<c>``, the share of c's
        true pixels whose CAM_c exceeds tau (the mean over classes as ``<prefix>_coverage``); on test also the
        CAM histogram at c's pixels in 10 bins, ``<prefix>_cam_hist_<c>_<b>`` = share in [b/10, (b+1)/10)."""
        names = [self.class_names[k + 1] if self.class_names else str(k + 1) for k in range(len(hist))]
        out, shares = {}, []
        for k, name in enumerate(names):
            n = hist[k].sum()
            if not n:
                continue
            shares.append(covered[k] / n)
            out[f"{prefix}_coverage_{name}"] = float(shares[-1])
            if prefix == "test":
                for b, v in enumerate(hist[k].reshape(10, -1).sum(1) / n):
                    out[f"{prefix}_cam_hist_{name}_{b}"] = float(v)
        if shares:
            out[f"{prefix}_coverage"] = float(np.mean(shares))
        return out


class _FPNDecoder(nn.Module):
    """FPN over the encoder's maps (from ``feature_info``): lateral 1×1, top-down sum, 3×3, fused at the finest level."""

    def __init__(self, channels: list[int], n_classes: int, width: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU())
                                    for _ in channels)
        self.head = nn.Conv2d(width, n_classes, 1)

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        x = None
        outs = []
        for f, lat, sm in zip(reversed(feats), reversed(self.lateral), reversed(self.smooth)):
            y = lat(f)
            x = y if x is None else y + F.interpolate(x, size=y.shape[-2:], mode="nearest")
            outs.append(sm(x))
        finest = outs[-1].shape[-2:]
        fused = sum(F.interpolate(o, size=finest, mode="bilinear", align_corners=False) for o in outs)
        return F.interpolate(self.head(fused), size=size, mode="bilinear", align_corners=False)


def noise_reduced_loss(logits: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Eq. 4.11: BCE between one-hot pseudo-labels and Gumbel-softmax probabilities, weighted per class by the
    CAM confidence c_n = CAM_n / Σ_i CAM_i (eq. 4.10); mean over pixels.

    logits : (N, C, H, W); target : (N, H, W) int64; confidence : (N, C, H, W) summing to 1 over C (or 0).
    """
    p = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1).clamp(1e-6, 1 - 1e-6)
    y = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    return (confidence * bce).sum(1).mean()


@register_method("pscl-seg")
class PSCLSegmentation(Method):
    """Stage 2: a decoder trained on stage 1's pseudo-labels (the ``mask`` column of its pseudo-label table)."""

    @dataclass(frozen=True)
    class Hparams(Hparams):
        backbone: str = "swin_tiny_patch4_window7_224"
        weights: str | None = None
        stage1: str | None = None  # a stage-1 (pscl) checkpoint: encoder init, NR-loss confidences, figures
        loss: str = "ce"  # "ce" or "nr" (noise-reduced, eq. 4.10-4.11)
        decoder_width: int = 128

        def __post_init__(self):
            if self.loss not in ("ce", "nr"):
                raise ValueError(f"method 'pscl-seg': loss must be 'ce' or 'nr', got {self.loss!r}")

    selection_metric = "val_miou"
    headline_metrics = ("test_miou", "test_fwiou")
    train_columns = ("mask",)  # the pseudo-labels
    eval_columns = ("slide_id", "x", "y")  # tile keys pick the figures' fixed tiles (stage 1's)

    @classmethod
    def test_figures(cls, pred: dict, run: RunInfo, class_names: list[str] | None) -> dict:
        """Stage 1's fixed test tiles: ground truth, the stage-1 pseudo-labels and this decoder's predictions."""
        from histoweak import figures

        if not pred.get("image"):
            return {}
        names = class_names or [str(c) for c in range(run.n_classes)]
        return {"test_stage2_predictions.png": figures.stage2_prediction_figure(
            pred, names, "test tiles (stage 1's fixed set): pseudo-labels and predictions")}

    @classmethod
    def supports(cls, task: Task) -> bool:
        return task.target == "mask"

    def _build(self) -> None:
        self.teacher = None
        if self.hparams.stage1:
            teacher = load_stage1(self.hparams.stage1, self.task.n_classes)
            self.hparams = type(self.hparams)(**{**self.hparams.__dict__, "backbone": teacher.hparams.backbone})
        import warnings

        with warnings.catch_warnings():
            if self.hparams.stage1:
                warnings.simplefilter("ignore")  # not random: the stage-1 encoder is loaded just below
            self.encoder = _Encoder(self.hparams.backbone, None if self.hparams.stage1 else self.hparams.weights)
        self.weights_source = self.encoder.weights_source
        if self.hparams.stage1:
            self.encoder.load_state_dict(teacher.encoder.state_dict())
            self.weights_source = f"stage1:{self.hparams.stage1}"
            self.teacher = [teacher.eval()]  # a list: not a submodule (not trained, not saved)
        elif self.hparams.loss == "nr":
            raise ValueError("method 'pscl-seg': the noise-reduced loss needs a stage-1 checkpoint (hparams.stage1)")
        self.decoder = _FPNDecoder(self.encoder.channels, self.task.n_classes, self.hparams.decoder_width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images), images.shape[-2:])

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self(batch["image"])
        target = batch["mask"].long()
        if self.hparams.loss == "ce":
            return F.cross_entropy(logits, target), {}
        teacher = self.teacher[0].to(self.device)
        _, cams = teacher.tile_cams(batch["image"])
        bg = teacher.background(batch["image"])[:, None].to(cams.dtype)
        full = torch.cat([bg, cams * (1 - bg)], 1)
        confidence = full / full.sum(1, keepdim=True).clamp_min(1e-8)
        return noise_reduced_loss(logits, target, confidence), {}

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        self.eval()
        return self(batch["image"]).softmax(1)

    def evaluate_batches(self, batches, prefix: str) -> tuple[dict[str, float], dict]:
        """mIoU/fwIoU/per-class IoU against the masks; for figures, stage 1's fixed tiles (``keep_fixed_tiles``):
        ``image``, ``mask`` (ground truth), ``pred`` (this model) and, with ``hparams.stage1``, ``pseudo``
        (the stage-1 pseudo-label, eq. 4.9, from the tiles' patch ``labels``)."""
        seg = SegmentationMetrics(self.task.n_classes)
        samples: dict[str, list] = {"key": [], "image": [], "mask": [], "pred": [], "labels": []}
        for b in batches:
            if "mask" not in b:
                continue
            pred = self.predict({"image": b["image"].to(self.device)}).argmax(1).cpu().numpy()
            mask = b["mask"].cpu().numpy()
            seg.update(mask, pred)
            keep_fixed_tiles(samples, b, {"image": _images_uint8(b["image"]), "mask": mask.astype(np.uint8),
                                          "pred": pred.astype(np.uint8), "labels": b["labels"].cpu().numpy()})
        if self.teacher and samples["image"]:
            samples["pseudo"] = list(self._stage1_pseudo_labels(np.stack(samples["image"]),
                                                                np.stack(samples["labels"])))
        return (seg.result(prefix, self.class_names) if seg.cm.sum() else {}), samples

    def _stage1_pseudo_labels(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 stage-1 pseudo-labels (``PSCL.pseudo_labels``) of (N, H, W, 3) uint8 tiles with patch labels.

        Tiles are 8-bit, so ``/ 255`` gives back exactly the images stage 1 saw when writing its pseudo-labels.
        """
        teacher = self.teacher[0].to(self.device)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(self.device)
        pseudo = teacher.pseudo_labels({"image": x, "labels": torch.from_numpy(labels).to(self.device)})
        return pseudo.cpu().numpy().astype(np.uint8)


def load_stage1(checkpoint_dir: str, n_classes: int) -> PSCL:
    """A trained stage-1 model from a checkpoint directory written by ``histoweak.train``.

    Raises ``ValueError`` naming the file when the directory is not a safe histoweak checkpoint
    (``histoweak.checkpoint.load_checkpoint``).
    """
    state, saved = load_checkpoint(checkpoint_dir)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint carries the weights
        model = PSCL(PSCL.Hparams(**{**saved["train"]["hparams"], "weights": None}),
                     Task(saved["train"]["target"], n_classes))
    model.load_state_dict(state["model"])
    return model.eval()


def write_pseudo_labels(checkpoint: str, tile_table: str, out_dir: str, n_classes: int, batch_size: int = 32,
                        progress: bool = True) -> Path:
    """A tile table whose training tiles carry a stage-1 model's pseudo-labels (eq. 4.9) as their ``mask``.

    Every Parquet file of ``tile_table`` is copied to the same relative path under ``out_dir`` with the
    train rows' ``mask`` replaced (val/test keep their ground truth), written atomically, so a rerun
    skips the files already done. Runs in this process (the driver); the manifest records the checkpoint.
    ``ValueError`` names a checkpoint that is not a safe histoweak checkpoint of a ``pscl`` run.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from histoweak.data.schema import write_table_atomic
    from histoweak.slides.tiling import decode_image, encode_image

    _, saved = load_checkpoint(checkpoint)
    if saved["train"]["method"] != "pscl":
        raise ValueError(f"{checkpoint}: method {saved['train']['method']!r} does not make pseudo-labels")
    method = load_stage1(checkpoint, n_classes)
    src, out = Path(tile_table), Path(out_dir)
    files = sorted(src.rglob("*.parquet"))
    for f in tqdm(files, desc="pseudo-labels", unit="file", disable=not progress):
        target = out / f.relative_to(src)
        if target.exists():
            continue
        table = pq.read_table(f)
        masks = table.column("mask").to_pylist()
        rows = np.flatnonzero(np.asarray(table.column("split").to_pylist()) == "train")
        images, labels = table.column("image").to_pylist(), table.column("labels").to_pylist()
        for start in range(0, len(rows), batch_size):
            idx = rows[start:start + batch_size]
            x = torch.from_numpy(np.stack([decode_image(images[i]) for i in idx])).permute(0, 3, 1, 2).float() / 255
            y = torch.tensor(np.asarray([labels[i] for i in idx], np.float32))
            pseudo = method.pseudo_labels({"image": x, "labels": y}).cpu().numpy().astype(np.uint8)
            for i, p in zip(idx, pseudo):
                masks[i] = encode_image(p)
        table = table.set_column(table.schema.get_field_index("mask"), "mask", pa.array(masks, pa.binary()))
        write_table_atomic(table, target)
    manifest = json.loads((src / "_manifest.json").read_text())
    manifest["pseudo_labels"] = {"checkpoint": str(checkpoint), "source": str(src.resolve()), "equation": "PSCL eq. 4.9"}
    (out / "_manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
