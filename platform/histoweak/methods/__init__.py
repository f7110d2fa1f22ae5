"""Training methods: one file per method, registered by name (plain PyTorch, no Ray)."""

from histoweak.methods.base import METHODS, Method, build_method, register_method
from histoweak.methods import erm, gerne  # noqa: F401  — registers "erm", "gerne"

__all__ = ["METHODS", "Method", "build_method", "register_method"]
