"""Gene-module tokenizer: one token per gene module (a partition of the genes).

Builders of modules (from labels, gene sets or correlation) are in
:mod:`celldit.tokenizers.gene_module_builders`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import CellTokenizer


def validate_partition(modules: Sequence[Sequence[int]], n_genes: int) -> list[list[int]]:
    """Check that ``modules`` partitions ``range(n_genes)`` and return it as lists of int.

    Raises ``ValueError`` naming empty modules and out-of-range, duplicated or missing
    gene indices.
    """
    if len(modules) == 0:
        raise ValueError("modules is empty: need at least one module of gene indices")
    out = [[int(g) for g in m] for m in modules]
    problems = []
    empty = [i for i, m in enumerate(out) if not m]
    if empty:
        problems.append(f"empty modules {_head(empty)}")
    counts = Counter(g for m in out for g in m)
    bad = sorted(g for g in counts if not 0 <= g < n_genes)
    if bad:
        problems.append(f"gene indices out of range [0, {n_genes}): {_head(bad)}")
    dup = sorted(g for g, c in counts.items() if c > 1)
    if dup:
        problems.append(f"genes in more than one module: {_head(dup)}")
    missing = [g for g in range(n_genes) if g not in counts]
    if missing:
        problems.append(f"genes in no module: {_head(missing)}")
    if problems:
        raise ValueError("modules must partition the genes (each exactly once): " + "; ".join(problems))
    return out


def _head(items: list[int], n: int = 10) -> str:
    """The first n items, and how many more."""
    more = f" ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


class GeneModuleTokenizer(CellTokenizer):
    """One token per gene module: ``token_m = x[genes_m] @ W_m + module_embedding[m]``.

    Modules of different sizes are padded to S = the largest size: an index buffer
    (M, S) gathers each module's genes and a mask (M, S) zeroes the padding, so all M
    per-module linear maps run as one einsum over a (M, S, D) weight. The backbone
    outputs S values per token; :meth:`decode` puts value s of token m back on gene
    ``index[m, s]`` and drops the padded ones.

    Parameters
    ----------
    n_genes
        Genes G.
    hidden_size
        Token width D.
    modules
        Lists of gene indices that partition ``range(n_genes)`` (every gene exactly once),
        e.g. from :func:`~celldit.tokenizers.gene_module_builders.modules_from_labels`.
    """

    def __init__(self, n_genes: int, hidden_size: int, modules: Sequence[Sequence[int]]):
        super().__init__()
        # not `self.modules`: that is nn.Module's iterator over submodules
        self.gene_modules = validate_partition(modules, n_genes)
        self.n_genes, self.hidden_size = n_genes, hidden_size
        M, S = len(self.gene_modules), max(len(m) for m in self.gene_modules)
        self.num_tokens, self.token_out_dim, self.module_size = M, S, S
        index = torch.zeros(M, S, dtype=torch.long)  # padding points at gene 0, masked out
        mask = torch.zeros(M, S, dtype=torch.bool)
        for m, genes in enumerate(self.gene_modules):
            index[m, : len(genes)] = torch.tensor(genes)
            mask[m, : len(genes)] = True
        gene_pos = torch.empty(n_genes, dtype=torch.long)  # gene -> flat slot m * S + s
        gene_pos[index[mask]] = torch.nonzero(mask.reshape(-1)).squeeze(1)
        # derived from the config, so not saved in the state_dict
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("gene_pos", gene_pos, persistent=False)
        self.weight = nn.Parameter(torch.empty(M, S, hidden_size))  # (M, S, D)
        self.module_embedding = nn.Parameter(torch.empty(M, hidden_size))  # (M, D), also the bias
        self.reset_parameters()

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``TOKENIZERS["module"](**config)`` rebuilds the architecture."""
        return {"n_genes": self.n_genes, "hidden_size": self.hidden_size, "modules": [list(m) for m in self.gene_modules]}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform per module (fan-in = the module's size), zero padding, N(0, 0.02)
        module embeddings."""
        sizes = self.mask.sum(1, keepdim=True).float()  # (M, 1)
        bound = torch.sqrt(6.0 / (sizes + self.hidden_size)).unsqueeze(-1)  # (M, 1, 1)
        self.weight.uniform_(-1.0, 1.0).mul_(bound).mul_(self.mask.unsqueeze(-1))
        nn.init.normal_(self.module_embedding, std=0.02)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # zeroed padding gives padded weights neither an effect nor a gradient
        xm = x[:, self.index].masked_fill(~self.mask, 0.0)  # (B, M, S)
        return torch.einsum("bms,msd->bmd", xm, self.weight) + self.module_embedding  # (B, M, D)

    def decode(self, tokens: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M, S) -> (B, G): each gene reads its module's slot; padded slots are dropped."""
        return tokens.reshape(len(tokens), -1)[:, self.gene_pos]

    def fixed_positions(self) -> None:
        return None


