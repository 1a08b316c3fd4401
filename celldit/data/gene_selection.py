"""The gene set a model works on: all genes, highly variable genes, a boolean ``var`` column or a list.

Highly variable genes are scanpy's (Seurat flavour), ranked on a seeded sample of the
log-normalised cells read by :class:`~celldit.data.rows.ExpressionRows` in chunks, so that
choosing them costs the same memory for 50,000 cells as for 2 million.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .expression import gene_positions, keep_torch_threads
from .rows import ExpressionRows, check_var_names, counts_source

__all__ = ["select_genes"]

HVG_CELLS = 20_000  # cells (a seeded sample) that rank highly variable genes


def select_genes(adata: AnnData, genes: str | Sequence[str] = "all", n_top_genes: int = 2000, *,
                 layer: str | None = None, input_space: str = "auto", size_factor_key: str | None = None,
                 seed: int = 0) -> list[str]:
    """The gene set a model works on, in ``var`` order unless a list is given.

    ``"all"``; ``"hvg"``: scanpy's Seurat-flavour highly variable genes of the log-normalised
    data (``n_top_genes`` of them), ranked on a seeded sample of at most 20,000 cells read
    in chunks (memory does not grow with the number of cells); ``"var:COLUMN"``: the genes
    whose boolean ``var`` column is true (e.g. ``var:highly_variable`` computed beforehand);
    or a list of gene names.
    """
    source_genes = counts_source(adata, layer)[1]
    if isinstance(genes, str):
        if genes == "all":
            return list(source_genes)
        if genes.startswith("var:"):
            column = genes[4:]
            var = adata.raw.var if layer == "raw" else adata.var
            if column not in var.columns:
                raise ValueError(f"genes={genes!r}: {column!r} is not a column of adata.var "
                                 f"(columns: {list(var.columns)[:20]})")
            values = var[column]
            if values.dtype != bool:
                raise ValueError(f"genes={genes!r}: adata.var[{column!r}] must be boolean (True for the genes to keep)")
            chosen = [str(g) for g, keep in zip(var.index, values.to_numpy()) if keep]
            if not chosen:
                raise ValueError(f"genes={genes!r}: no gene has adata.var[{column!r}] == True")
            return chosen
        if genes != "hvg":
            raise ValueError(f"genes={genes!r}: use 'all', 'hvg', 'var:COLUMN' or a list of gene names")
        if n_top_genes >= len(source_genes):
            return list(source_genes)
        import scanpy as sc

        rows = ExpressionRows(adata, layer=layer, input_space=input_space, size_factor_key=size_factor_key,
                              warn_log1p=False)
        sample = np.sort(np.random.default_rng(seed).permutation(rows.n_obs)[:HVG_CELLS])
        x = sp.vstack([sp.csr_matrix(rows.rows(sample[s: s + 2048])) for s in range(0, len(sample), 2048)])
        norm = AnnData(x, var=pd.DataFrame(index=pd.Index(source_genes)))
        with keep_torch_threads():
            hvg = sc.pp.highly_variable_genes(norm, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
        return [g for g, keep in zip(source_genes, hvg["highly_variable"].to_numpy()) if keep]
    genes = check_var_names(genes, "genes")
    gene_positions(source_genes, genes)
    return genes
