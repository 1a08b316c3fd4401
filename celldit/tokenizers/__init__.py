"""Tokenizers: the pluggable front and back ends of the DiT backbone.

:data:`TOKENIZERS` maps a name to a :class:`Tokenizer` subclass; adding a tokenizer is one
class and one line here.
"""

from __future__ import annotations

from .base import CellTokenizer, Tokenizer
from .codecs import CODECS, AutoencoderCodec, Codec, PCACodec
from .gene import GeneTokenizer
from .gene_module import GeneModuleTokenizer
from .gene_module_builders import (
    modules_from_correlation,
    modules_from_gene_sets,
    modules_from_labels,
)
from .latent import LatentTokenizer
from .patch import PatchTokenizer

TOKENIZERS: dict[str, type[Tokenizer]] = {
    "patch": PatchTokenizer,
    "gene": GeneTokenizer,
    "module": GeneModuleTokenizer,  # one token per gene module
    "latent": LatentTokenizer,
}


def build_tokenizer(name: str, **kwargs) -> Tokenizer:
    """Instantiate the tokenizer registered under ``name`` with ``kwargs``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](**kwargs)


__all__ = [
    "CellTokenizer",
    "CODECS",
    "TOKENIZERS",
    "AutoencoderCodec",
    "Codec",
    "GeneTokenizer",
    "LatentTokenizer",
    "GeneModuleTokenizer",
    "PCACodec",
    "PatchTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "modules_from_correlation",
    "modules_from_gene_sets",
    "modules_from_labels",
]
