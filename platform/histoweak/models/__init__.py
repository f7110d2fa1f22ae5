"""Backbones through timm, with weights from local files only."""

from histoweak.models.backbones import OFFLINE_WEIGHTS, create_backbone, load_efficientnet_lite0

__all__ = ["OFFLINE_WEIGHTS", "create_backbone", "load_efficientnet_lite0"]
