"""The tokenizer protocol: what the DiT backbone needs from whatever sits in front of it.

A tokenizer turns an input (an image latent, a cell's expression vector ...) into a
sequence of ``hidden_size`` tokens, and turns the backbone's per-token outputs back into
the input's layout. The backbone never looks at the input itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Tokenizer(nn.Module):
    """Base class of tokenizers.

    Subclasses set ``num_tokens`` (N) and ``token_out_dim`` (the width of the backbone's
    final linear layer per token) and implement :meth:`encode` and :meth:`decode`.

    Attributes
    ----------
    num_tokens
        Number of tokens N a sample becomes.
    token_out_dim
        Width of each output token that :meth:`decode` consumes.
    """

    num_tokens: int
    token_out_dim: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch -> tokens (B, N, hidden_size), positions not included."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone output (B, N, token_out_dim) -> output in the input's layout. ``x`` is the
        input the tokens came from (a tokenizer whose tokens are fewer than the input's
        elements may read it out per element; most ignore it)."""
        raise NotImplementedError

    def fixed_positions(self) -> torch.Tensor | None:
        """Fixed (non-learned) position table (1, N, hidden_size) the backbone adds to the
        tokens as its ``pos_embed``, or ``None`` when the tokenizer encodes identity itself."""
        return None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the mismatch when ``x`` does not fit this tokenizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


class CellTokenizer(Tokenizer):
    """Base of tokenizers for cells: the input is a (B, G) batch of expression vectors."""

    n_genes: int

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.n_genes:
            raise ValueError(
                f"cell batch of shape {tuple(x.shape)} does not match the model: expected "
                f"(B, {self.n_genes}) (n_genes={self.n_genes})"
            )
