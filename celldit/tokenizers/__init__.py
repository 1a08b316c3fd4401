"""Tokenizers: the pluggable front and back ends of the DiT backbone.

:data:`TOKENIZERS` maps a name to a :class:`Tokenizer` subclass; adding a tokenizer is one
class and one line here.
"""

from __future__ import annotations

from .base import Tokenizer
from .patch import PatchTokenizer

TOKENIZERS: dict[str, type[Tokenizer]] = {
    "patch": PatchTokenizer,
}


def build_tokenizer(name: str, **kwargs) -> Tokenizer:
    """Instantiate the tokenizer registered under ``name`` with ``kwargs``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](**kwargs)


__all__ = ["TOKENIZERS", "Tokenizer", "PatchTokenizer", "build_tokenizer"]
