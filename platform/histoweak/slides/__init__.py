"""Reading slides, finding tissue, and turning slides into tiles."""

from histoweak.slides.reader import MaskReader, SlideError, SlideReader

__all__ = ["MaskReader", "SlideError", "SlideReader"]
