"""Gene tokenizer: one token per gene (identity embedding plus an embedded value), optionally
read into a few latent tokens by cross-attention so that the backbone's cost does not grow with
the number of genes."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CellTokenizer


class GeneTokenizer(CellTokenizer):
    """One token per gene: ``token_i = gene_embedding[i] + value_embedding(x_i)``.

    ``value_embedding`` is a small MLP (1 -> value_hidden -> hidden_size, SiLU) shared by
    all genes and applied to each scalar, so token i depends on gene i's value only; the
    learned gene embedding carries identity (no fixed positions).

    Without ``latent_tokens`` the backbone attends over the G gene tokens and decodes one
    scalar per token: O(G^2) attention (``scaled_dot_product_attention`` keeps memory linear
    in G, flash kernels on GPU), a few thousand genes at most. With ``latent_tokens = L``
    (Perceiver IO, Jaegle et al. 2021) the gene tokens are *read* into L learned latent
    tokens by one cross-attention (the latents query the genes); the backbone works on the L
    latents, and each gene *reads out* its velocity by cross-attending from its identity
    embedding and its own value to the backbone's L outputs. Cost O(G * L) per layer pair
    instead of O(G^2).

    Parameters
    ----------
    n_genes
        Genes G.
    hidden_size
        Token width D.
    value_hidden
        Hidden width of the value MLP.
    latent_tokens
        Number of latent tokens L (None: one backbone token per gene).
    num_heads
        Heads of the read-in and read-out cross-attentions.
    """

    def __init__(self, n_genes: int, hidden_size: int, value_hidden: int = 64, latent_tokens: int | None = None,
                 num_heads: int = 4):
        super().__init__()
        if latent_tokens is not None and latent_tokens < 1:
            raise ValueError(f"latent_tokens={latent_tokens}: must be >= 1 (or None)")
        if latent_tokens is not None and hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.n_genes, self.hidden_size, self.value_hidden = n_genes, hidden_size, value_hidden
        self.latent_tokens, self.num_heads = latent_tokens, num_heads
        self.gene_embedding = nn.Embedding(n_genes, hidden_size)
        self.value_embedding = nn.Sequential(
            nn.Linear(1, value_hidden), nn.SiLU(), nn.Linear(value_hidden, hidden_size)
        )
        if latent_tokens is None:
            self.num_tokens, self.token_out_dim = n_genes, 1
        else:
            D = hidden_size
            self.num_tokens, self.token_out_dim = latent_tokens, D
            self.latents = nn.Parameter(torch.empty(latent_tokens, D))  # (L, D) the read-in queries
            self.read_q, self.read_kv, self.read_proj = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
            self.out_q, self.out_kv = nn.Linear(D, D), nn.Linear(D, 2 * D)
            # each gene's own linear read-out of what it gathered (G, D): distinct per gene even while the
            # read-out attention is still near uniform (small gene embeddings), as the module tokenizer's maps are
            self.out_weight = nn.Parameter(torch.empty(n_genes, D))
            self.out_bias = nn.Parameter(torch.zeros(n_genes))
        self.reset_parameters()

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``TOKENIZERS["gene"](**config)`` rebuilds the architecture."""
        return {"n_genes": self.n_genes, "hidden_size": self.hidden_size, "value_hidden": self.value_hidden,
                "latent_tokens": self.latent_tokens, "num_heads": self.num_heads}

    def reset_parameters(self) -> None:
        """N(0, 0.02) gene embeddings and latents (like DiT's label table); the linears keep
        the Xavier init DiT gives every linear, and the per-gene read-out its own Xavier scale. An
        untrained model still predicts exactly zero: the backbone's final layer starts at zero,
        so the read-out gathers zero values and adds a zero bias. The read-out weight must *not*
        start at zero too: a product of two zero-initialised factors has zero gradient in both,
        and the flow would never learn."""
        nn.init.normal_(self.gene_embedding.weight, std=0.02)
        if self.latent_tokens is not None:
            nn.init.normal_(self.latents, std=0.02)
            bound = math.sqrt(6.0 / (self.hidden_size + 1))  # Xavier-uniform of a (D -> 1) linear, per gene
            nn.init.uniform_(self.out_weight, -bound, bound)
            nn.init.zeros_(self.out_bias)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of queries (B, Nq, D) to keys/values (B, Nk, 2D) -> (B, Nq, D)."""
        B, Nq, D = q.shape
        H = self.num_heads
        k, v = kv.reshape(B, kv.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q.reshape(B, Nq, H, D // H).transpose(1, 2), k, v)
        return out.transpose(1, 2).reshape(B, Nq, D)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        genes = self.value_embedding(x.unsqueeze(-1)) + self.gene_embedding.weight  # (B, G, D)
        if self.latent_tokens is None:
            return genes
        B = x.shape[0]
        q = self.read_q(self.latents).expand(B, -1, -1)  # (B, L, D)
        return self.latents + self.read_proj(self._attend(q, self.read_kv(genes)))  # (B, L, D)

    def decode(self, tokens: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G, 1) -> (B, G); with latents, (B, L, D) and the input ``x`` (B, G) -> (B, G).

        Each gene reads out from the latents with a query of its identity *and its own input
        value*: the velocity of gene g depends on where gene g is (as in the per-gene residual
        stream without latents). With identity alone the read-out attention is the same for a
        gene in every cell, and the flow barely learns (measured on Papalexi: loss 3.33 after
        1,500 steps, the untrained value; 1.32 with the value)."""
        if self.latent_tokens is None:
            return tokens[..., 0]
        if x is None:
            raise ValueError("GeneTokenizer with latent_tokens: decode needs the input x (B, G)")
        values = self.value_embedding(x.unsqueeze(-1))  # (B, G, D)
        q = self.out_q(self.gene_embedding.weight + values)  # (B, G, D)
        gathered = self._attend(q, self.out_kv(tokens))  # (B, G, D)
        return (gathered * self.out_weight).sum(-1) + self.out_bias  # (B, G)

    def fixed_positions(self) -> None:
        return None


def default_latent_tokens(n_genes: int) -> int:
    """A latent count that grows slowly with the gene count: 32 up to 1,024 genes, then
    sqrt(G) (64 at 4,096 genes, 128 at 16,384)."""
    return max(32, int(math.sqrt(n_genes)))
