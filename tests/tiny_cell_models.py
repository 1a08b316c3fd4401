"""Tiny CellDiT models and planted data shared by the model tests (`tests/cells/test_model*.py`).

The planted data set: 24 genes in log space (X used as given); control cells ~ N(mu, 0.3^2)
and perturbation P cells with a bimodal response on genes 0-3 (half the cells +3, half 0:
a mean shift of +1.5 and a far wider spread).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from anndata import AnnData
from conftest import make_adata

from celldit.cells import CellDiT

G, N_CTRL, N_P = 24, 200, 200
SHIFTED = slice(0, 4)
TINY = {"hidden_size": 32, "depth": 1, "num_heads": 4}
FIT = {"batch_size": 128, "block_size": 64, "warmup_steps": 20, "ema_decay": None,
       "trainer": {"progress_bar": False, "logger": None}}


def planted_adata(seed: int = 0) -> AnnData:
    mu = np.random.default_rng(seed).uniform(1.5, 3.0, G)
    return make_adata({"control": N_CTRL, "P": N_P}, G, space="log", level=mu, spread=0.3, sparse=False,
                      effects={"P": dict.fromkeys(range(4), 3.0)}, penetrance={"P": 0.5}, seed=seed)


def build(adata: AnnData, **kwargs) -> CellDiT:
    """A tiny CellDiT (log-space X: the 'used as given' warning is expected and silenced)."""
    kw = dict(TINY, tokenizer="module", perturbation_features=None)
    kw.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CellDiT(adata, **kw)


def counterfactual(model: CellDiT, adata: AnnData, label, **kwargs) -> AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.counterfactual(adata, label, **kwargs)


def jiggle(model: CellDiT, seed: int = 0, scale: float = 0.1) -> CellDiT:
    """Random trainable weights, so that outputs depend on every weight (the untrained
    adaLN-Zero network outputs exactly zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.network.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def counts_adata(seed: int = 0, n_genes: int = 12) -> AnnData:
    """Counts with two cell types and two replicates; perturbations P (raises g1) and Q."""
    rng = np.random.default_rng(seed + 100)
    level = rng.uniform(1, 8, n_genes)
    return make_adata({"control": 24, "P": 16, "Q": 16}, n_genes, effects={"P": {1: 1.6}}, level=level, sparse=False,
                      obs={"cell_type": ["T", "B"], "replicate": rng.permutation(np.repeat(["r1", "r2"], 28))},
                      seed=seed)
