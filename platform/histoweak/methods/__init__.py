"""Training methods: one file per method, registered by name (plain PyTorch, no Ray)."""

from histoweak.methods.base import METHODS, Method, build_method, register_method
from histoweak.methods import erm, gerne, pscl, segcls  # noqa: F401  — registers "erm", "gerne", "pscl", "pscl-seg", "segcls"

__all__ = ["METHODS", "Method", "build_method", "register_method"]
