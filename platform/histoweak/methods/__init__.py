"""Training methods: one file per method, registered by name (plain PyTorch, no Ray)."""

from histoweak.methods.base import METHODS, Method, build_method, register_method
from histoweak.methods import erm, gerne, pscl, segcls, usegmix  # noqa: F401  — registers "erm", "gerne", "pscl",
from histoweak.methods.usegmix import ddpm  # noqa: F401, E402  — "pscl-seg", "segcls", "usegmix", "ddpm"
from histoweak.methods import magnet, slide_baselines  # noqa: F401, E402  — "magnet", "mean_rgb", "attention_mil"

__all__ = ["METHODS", "Method", "build_method", "register_method"]
