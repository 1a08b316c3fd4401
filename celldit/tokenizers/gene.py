"""Gene tokenizer: one token per gene, identity embedding plus an embedded value."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CellTokenizer


class GeneTokenizer(CellTokenizer):
    """One token per gene: ``token_i = gene_embedding[i] + value_embedding(x_i)``.

    ``value_embedding`` is a small MLP (1 -> value_hidden -> hidden_size, SiLU) shared by
    all genes and applied to each scalar, so token i depends on gene i's value only; the
    learned gene embedding carries identity (no fixed positions). The backbone decodes
    one scalar per token. With N = G tokens attention costs O(G^2) per layer; the
    backbone uses ``scaled_dot_product_attention`` (flash kernels on GPU), which keeps
    memory linear in G, but a few thousand genes is the practical range.

    Parameters
    ----------
    n_genes
        Genes G; also the number of tokens.
    hidden_size
        Token width D.
    value_hidden
        Hidden width of the value MLP.
    """

    def __init__(self, n_genes: int, hidden_size: int, value_hidden: int = 64):
        super().__init__()
        self.n_genes, self.hidden_size, self.value_hidden = n_genes, hidden_size, value_hidden
        self.num_tokens = n_genes
        self.token_out_dim = 1
        self.gene_embedding = nn.Embedding(n_genes, hidden_size)
        self.value_embedding = nn.Sequential(
            nn.Linear(1, value_hidden), nn.SiLU(), nn.Linear(value_hidden, hidden_size)
        )
        self.reset_parameters()

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``TOKENIZERS["gene"](**config)`` rebuilds the architecture."""
        return {"n_genes": self.n_genes, "hidden_size": self.hidden_size, "value_hidden": self.value_hidden}

    def reset_parameters(self) -> None:
        """N(0, 0.02) gene embeddings (like DiT's label table); the value MLP keeps the
        Xavier init DiT gives every linear (or PyTorch's default outside DiT)."""
        nn.init.normal_(self.gene_embedding.weight, std=0.02)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values = self.value_embedding(x.unsqueeze(-1))  # (B, G, 1) -> (B, G, D)
        return values + self.gene_embedding.weight  # + (G, D)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G, 1) -> (B, G)."""
        return tokens[..., 0]

    def fixed_positions(self) -> None:
        return None
