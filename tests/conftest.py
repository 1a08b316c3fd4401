"""Shared test settings, the synthetic AnnData builder, and the real data sets.

The suite's models are tiny: one intra-op thread is as fast as two and does not stall
when another process holds the second core (CI machines have two). Tests marked ``slow``
take more than about ten seconds; ``gpu`` tests need CUDA and are skipped, saying so,
without it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

torch.set_num_threads(1)

#: the real data sets beside the repository (``../shared/data``)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: the repository's configs/
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_data(name: str) -> Path:
    """Path of a real data file in ``../shared/data``.

    Outside CI a checkout without that folder skips the test, saying where the file was
    looked for; under CI (``CI`` set) a missing file fails, so real-data tests never pass
    by being skipped.
    """
    path = SHARED_DATA / name
    if not path.is_file():
        message = f"real data file {path} not found (the shared data folder sits beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_diffusers():
    """Import diffusers (the ``parity`` extra). Without it the test is skipped, saying how
    to install it; under CI, which installs the extra, a failed import fails the test."""
    try:
        import diffusers
    except ImportError as err:
        message = f"diffusers is the parity reference: pip install 'celldit[parity]' ({err})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return diffusers


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_adata(labels: Sequence[str] | Mapping[str, int], n_genes: int = 12, *, key: str = "perturbation",
               space: str = "counts", effects: Mapping[str, Mapping[int, float]] | None = None,
               penetrance: Mapping[str, float] | None = None, obs: Mapping[str, Sequence] | None = None,
               level: float | Sequence[float] = 4.0, spread: float = 0.3, sparse: bool = True, seed: int = 0,
               gene_prefix: str = "g") -> AnnData:
    """The suite's synthetic AnnData: cells with known labels and planted effects.

    Parameters
    ----------
    labels
        One label per cell, or ``{label: number of cells}``.
    n_genes
        Genes ``g0, g1, ...``.
    key
        obs column of the labels.
    space
        ``"counts"``: Poisson counts of rate ``level`` (per gene), an effect multiplying the
        rate by ``exp(shift)``; ``"log"``: log-space values ``N(level, spread^2)`` clipped at
        0, an effect adding ``shift`` (used as given: non-integer X).
    effects
        ``{label: {gene index: shift}}``.
    penetrance
        ``{label: fraction}`` of that label's cells that carry its effect (the first ones);
        default 1.
    obs
        Further obs columns, each cycled to the number of cells.
    level, spread
        Gene levels (scalar or per gene) and, in log space, the cells' spread.
    sparse
        CSR (default) or dense X.
    seed
        Seed of the draws.
    """
    if isinstance(labels, Mapping):
        labels = [lab for lab, n in labels.items() for _ in range(n)]
    labels = list(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    level = np.broadcast_to(np.asarray(level, dtype=np.float64), (n_genes,))
    shift = np.zeros((n, n_genes))
    lab = np.asarray(labels, dtype=object)
    for name, genes in (effects or {}).items():
        rows = np.flatnonzero(lab == name)
        rows = rows[: int(round((penetrance or {}).get(name, 1.0) * len(rows)))]
        for g, value in genes.items():
            shift[rows, g] += value
    if space == "counts":
        x = rng.poisson(level * np.exp(shift)).astype(np.float32)
        x[:, 0] += 1  # every cell has counts
    elif space == "log":
        x = np.clip(level + spread * rng.standard_normal((n, n_genes)) + shift, 0, None).astype(np.float32)
    else:
        raise ValueError(f"space={space!r}")
    frame = pd.DataFrame({key: labels}, index=[f"cell{i}" for i in range(n)])
    for column, values in (obs or {}).items():
        frame[column] = np.resize(np.asarray(values, dtype=object), n)
    return AnnData(sp.csr_matrix(x) if sparse else x, obs=frame,
                   var=pd.DataFrame(index=[f"{gene_prefix}{i}" for i in range(n_genes)]))


class ArrayRows:
    """Expression rows of a plain array, as they are (what PairedBatches and the condition
    table read: ``rows(idx)``, ``n_obs``, ``n_vars``); ids planted in the values stay exact."""

    def __init__(self, x: np.ndarray):
        self.x, (self.n_obs, self.n_vars) = np.asarray(x, dtype=np.float32), np.shape(x)

    def rows(self, idx) -> np.ndarray:
        return self.x[np.asarray(idx)]


@pytest.fixture(scope="session")
def synthetic_screen():
    """A small realistic screen from :func:`celldit.data.synthetic.simulate` and its truth:
    2,400 cells x 60 genes, 6 perturbations, 2 combinations, 2 cell types, 2 batches."""
    from celldit.data.synthetic import simulate

    return simulate(2400, 60, 6, n_combinations=2, n_cell_types=2, n_batches=2, n_programs=4, seed=3)
