"""celldit: Diffusion Transformers with pluggable tokenizers, trained with rectified flow.

The same adaLN-Zero DiT core runs on image latents (:class:`ImageDiT`, at parity with the
original DiT) and on single cells (gene, gene-module and latent tokenizers).
"""

__version__ = "0.1.0"

from .models import DiT, ImageDiT

__all__ = ["CellDiT", "CellDiTConfig", "DiT", "ImageDiT", "__version__"]


def __getattr__(name: str):
    # the cell model pulls in anndata, scanpy and lightning: import it on first use only
    if name in ("CellDiT", "CellDiTConfig"):
        from . import cells

        return getattr(cells, name)
    raise AttributeError(f"module 'celldit' has no attribute {name!r}")
