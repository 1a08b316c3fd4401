"""A realistic synthetic Perturb-seq screen, with its ground truth, of any size.

The generative model, for cell i of cell type c in batch b under perturbation set S:

* cell state: ``z_i ~ N(0, I_K)`` on K low-rank gene programs ``L`` (K, G);
* log expression rate ``eta_ig = base_cg + batch_bg + (z_i L)_g + sum_{p in S, edited} effect_pcg
  + interaction_S g``, where a perturbation p acts on programs (``W_p L``) and knocks its
  target gene down, its response scaled per cell type (``1 + type_response_c``), and a
  fraction ``1 - penetrance_p`` of its cells escape the edit (unaffected, as in CRISPR
  screens: Mixscape's non-perturbed cells);
* library size ``l_i ~ LogNormal(log(library_size), library_sd)``; counts
  ``x_ig ~ NegativeBinomial(mean = l_i softmax(eta_i)_g, dispersion theta)`` (Gamma-Poisson).

Combinations ``A+B`` add their singles' effects plus an interaction term. :func:`simulate`
returns an in-memory AnnData (CSR counts in ``X``) and a :class:`SyntheticTruth`;
:func:`simulate_h5ad` writes the same model chunk by chunk to an ``.h5ad`` file with
bounded memory (the cells of a chunk are drawn from a stream seeded by ``(seed, chunk)``,
so a file depends on the seed and the chunk size). Used by the scale benchmark and as
test fixtures: tests check that a model recovers the true effects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["SyntheticTruth", "simulate", "simulate_h5ad"]


@dataclass
class SyntheticTruth:
    """The parameters a synthetic screen was drawn from (G genes, K programs, P single
    perturbations, T cell types, B batches).

    Attributes
    ----------
    genes, perturbations, cell_types, batches
        Names.
    programs
        (K, G) program loadings.
    base
        (T, G) baseline log rates of each cell type (before the softmax).
    batch_offsets
        (B, G) log-rate offsets of each batch.
    effects
        (P, G) log-rate effect of each single perturbation on an edited cell (type response 0).
    type_response
        (T,) scale of every effect in each cell type (effect * (1 + type_response)).
    penetrance
        (P,) fraction of a perturbation's cells that are edited (the rest escape).
    targets
        (P,) index of each perturbation's target gene, or -1 when the target is not measured.
    interactions
        ``{label: (G,)}`` extra log-rate effect of each combination over the sum of its singles.
    """

    genes: list[str]
    perturbations: list[str]
    cell_types: list[str]
    batches: list[str]
    programs: np.ndarray
    base: np.ndarray
    batch_offsets: np.ndarray
    effects: np.ndarray
    type_response: np.ndarray
    penetrance: np.ndarray
    targets: np.ndarray
    interactions: dict[str, np.ndarray] = field(default_factory=dict)

    def effect_of(self, label: str, cell_type: int = 0, delimiter: str = "+") -> np.ndarray:
        """(G,) log-rate effect of ``label`` on an edited cell of ``cell_type`` (all members edited)."""
        total = np.zeros(len(self.genes))
        if label == "control":
            return total
        for name in label.split(delimiter):
            total += self.effects[self.perturbations.index(name)]
        total *= 1.0 + self.type_response[cell_type]
        return total + self.interactions.get(label, 0.0)


def _parameters(rng: np.random.Generator, n_genes: int, n_perturbations: int, n_programs: int, n_cell_types: int,
                n_batches: int, n_combinations: int, effect_size: float, penetrance: tuple[float, float],
                batch_effect: float, measured_targets: float) -> tuple[SyntheticTruth, list[str]]:
    G, K, P = n_genes, n_programs, n_perturbations
    genes = [f"gene{g:05d}" for g in range(G)]
    names = [f"pert{p:04d}" for p in range(P)]
    programs = rng.normal(0, 1, (K, G)) * (rng.random((K, G)) < 0.15) * 0.5
    base_mean = rng.normal(0, 1.6, G)
    base = base_mean + rng.normal(0, 0.3, (n_cell_types, G))
    offsets = rng.normal(0, batch_effect, (n_batches, G))
    weights = rng.normal(0, 1, (P, K)) * (rng.random((P, K)) < 2.0 / max(K, 1))
    empty = np.flatnonzero(~weights.any(1))  # every perturbation acts on at least one program
    weights[empty, rng.integers(K, size=len(empty))] = rng.normal(0, 1, len(empty))
    strength = effect_size * rng.lognormal(0, 0.8, P) / (1 + rng.lognormal(0, 0.8, P))
    effects = strength[:, None] * (weights @ programs) * 2.0
    targets = np.where(rng.random(P) < measured_targets, rng.choice(G, P, replace=P > G), -1)
    for p, t in enumerate(targets):
        if t >= 0:
            effects[p, t] -= 1.5  # the knock-down of the target's own mRNA
    type_response = np.concatenate([[0.0], rng.normal(0, 0.4, n_cell_types - 1)])
    pen = rng.uniform(*penetrance, P)
    combos: list[str] = []
    interactions = {}
    while len(combos) < min(n_combinations, P * (P - 1) // 2):
        a, b = sorted(rng.choice(P, 2, replace=False))
        label = f"{names[a]}+{names[b]}"
        if label not in combos:
            combos.append(label)
            interactions[label] = rng.normal(0, 0.3 * effect_size, G) * (rng.random(G) < 0.05)
    truth = SyntheticTruth(genes, names, [f"type{c}" for c in range(n_cell_types)], [f"batch{b}" for b in range(n_batches)],
                           programs, base, offsets, effects, type_response, pen, targets, interactions)
    return truth, combos


def _labels(rng: np.random.Generator, n_cells: int, truth: SyntheticTruth, combos: list[str],
            control_fraction: float) -> pd.DataFrame:
    options = ["control", *truth.perturbations, *combos]
    n_perturbed = len(options) - 1
    p = np.full(len(options), (1 - control_fraction) / max(n_perturbed, 1))
    p[0] = control_fraction if n_perturbed else 1.0
    labels = rng.choice(len(options), n_cells, p=p / p.sum())
    obs = pd.DataFrame({
        "perturbation": pd.Categorical(np.asarray(options, dtype=object)[labels], categories=options),
        "cell_type": pd.Categorical(np.asarray(truth.cell_types)[rng.integers(len(truth.cell_types), size=n_cells)],
                                    categories=truth.cell_types),
        "batch": pd.Categorical(np.asarray(truth.batches)[rng.integers(len(truth.batches), size=n_cells)],
                                categories=truth.batches),
    }, index=[f"cell{i:07d}" for i in range(n_cells)])
    return obs


def _counts(rng: np.random.Generator, obs: pd.DataFrame, truth: SyntheticTruth, library_size: float,
            library_sd: float, dispersion: float) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """(counts CSR, library sizes, edited) of the cells of ``obs``."""
    n, _G = len(obs), len(truth.genes)
    ct = obs["cell_type"].cat.codes.to_numpy()
    bt = obs["batch"].cat.codes.to_numpy()
    eta = truth.base[ct] + truth.batch_offsets[bt] + rng.normal(0, 1, (n, truth.programs.shape[0])) @ truth.programs
    edited = np.zeros(n, dtype=bool)
    index = {name: i for i, name in enumerate(truth.perturbations)}
    labels = obs["perturbation"].astype(str).to_numpy()
    for label in np.unique(labels):
        if label == "control":
            continue
        rows = np.flatnonzero(labels == label)
        for name in label.split("+"):
            p = index[name]
            hit = rows[rng.random(len(rows)) < truth.penetrance[p]]
            eta[hit] += truth.effects[p] * (1.0 + truth.type_response[ct[hit]])[:, None]
            edited[hit] = True
        if label in truth.interactions:
            eta[rows] += truth.interactions[label]
    eta -= eta.max(1, keepdims=True)
    prob = np.exp(eta)
    prob /= prob.sum(1, keepdims=True)
    lib = rng.lognormal(np.log(library_size), library_sd, n)
    mean = prob * lib[:, None]
    rate = rng.gamma(dispersion, mean / dispersion) if dispersion else mean
    counts = rng.poisson(rate).astype(np.float32)
    return sp.csr_matrix(counts), lib, edited


def _settings(n_genes, n_perturbations, n_programs, n_cell_types, n_batches, n_combinations) -> None:
    for name, value, low in (("n_genes", n_genes, 2), ("n_perturbations", n_perturbations, 0),
                             ("n_programs", n_programs, 1), ("n_cell_types", n_cell_types, 1),
                             ("n_batches", n_batches, 1), ("n_combinations", n_combinations, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{name}={value}: must be an integer >= {low}")


def simulate(n_cells: int = 2000, n_genes: int = 200, n_perturbations: int = 10, *, n_programs: int = 8,
             n_cell_types: int = 1, n_batches: int = 1, n_combinations: int = 0, control_fraction: float = 0.25,
             effect_size: float = 1.0, penetrance: tuple[float, float] = (0.6, 1.0), batch_effect: float = 0.2,
             measured_targets: float = 0.5, library_size: float = 4000.0, library_sd: float = 0.3,
             dispersion: float = 5.0, seed: int = 0) -> tuple[AnnData, SyntheticTruth]:
    """A synthetic screen in memory (see the module notes).

    Parameters
    ----------
    n_cells, n_genes, n_perturbations
        Size: cells, genes and single perturbations.
    n_programs
        Low-rank gene programs (cell-state variation and perturbation responses).
    n_cell_types, n_batches
        Cell types (own baseline and response scale) and batches (log-rate offsets).
    n_combinations
        Pairs ``A+B`` of single perturbations, with an interaction term.
    control_fraction
        Fraction of control cells (the rest spread evenly over the labels).
    effect_size
        Scale of the perturbation effects.
    penetrance
        Range of the per-perturbation fraction of edited cells.
    batch_effect
        Standard deviation of the batch offsets.
    measured_targets
        Fraction of perturbations whose target is a measured gene (knocked down).
    library_size, library_sd
        Median and log-sd of the counts per cell.
    dispersion
        Negative-binomial dispersion theta (0: Poisson).
    seed
        Seed of everything.

    Returns
    -------
    (AnnData, SyntheticTruth): raw counts (float32 CSR) in ``X``; ``obs`` with
    ``perturbation``, ``cell_type``, ``batch``, ``n_counts`` (library size) and ``edited``.
    """
    _settings(n_genes, n_perturbations, n_programs, n_cell_types, n_batches, n_combinations)
    if n_cells < 1:
        raise ValueError(f"n_cells={n_cells}: must be >= 1")
    rng = np.random.default_rng(seed)
    truth, combos = _parameters(rng, n_genes, n_perturbations, n_programs, n_cell_types, n_batches, n_combinations,
                                effect_size, penetrance, batch_effect, measured_targets)
    obs = _labels(rng, n_cells, truth, combos, control_fraction)
    x, lib, edited = _counts(rng, obs, truth, library_size, library_sd, dispersion)
    obs["n_counts"] = np.asarray(x.sum(1)).ravel()
    obs["edited"] = edited
    return AnnData(x, obs=obs, var=pd.DataFrame(index=truth.genes)), truth


def simulate_h5ad(path: str | Path, n_cells: int, n_genes: int = 2000, n_perturbations: int = 100, *,
                  chunk_size: int = 20_000, overwrite: bool = False, seed: int = 0, **kwargs) -> SyntheticTruth:
    """Write a synthetic screen to ``path`` (.h5ad) chunk by chunk, in bounded memory.

    Takes the settings of :func:`simulate`. The counts are appended to an on-disk CSR matrix
    (anndata's sparse-dataset API) one chunk of ``chunk_size`` cells at a time; the file is
    written beside ``path`` and renamed into place when complete.
    """
    import os

    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another file or pass overwrite=True")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    _settings(n_genes, n_perturbations, kwargs.get("n_programs", 8), kwargs.get("n_cell_types", 1),
              kwargs.get("n_batches", 1), kwargs.get("n_combinations", 0))
    library = {k: kwargs.pop(k) for k in ("library_size", "library_sd", "dispersion") if k in kwargs}
    control_fraction = kwargs.pop("control_fraction", 0.25)
    rng = np.random.default_rng(seed)
    params = dict(n_programs=8, n_cell_types=1, n_batches=1, n_combinations=0, effect_size=1.0,
                  penetrance=(0.6, 1.0), batch_effect=0.2, measured_targets=0.5)
    params.update(kwargs)
    truth, combos = _parameters(rng, n_genes, n_perturbations, **params)
    obs = _labels(rng, n_cells, truth, combos, control_fraction)
    lib_kw = dict(library_size=4000.0, library_sd=0.3, dispersion=5.0)
    lib_kw.update(library)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    totals, edited = np.zeros(n_cells), np.zeros(n_cells, dtype=bool)
    try:
        with h5py.File(tmp, "w") as f:
            for k, start in enumerate(range(0, n_cells, chunk_size)):
                sl = slice(start, min(n_cells, start + chunk_size))
                x, _, hit = _counts(np.random.default_rng([seed, k]), obs.iloc[sl], truth, **lib_kw)
                totals[sl], edited[sl] = np.asarray(x.sum(1)).ravel(), hit
                if k == 0:
                    write_elem(f, "X", x)
                else:
                    sparse_dataset(f["X"]).append(x)
            obs["n_counts"], obs["edited"] = totals, edited
            write_elem(f, "obs", obs)
            write_elem(f, "var", pd.DataFrame(index=truth.genes))
            for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
                write_elem(f, key, {})
            f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        ad.read_h5ad(tmp, backed="r").file.close()  # the file opens as an AnnData
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return truth
