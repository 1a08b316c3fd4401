"""The single-cell model: :class:`CellDiT` and its settings.

Read :mod:`celldit.cells.model` first: it says where each step of registration, training
and sampling lives.
"""

from .config import CellDiTConfig, CellFitConfig, SamplerConfig
from .model import CellDiT

__all__ = ["CellDiT", "CellDiTConfig", "CellFitConfig", "SamplerConfig"]
