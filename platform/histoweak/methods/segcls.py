"""Segmentation from classification labels (Ciga & Martel, "Learning to segment images with classification
labels", MedIA 2021): a few pixel-labelled patches plus many image-labelled ones.

Network (Table A.2): a timm encoder cut at stride 16 (the paper: ResNet-18 up to its third stage; the offline
default here: EfficientNet-Lite0 ImageNet, also cut at stride 16); a decoder conv3×3 → 64 (no bias),
BatchNorm, ReLU, ×2 upsampling, conv1×1 → C; the segmentation output is that map interpolated to the input
size. The classifier goes *through the segmentation output*, before the interpolation.

Where the paper's text and the authors' code (``github.com/ozanciga/learning-to-segment``: ``models/models.py``,
``utils/dataset.py``, ``train_seg_and_cls.py``) differ, the defaults follow the code (it produced the published
tables), and the text's choice stays an option:

- ``head``: ``official`` (default) — the image logits are the global **max** of each segmentation channel
  (the code's ``domain_classifier.forward``), so image class c is tied to segmentation channel c and the
  classification loss raises channel c where the patch shows class c; ``avgpool`` — the global average, the
  same tie without the max; ``table_a3`` — the text's head (average pool, conv C → 8, BN, ReLU, conv 8 → C),
  which ties nothing: its output c need not be channel c (a benchmark found S+C *below* S with it).
- ``cls_pixel_loss`` (default on, as the code): a classification patch also enters the pixel loss with a
  constant mask of its label (``utils/dataset.py`` builds ``label * ones``); the pixel loss is one weighted
  mean over the pixels of both batches, as one mixed batch gives. Its class weights come from the
  segmentation patches' masks only (the code's ``cls_weights`` leaves the constant masks out).
- ``upsample``: ``bilinear`` (default, the code) or ``nearest`` (Table A.2), for the decoder's ×2 and the
  final interpolation.
- ``normalize`` (default on, as the code): inputs are standardised per channel by the mean and std of the
  run's training tiles (a seeded sample of up to 256 of the patches it trains on, as the stream gives them —
  stain-normalised when the run is; the code uses its segmentation patches, which at s = 0 is one tile). The
  statistics are buffers of the model, so a checkpoint and ``histoweak predict`` carry them.

What stays the platform's: the segmentation and classification patches come as two batches of 20 each step
(the code shuffles both kinds into one batch), and the classification loss is taken on classification
patches only (the code also takes it on segmentation patches, with their tile label).

Training (§2.3): L_seg + L_cls with Adam (lr 1e-4, batch 20). The pixel loss's class weights: the paper
says "weights proportional to the pixelwise class distributions"; the code uses the inverse (``class_weights``).

Patches and settings (§3.3): a tile whose dominant class covers ≥ 90 % is a classification patch with
that label; a tile with exactly two classes is a segmentation patch; others are ignored (``tile_roles``);
a tile with no mask but an image ``label`` (BACH part A) is a classification patch. With s % of the
segmentation patches (at least one, also at s = 0, as the code keeps one): **S** uses only those; **S+C**
adds (100 − s) % of the classification patches; **S+C\\*** adds all of them. The s % (and the
classification subset) are the first ones of one seeded order of the tiles, so the subsets are nested in s
and the same for the three settings (``subsets``). Classification patches reach the method without their
masks (the platform's sampler drops the column); their constant masks are made from their label.

Epochs: every run makes the same number of steps per epoch, whatever the setting and s — one pass of
batches over the whole segmentation pool (s = 100 %) — so settings differ in their data, not in their
number of updates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histoweak import metrics as M
from histoweak.data.schema import tile_keys
from histoweak.methods._segmentation import SegmentationMetrics, images_uint8, keep_fixed_tiles
from histoweak.methods.base import (DataPlan, Hparams, Method, RunInfo, Stream, Task, mean_across_workers,
                                    register_method)
from histoweak.models.backbones import create_backbone

__all__ = ["HEADS", "ROLE_CLS", "ROLE_IGNORED", "ROLE_SEG", "SETTINGS", "SegCls", "channel_stats", "class_weights",
           "subsets", "tile_roles"]

SETTINGS = ("S", "S+C", "S+C*")
HEADS = ("official", "avgpool", "table_a3")
UPSAMPLE = ("bilinear", "nearest")
STATS_TILES = 256  # tiles the input normalisation statistics are computed from
ROLE_IGNORED, ROLE_SEG, ROLE_CLS = 0, 1, 2


def tile_roles(class_ratios: np.ndarray, label: np.ndarray | None = None, dominant: float = 0.9
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each tile's role by §3.3's rule, and the label of classification patches.

    Parameters
    ----------
    class_ratios : (N, C) float, each tile's fraction of pixels per class; a row of NaN = no mask
    label : (N,) int image labels (-1 = none), used for tiles without a mask
    dominant : the share of one class that makes a tile a classification patch (0.9)

    Returns
    -------
    roles : (N,) int, ``ROLE_CLS`` (a class covers >= ``dominant``), else ``ROLE_SEG`` (exactly two classes
        present), else ``ROLE_IGNORED``; a tile without a mask is ``ROLE_CLS`` when it has a label
    cls_label : (N,) int, the dominant class (or the image label) of classification patches, -1 elsewhere
    """
    r = np.asarray(class_ratios, np.float64)
    no_mask = ~np.isfinite(r).all(1)
    r = np.nan_to_num(r)
    top = r.argmax(1)
    is_cls = (r.max(1) >= dominant - 1e-6) & ~no_mask  # ratios are float32: 0.9 is stored as 0.8999999762
    is_seg = ((r > 0).sum(1) == 2) & ~is_cls & ~no_mask
    roles = np.where(is_cls, ROLE_CLS, np.where(is_seg, ROLE_SEG, ROLE_IGNORED))
    cls_label = np.where(is_cls, top, -1)
    if label is not None:
        lab = np.asarray(label)
        from_label = no_mask & (lab >= 0)
        roles = np.where(from_label, ROLE_CLS, roles)
        cls_label = np.where(from_label, lab, cls_label)
    return roles.astype(np.int64), cls_label.astype(np.int64)


def subsets(keys: list[str], roles: np.ndarray, s: float, setting: str, seed: int) -> tuple[set[str], set[str]]:
    """(segmentation keys, classification keys) a run of ``setting`` at s % uses.

    One seeded order of each pool (tiles sorted by key, then permuted by ``seed``): the segmentation subset is
    its first round(s % · n) tiles (at least one, also at s = 0, as the authors' code keeps), so subsets are nested in s and identical across
    settings; **S+C** takes the classification tiles after the first round(s % · m) of theirs (the other
    (100 − s) %), **S+C\\*** all of them, **S** none.
    """
    if setting not in SETTINGS:
        raise ValueError(f"segcls setting {setting!r}: use one of {list(SETTINGS)}")
    if not 0 <= s <= 100:
        raise ValueError(f"segcls s must be a percentage in [0, 100], got {s}")
    out = []
    for i, role in enumerate((ROLE_SEG, ROLE_CLS)):
        pool = sorted(k for k, r in zip(keys, roles) if r == role)
        order = [pool[j] for j in np.random.default_rng([seed, i]).permutation(len(pool))]
        k = round(s / 100 * len(pool))
        if i == 0:
            k = max(k, 1 if pool else 0)
            out.append(set(order[:k]))
        else:
            out.append(set() if setting == "S" else set(order) if setting == "S+C*" else set(order[k:]))
    return out[0], out[1]


def class_weights(pixel_counts: np.ndarray) -> np.ndarray:
    """Pixel cross-entropy weights from the class pixel counts of the training masks: inverse frequency,
    scaled to mean 1 over the classes present; absent classes get 0.

    Examples
    --------
    >>> class_weights(np.array([600, 300, 100, 0])).round(3).tolist()
    [0.333, 0.667, 2.0, 0.0]
    """
    c = np.asarray(pixel_counts, np.float64)
    present = c > 0
    if not present.any():
        raise ValueError("segcls: the segmentation patches have no labelled pixels")
    w = np.zeros_like(c)
    w[present] = 1.0 / c[present]
    return w / w[present].mean()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, H, W, 3) uint8 images, over all their pixels, on the [0, 1] scale the
    model sees (the std of the pooled pixels, as the authors' ``utils/dataset.py``).

    Examples
    --------
    >>> channel_stats(np.array([[[[0, 255, 51]], [[255, 255, 153]]]], np.uint8))
    ([0.5, 1.0, 0.4], [0.5, 0.0, 0.2])
    """
    x = np.asarray(images, np.float64).reshape(-1, np.shape(images)[-1]) / 255.0
    if not len(x):
        raise ValueError("segcls: no training tiles to compute the input normalisation from")
    return [round(float(v), 6) for v in x.mean(0)], [round(float(v), 6) for v in x.std(0)]


def _inside(meta: dict, keys: frozenset) -> np.ndarray:
    return np.fromiter((k in keys for k in tile_keys(meta["slide_id"], meta["x"], meta["y"])), bool, len(meta["x"]))


def _cls_strata(meta: dict, keys: frozenset, dominant: float) -> np.ndarray:
    """Classification stream: a chosen classification patch -> its label, any other row -> -1."""
    ratios = meta.get("class_ratios")
    if ratios is None:
        ratios = np.full((len(meta["x"]), 1), np.nan)
    _, lab = tile_roles(ratios, meta.get("label"), dominant)
    return np.where(_inside(meta, keys) & (lab >= 0), lab, -1)


def _seg_strata(meta: dict, keys: frozenset) -> np.ndarray:
    """Main stream: a chosen segmentation patch -> 0, any other row -> -1."""
    return np.where(_inside(meta, keys), 0, -1)


@register_method("segcls")
class SegCls(Method):
    @dataclass(frozen=True)
    class Hparams(Hparams):
        backbone: str = "tf_efficientnet_lite0"  # the paper's ResNet-18: backbone resnet18 + its state-dict path
        weights: str | None = "imagenet"
        lr: float = 1e-4
        weight_decay: float = 0.0  # Adam, as §2.3
        setting: str = "S+C"  # S, S+C or S+C*
        s: float = 10.0  # percentage of the segmentation patches used (0: one patch, as the authors' code)
        dominant: float = 0.9  # a class covering this share makes a tile a classification patch
        weighted: bool = True  # class-weighted pixel cross-entropy (inverse frequency)
        stride: int = 16  # the encoder's output stride (the feature level used)
        decoder_width: int = 64
        head: str = "official"  # official (max of each segmentation channel), avgpool, table_a3 (the text's)
        cls_pixel_loss: bool = True  # classification patches also get the pixel loss, a constant mask of their label
        upsample: str = "bilinear"  # bilinear (the authors' code) or nearest (Table A.2)
        normalize: bool = True  # standardise inputs by the training tiles' per-channel mean and std
        figures_max_s: float = 10.0  # sample predictions are logged for s <= this (Fig. C.10 shows s <= 10 %)

        def __post_init__(self):
            if self.setting not in SETTINGS:
                raise ValueError(f"method 'segcls': setting must be one of {list(SETTINGS)}, got {self.setting!r}")
            if not 0 <= self.s <= 100:
                raise ValueError(f"method 'segcls': s must be a percentage in [0, 100], got {self.s}")
            if self.head not in HEADS:
                raise ValueError(f"method 'segcls': head must be one of {list(HEADS)}, got {self.head!r}")
            if self.upsample not in UPSAMPLE:
                raise ValueError(f"method 'segcls': upsample must be one of {list(UPSAMPLE)}, got {self.upsample!r}")
            if not 0.5 < self.dominant <= 1:
                raise ValueError(f"method 'segcls': dominant must be in (0.5, 1], got {self.dominant}")

    selection_metric = "val_f1_macro"
    headline_metrics = ("test_f1_micro", "test_f1_macro", "test_miou")
    train_columns = ("mask", "class_ratios", "slide_id", "x", "y")
    eval_columns = ("mask", "slide_id", "x", "y")

    @classmethod
    def supports(cls, task: Task) -> bool:
        return task.target == "mask"

    # -- data ---------------------------------------------------------------------------------
    @classmethod
    def data_plan(cls, hparams: "SegCls.Hparams", run: RunInfo) -> DataPlan:
        """The s % of segmentation patches as the main batch, the setting's classification patches as
        ``batch["cls"]`` (masks hidden), the pixel-loss weights from the segmentation patches used."""
        meta = run.meta(["slide_id", "x", "y", "class_ratios", "label"])
        keys = tile_keys(meta["slide_id"], meta["x"], meta["y"])
        ratios = meta.get("class_ratios")
        if ratios is None:
            ratios = np.full((len(keys), run.n_classes), np.nan)
        roles, _ = tile_roles(ratios, meta.get("label"), hparams.dominant)
        seg, cls_ = subsets(keys, roles, hparams.s, hparams.setting, run.seed)
        if not seg:
            raise ValueError(f"segcls: no segmentation patches (tiles with exactly two classes) in the training "
                             f"split ({int((roles == ROLE_CLS).sum())} classification, {len(keys)} tiles)")
        chosen = np.fromiter((k in seg for k in keys), bool, len(keys))
        counts = np.nan_to_num(ratios[chosen]).sum(0)  # pixel counts up to the (common) tile area
        n_pool = int((roles == ROLE_SEG).sum())
        extra = {}
        if cls_:
            extra["cls"] = Stream(functools.partial(_cls_strata, keys=frozenset(cls_), dominant=hparams.dominant),
                                  hidden=("mask",))
        if hparams.normalize:
            used = sorted(seg | cls_)
            pick = np.random.default_rng([run.seed, 2]).permutation(len(used))[:STATS_TILES]
            if run.images is None:
                raise ValueError("segcls: normalize needs the run's training images (RunInfo.images)")
            images = run.images({used[i] for i in pick})
            mean, std = channel_stats(images)
            extra_state = {"input_mean": mean, "input_std": std, "input_stats_tiles": len(images)}
        else:
            extra_state = {}
        state = {**extra_state,
                 "class_weights": class_weights(counts).tolist() if hparams.weighted else [1.0] * run.n_classes,
                 "n_seg": len(seg), "n_cls": len(cls_), "n_seg_pool": n_pool,
                 "n_cls_pool": int((roles == ROLE_CLS).sum()), "n_ignored": int((roles == ROLE_IGNORED).sum())}
        return DataPlan(main=Stream(functools.partial(_seg_strata, keys=frozenset(seg))), extra=extra,
                        steps_per_epoch=max(1, math.ceil(n_pool / run.batch_size)), state=state)

    def stream_weights(self, key: str, counts: dict[int, int]) -> dict[int, float]:
        """Both batches are drawn as the data is (no re-balancing of classes)."""
        return {g: float(n) for g, n in counts.items()}

    # -- model --------------------------------------------------------------------------------
    def _build(self) -> None:
        import timm

        info = timm.create_model(self.hparams.backbone, pretrained=False, features_only=True).feature_info
        reductions = list(info.reduction())
        if self.hparams.stride not in reductions:
            raise ValueError(f"method 'segcls': backbone {self.hparams.backbone!r} has no stride-{self.hparams.stride} "
                             f"features (strides {reductions})")
        level = reductions.index(self.hparams.stride)
        self.encoder = create_backbone(self.hparams.backbone, self.hparams.weights, features_only=True,
                                       out_indices=(level,))
        self.weights_source = self.encoder.weights_source
        c_in, c, w = info.channels()[level], self.task.n_classes, self.hparams.decoder_width
        up = self.hparams.upsample
        self.decoder = nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                     nn.Upsample(scale_factor=2, mode=up, **({"align_corners": False} if up == "bilinear"
                                                                             else {})),
                                     nn.Conv2d(w, c, 1))
        if self.hparams.head == "table_a3":
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 8, 1, bias=False), nn.BatchNorm2d(8),
                                            nn.ReLU(), nn.Conv2d(8, c, 1, bias=False), nn.Flatten())
        else:  # parameter-free: image class c is segmentation channel c
            pool = nn.AdaptiveMaxPool2d(1) if self.hparams.head == "official" else nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(pool, nn.Flatten())
        self.register_buffer("pixel_weights", torch.ones(c))
        # input standardisation (``normalize``): identity until the data state sets the training tiles' statistics
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("input_std", torch.ones(1, 3, 1, 1))

    def set_data_state(self, state: dict) -> None:
        super().set_data_state(state)
        if "class_weights" in state:
            self.pixel_weights.copy_(torch.as_tensor(state["class_weights"], dtype=torch.float32))
        if self.hparams.normalize and "input_mean" in state:
            self.input_mean.copy_(torch.as_tensor(state["input_mean"], dtype=torch.float32).view(1, 3, 1, 1))
            # a constant channel (std 0) is only shifted
            std = torch.as_tensor(state["input_std"], dtype=torch.float32).view(1, 3, 1, 1)
            self.input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters(), "adam", betas=(0.9, 0.999))

    def segment_low(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H/8, W/8) segmentation logits before the final interpolation (the classifier's input), from
        images in [0, 1] (standardised here by the training tiles' statistics)."""
        return self.decoder(self.encoder((images - self.input_mean) / self.input_std)[0])

    def upsample(self, low: torch.Tensor, size) -> torch.Tensor:
        """Low-resolution logits interpolated to ``size`` (``hparams.upsample``)."""
        if self.hparams.upsample == "nearest":
            return F.interpolate(low, size=size, mode="nearest")
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) segmentation logits."""
        return self.upsample(self.segment_low(images), images.shape[-2:])

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C) image-level logits through the segmentation output (``hparams.head``)."""
        return self.classifier(self.segment_low(images))

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.pixel_weights
        target = batch["mask"].long()
        pixel_sum = F.cross_entropy(self(batch["image"]), target, weight=w, reduction="sum")
        weight_sum = w[target].sum()
        logs = {}
        loss_cls = None
        if "cls" in batch:
            cls = batch["cls"]
            label = cls["group"].long()  # the sampler's stratum of a classification patch is its label (_cls_strata)
            low = self.segment_low(cls["image"])  # one forward pass feeds both losses of these patches
            loss_cls = F.cross_entropy(self.classifier(low), label)
            logs["loss_cls"] = float(loss_cls.detach())
            if self.hparams.cls_pixel_loss:  # their constant mask: every pixel is the label
                logits = self.upsample(low, cls["image"].shape[-2:])
                const = label.view(-1, 1, 1).expand(-1, *logits.shape[-2:])
                cls_sum = F.cross_entropy(logits, const, weight=w, reduction="sum")
                logs["loss_seg_cls"] = float(cls_sum.detach() / w[const].sum().clamp_min(1e-12))
                pixel_sum, weight_sum = pixel_sum + cls_sum, weight_sum + w[const].sum()
        # The weighted mean Σ w·ℓ / Σ w over the step's pixels (both batches' with cls_pixel_loss). Under data
        # parallelism each worker divides its sum by the workers' mean Σ w, so the averaged gradient is that of the
        # union's weighted mean; with its own Σ w, a worker's pixels would count more or less by its batch's mix.
        loss_seg = pixel_sum / mean_across_workers(weight_sum)
        logs["loss_seg"] = float(loss_seg.detach())
        return (loss_seg if loss_cls is None else loss_seg + loss_cls), logs

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        self.eval()
        return self(batch["image"]).softmax(1)

    def evaluate_batches(self, batches, prefix: str) -> tuple[dict[str, float], dict]:
        """Pixel F1 micro/macro (the paper's, ``metrics.segmentation_scores``), mIoU, fwIoU and per-class IoU
        over every tile with a mask; for figures, the fixed tiles' images, ground truth and predictions."""
        seg = SegmentationMetrics(self.task.n_classes)
        samples: dict[str, list] = {"key": [], "image": [], "mask": [], "pred": []}
        for b in batches:
            if "mask" not in b:
                continue
            pred = self.predict({"image": b["image"].to(self.device)}).argmax(1).cpu().numpy()
            mask = b["mask"].cpu().numpy()
            seg.update(mask, pred)
            if self.hparams.s <= self.hparams.figures_max_s:
                keep_fixed_tiles(samples, b, {"image": images_uint8(b["image"]), "mask": mask.astype(np.uint8),
                                              "pred": pred.astype(np.uint8)})
        if not seg.cm.sum():
            return {}, samples
        out = seg.result(prefix, self.class_names)
        out.update({f"{prefix}_{k}": v for k, v in M.segmentation_scores(seg.cm).items()})
        return out, samples

    @classmethod
    def test_figures(cls, pred: dict, run: RunInfo, class_names: list[str] | None) -> dict:
        """Fig. C.10's layout for one run: the fixed test tiles, their ground truth and this run's prediction."""
        from histoweak import figures

        if not pred.get("image"):
            return {}
        names = class_names or [str(c) for c in range(run.n_classes)]
        return {"test_predictions.png": figures.segmentation_samples_figure(
            pred, names, "test tiles (fixed set): image, ground truth, prediction")}
