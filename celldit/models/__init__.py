"""Networks: the DiT backbone and its image specialisation. No flow or data code here."""

from .dit import DIT_PRESETS, DIT_SIZES, DiT, DiTBlock, FinalLayer
from .image import ImageDiT, load_official_checkpoint

__all__ = ["DIT_PRESETS", "DIT_SIZES", "DiT", "DiTBlock", "FinalLayer", "ImageDiT", "load_official_checkpoint"]
