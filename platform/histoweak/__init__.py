"""histoweak: learning from weak, cheap or biased labels in histopathology, on Ray."""

__version__ = "0.1.0"
__all__ = ["__version__"]
