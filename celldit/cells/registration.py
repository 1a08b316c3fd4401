"""Registration of an AnnData with a CellDiT: what the model learns from the data before training.

:func:`register` reads the training cells once and returns a :class:`Registration`: the
gene set, the expression rows (centred on their batch's controls), the conditions, their
anchors and shares of escapers, the perturbation vocabulary and prior features, the
tokenizer's settings (gene modules or a codec sample), a bank of control cells for
``generate`` and the basis of the OT cost. Everything here is saved with the model except
the rows themselves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data.gene_selection import select_genes
from ..data.rows import ExpressionRows, counts_source, group_sums
from ..data.spec import PerturbationSpec
from ..tokenizers import modules_from_correlation, modules_from_gene_sets, modules_from_labels
from ..tokenizers.gene import default_latent_tokens
from ..tokenizers.gene_module_builders import read_gmt
from .anchors import ConditionTable, build_condition_table, cell_conditions
from .config import CellDiTConfig
from .dataset import CenteredRows
from .escapers import escaper_fractions
from .priors import expression_gene_features, read_feature_table
from .vocab import PerturbationVocab

__all__ = ["BANK_PER_GROUP", "Registration", "group_codes", "register", "spec_of"]

BANK_PER_GROUP = 500  # control cells per covariate group and batch kept for generate() with a control source
BANK_MAX = 20_000  # at most this many bank cells in all (the quota per group and batch shrinks to fit)
SAMPLE_CELLS = 20_000  # cells that fit the gene modules, the codec and the OT basis
PRIOR_CELLS = 5_000  # control cells that build the expression prior features
MAX_MODULE_SIZE = 64  # genes per module token (larger modules are split), below MAX_DEFAULT_MODULES x 64 genes
MAX_DEFAULT_MODULES = 64  # the default module count stops growing here: the backbone's cost stays bounded
NOISE_RANK = 32  # rank of the noise source's covariance factor


def group_codes(frame: pd.DataFrame) -> np.ndarray:
    """(n,) code of each row's combination of values (no columns -> all zeros)."""
    if frame.shape[1] == 0:
        return np.zeros(len(frame), dtype=np.int64)
    return frame.astype(str).agg("\x1f".join, axis=1).factorize(sort=True)[0].astype(np.int64)


def spec_of(config: CellDiTConfig) -> PerturbationSpec:
    """The :class:`~celldit.data.spec.PerturbationSpec` of a model's registration settings."""
    return PerturbationSpec(config.perturbation_key, config.control, config.delimiter, config.dose_key,
                            tuple(config.covariate_keys))


@dataclass
class Registration:
    """What :func:`register` learned from the training cells (see the module notes)."""

    spec: PerturbationSpec
    genes: list[str]
    space: str
    normalisation: dict[str, Any]  # how inputs are brought to the model's space (see ExpressionRows.basis)
    reference: torch.Tensor  # (G,) mean of all training controls
    conditions: ConditionTable
    trained_groups: list[str]  # "(condition row)\x1e(covariate values)" pairs with training cells
    vocab: PerturbationVocab
    prior: pd.DataFrame | None
    tokenizer_kwargs: dict[str, Any]
    bank_x: torch.Tensor  # (n_bank, G) control cells for generate()
    bank_obs: pd.DataFrame
    bank_library: np.ndarray | None  # (n_bank,) their library sizes (counts layers of generated cells)
    bank_batch: np.ndarray  # (n_bank,) each bank cell's batch: its row of control_batches
    var: pd.DataFrame  # the training data's annotations of the model's genes
    # training data (not saved)
    rows: Any = None
    cond_id: np.ndarray | None = None
    pair_group: np.ndarray | None = None
    cov_group: np.ndarray | None = None
    cov_idx: np.ndarray | None = None
    ot_basis: np.ndarray | None = None
    x_sample: np.ndarray | None = field(default=None, repr=False)
    pca: tuple[np.ndarray, np.ndarray] | None = None  # (mean (G,), components (G, k)) of the outputs' X_pca
    covariate_groups: list[str] = field(default_factory=list)  # code -> covariate values joined by \x1f
    noise_prior: tuple[np.ndarray, np.ndarray] | None = None  # (factor (G, k), sd (G,)) of the noise source
    control_batches: tuple[np.ndarray, np.ndarray] | None = None  # (means (B, G), sizes (B,)) of the batches' controls


def register(adata: AnnData, config: CellDiTConfig) -> Registration:
    """Read the training cells ``adata`` under ``config`` (see the module notes)."""
    spec = spec_of(config)
    spec.validate(adata)
    for key in config.pair_keys:
        spec.require_labels(adata, key, "pair_keys", "a batch label")
    genes = select_genes(adata, config.genes, config.n_top_genes, layer=config.layer, input_space=config.input_space,
                         size_factor_key=config.size_factor_key, seed=config.seed)
    expr = ExpressionRows(adata, genes, layer=config.layer, input_space=config.input_space,
                          size_factor_key=config.size_factor_key)
    space = "log1p_normalized" if expr.counts else "as_given"
    normalisation = {"space": expr.space, "basis": expr.basis, "source": expr.where,
                     "basis_genes": counts_source(adata, config.layer)[1] if expr.basis["kind"] == "total_counts"
                     else None}
    ctrl = spec.control_mask(adata)
    cov_frame = spec.covariates(adata)
    cov_group = group_codes(cov_frame)
    pair_group = group_codes(pd.concat([cov_frame, adata.obs[list(config.pair_keys)].astype(str)], axis=1))
    sums, sizes = group_sums(expr, np.where(ctrl, 0, -1), 1)  # chunked: controls are never all dense at once
    reference = torch.from_numpy((sums[0] / max(sizes[0], 1)).astype(np.float32))
    # the mean control cell of each batch (covariates + pair keys), for control_mean="pooled"
    sums, sizes = group_sums(expr, np.where(ctrl, pair_group, -1), int(pair_group.max(initial=0)) + 1)
    has = sizes > 0
    control_batches = ((sums[has] / sizes[has, None]).astype(np.float32), sizes[has].astype(np.int64))
    rows = centred_rows(expr, adata, ctrl, list(config.pair_keys)) if config.centred else expr
    if not config.pair_keys:
        warn_batch_columns(adata, spec, expr, ctrl, config.seed)
    keys = cell_conditions(adata.obs, spec)
    use_anchor = config.anchor
    anchor_group = pair_group if config.batch_anchored else cov_group
    table, cond_id = build_condition_table(keys, anchor_group, rows, len(genes), anchored=use_anchor,
                                           shrinkage=config.anchor_shrinkage, gate=config.shrinkage_gate,
                                           floor=config.shrinkage_floor,
                                           target_columns={g: j for j, g in enumerate(genes)} if config.on_target
                                           else None, bandwidth_rule=config.group_bandwidth)
    if config.batch_anchored and isinstance(rows, CenteredRows):
        # batches are told apart by their *uncentred* mean control cells (centred ones are all ~0)
        codes, first = np.unique(pair_group, return_index=True)  # a cell of each pairing group
        batch_of = dict(zip(codes.tolist(), rows.batch[first].tolist()))
        table = ConditionTable(table.keys, table.anchors, table.group_shifts,
                               {g: rows.centers[batch_of[g]] for g in table.group_controls}, table.gates,
                               config.group_bandwidth)
    if use_anchor and config.escapers:
        gated = config.anchor_shrinkage in ("hybrid", "gate") and table.gates is not None
        eligible = table.gates >= 1.0 - 1e-6 if gated else np.ones(len(table.keys), dtype=bool)
        table.escapers = escaper_fractions(rows, cond_id, pair_group, table.anchors, eligible, seed=config.seed)
    cov_key = cov_frame.agg("\x1f".join, axis=1) if cov_frame.shape[1] else pd.Series("", index=cov_frame.index)
    trained_groups = sorted({f"{c}\x1e{g}" for c, g in zip(cond_id, cov_key)})
    ctrl_rows = np.flatnonzero(cond_id == 0)
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.permutation(adata.n_obs)[:SAMPLE_CELLS])
    x_sample = rows.all_rows(sample)
    prior = prior_table(config.perturbation_features, rows.all_rows(ctrl_rows[:PRIOR_CELLS]), genes, config.seed)
    vocab = PerturbationVocab.from_adata(adata, spec, extra=[] if prior is None else prior.index)
    tok_kwargs = tokenizer_kwargs(config, adata, genes, x_sample)
    batch_row = np.cumsum(has) - 1  # pair group -> its row of control_batches (groups with controls)
    bank_x, bank_obs, bank_library, bank_batch = control_bank(rows, ctrl_rows, batch_row[pair_group[ctrl_rows]],
                                                              cov_frame, adata.obs_names, rng)
    source_var = adata.raw.var if config.layer == "raw" else adata.var
    var = source_var.loc[genes].copy()
    ot_basis = None
    if config.ot and config.ot_dims:
        from sklearn.decomposition import PCA

        k = int(min(config.ot_dims, x_sample.shape[0] - 1, x_sample.shape[1]))
        ot_basis = PCA(k, random_state=config.seed).fit(x_sample).components_.T.astype(np.float32)  # (G, k)
    pca = output_pca(x_sample, reference.numpy() if rows is not expr else None, config.seed)
    cov_strings = cov_frame.agg("\x1f".join, axis=1) if cov_frame.shape[1] else pd.Series("", index=cov_frame.index)
    covariate_groups = sorted(cov_strings.unique().tolist())
    noise_prior = control_covariance(x_sample[cond_id[sample] == 0], NOISE_RANK) if config.source == "noise" else None
    return Registration(spec, genes, space, normalisation, reference, table, trained_groups, vocab, prior, tok_kwargs,
                        bank_x, bank_obs, bank_library, bank_batch, var, rows, cond_id, pair_group, cov_group, vocab.encode_covariates(cov_frame),
                        ot_basis, x_sample, pca, covariate_groups, noise_prior, control_batches)


def control_covariance(x: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(factor (G, k), sd (G,))`` with ``factor factor^T + diag(sd^2)`` the covariance of the
    control cells ``x``: its top ``k`` principal directions, and the per-gene variance left."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0)
    k = int(min(rank, max(1, len(x) - 1), x.shape[1]))
    _, S, Vt = np.linalg.svd(centred, full_matrices=False)
    factor = Vt[:k].T * (S[:k] / np.sqrt(max(len(x) - 1, 1)))  # (G, k)
    rest = np.clip(centred.var(0, ddof=1) - (factor ** 2).sum(1), 0.0, None)
    if k < rank:
        factor = np.pad(factor, ((0, 0), (0, rank - k)))
    return factor.astype(np.float32), np.sqrt(rest).astype(np.float32)


def output_pca(x_sample: np.ndarray, offset: np.ndarray | None, seed: int, n_components: int = 30
               ) -> tuple[np.ndarray, np.ndarray]:
    """The PCA space of the outputs' ``obsm['X_pca']``: ``n_components`` PCs of the training
    cells (as the evaluation fits them); ``offset`` puts centred cells back on the training
    controls' mean."""
    from sklearn.decomposition import PCA

    k = int(min(n_components, x_sample.shape[0] - 1, x_sample.shape[1]))
    pca = PCA(k, random_state=seed).fit(x_sample)
    mean = pca.mean_ + (0.0 if offset is None else offset)
    return mean.astype(np.float32), pca.components_.T.astype(np.float32)


def centred_rows(expr: ExpressionRows, adata: AnnData, ctrl: np.ndarray, keys: list[str]):
    """Rows relative to their batch's control mean (batches: the values of ``keys``; no keys:
    one batch, the whole data)."""
    batch = group_codes(adata.obs[keys].astype(str)) if keys else np.zeros(adata.n_obs, np.int64)
    values = adata.obs[keys].astype(str).agg("/".join, axis=1).to_numpy() if keys else np.full(adata.n_obs, "all")
    sums, sizes = group_sums(expr, np.where(ctrl, batch, -1), int(batch.max()) + 1)  # one chunked pass
    for b in np.flatnonzero(sizes == 0):
        raise ValueError(f"batch {values[batch == b][0]!r} of pair_keys {keys} ({int((batch == b).sum())} cells) "
                         "has no control cells, so its cells can be neither centred on nor paired with "
                         "controls of their batch; drop those cells, or leave that column out of pair_keys "
                         "(--pair-keys)")
    return CenteredRows(expr, (sums / sizes[:, None]).astype(np.float32), batch)


def warn_batch_columns(adata: AnnData, spec: PerturbationSpec, expr: ExpressionRows, ctrl: np.ndarray,
                       seed: int, max_controls: int = 2000, factor: float = 3.0) -> list[str]:
    """Warn about ``obs`` columns that split the control cells into clearly different groups
    (batches or replicates left out of ``pair_keys``); returns their names.

    A column (2 to 50 levels, not a registered key) is flagged when the energy distance
    between one level's control cells and the others' (30 PCs, at most 300 cells a side) is
    more than ``factor`` times that between two random halves of the controls.
    """
    from ..eval.metrics import energy_distance

    registered = {spec.perturbation_key, spec.dose_key, *spec.covariate_keys}
    candidates = [c for c in adata.obs.columns if c not in registered and
                  (adata.obs[c].dtype == object or isinstance(adata.obs[c].dtype, pd.CategoricalDtype))]
    rng = np.random.default_rng([seed, 17])
    rows = np.flatnonzero(ctrl)
    if not candidates or len(rows) < 60:
        return []
    rows = np.sort(rng.choice(rows, min(max_controls, len(rows)), replace=False))
    from sklearn.decomposition import PCA

    x = expr.all_rows(rows)
    z = PCA(int(min(30, len(rows) - 1, x.shape[1])), random_state=seed).fit_transform(x)

    def energy(a: np.ndarray, b: np.ndarray) -> float:
        a = a if len(a) <= 300 else a[rng.choice(len(a), 300, replace=False)]
        b = b if len(b) <= 300 else b[rng.choice(len(b), 300, replace=False)]
        return energy_distance(a, b)

    half = rng.permutation(len(z))
    noise = energy(z[half[: len(z) // 2]], z[half[len(z) // 2:]])
    found = []
    for column in candidates:
        values = adata.obs[column].astype(str).to_numpy()[rows]
        levels = [v for v in np.unique(values) if (values == v).sum() >= 20]
        if not 2 <= len(levels) <= 50 or len(np.unique(values)) > 50:
            continue
        e = max(energy(z[values == v], z[values != v]) for v in levels)
        if e > factor * noise:
            found.append((e, column))
    if found:
        found.sort(reverse=True)
        shown = ", ".join(f"{c!r} ({e:.2f})" for e, c in found)
        warnings.warn(f"obs column(s) {shown} split the control cells into clearly different groups (energy "
                      f"distance between a group and the rest, vs {noise:.2f} between random halves): if one holds "
                      f"batches or replicates, pass it as pair_keys (--pair-keys {found[0][1]}), so that pairs are "
                      "drawn within a batch and new cells are centred on their own batch's controls", UserWarning,
                      stacklevel=3)
    return [c for _, c in found]


def prior_table(features: Any, x_ctrl: np.ndarray, genes: list[str], seed: int) -> pd.DataFrame | None:
    """Prior features of perturbations (see ``CellDiTConfig.perturbation_features``)."""
    if features is None:
        return None
    if isinstance(features, str) and features == "expression":
        return expression_gene_features(x_ctrl, genes, seed=seed)
    if isinstance(features, (str, Path, pd.DataFrame)):
        return read_feature_table(features)
    raise ValueError(f"perturbation_features={features!r}: use 'expression', a table path, a DataFrame or None")


def gene_modules(modules: Any, adata: AnnData, genes: list[str], n_modules: int | None, x_sample: np.ndarray,
                 seed: int) -> list[list[int]]:
    """The module tokenizer's partition of ``genes`` (see ``CellDiTConfig.modules``)."""
    if isinstance(modules, str) and modules.endswith(".gmt"):
        return modules_from_gene_sets(genes, read_gmt(modules), max_size=MAX_MODULE_SIZE)
    if isinstance(modules, str):
        column = modules[4:] if modules.startswith("var:") else modules
        if column not in adata.var.columns:
            raise ValueError(f"modules={modules!r}: {column!r} is not a column of adata.var; use var:COLUMN, "
                             "a .gmt file of gene sets, or None to cluster genes by co-expression")
        labels = adata.var.loc[genes, column].astype(str).to_numpy()
        return modules_from_labels(labels, max_size=MAX_MODULE_SIZE)
    if isinstance(modules, Mapping):
        return modules_from_gene_sets(genes, modules, max_size=MAX_MODULE_SIZE)
    if modules is not None:
        raise ValueError(f"modules={modules!r}: use var:COLUMN, a .gmt file, a mapping of gene sets or None")
    n = n_modules or min(math.ceil(len(genes) / 16), MAX_DEFAULT_MODULES)
    # beyond 4,096 genes modules grow instead of splitting (a split would add tokens back)
    size = max(MAX_MODULE_SIZE, math.ceil(2 * len(genes) / n))
    return modules_from_correlation(x_sample, n, max_size=size, seed=seed)


def tokenizer_kwargs(config: CellDiTConfig, adata: AnnData, genes: list[str], x_sample: np.ndarray) -> dict:
    """Constructor arguments of the model's tokenizer (``TOKENIZERS[config.tokenizer]``)."""
    G, D = len(genes), config.hidden_size
    if config.tokenizer == "gene":
        latent = config.gene_latent_tokens
        latent = default_latent_tokens(G) if latent == "auto" else latent
        return {"n_genes": G, "hidden_size": D, "latent_tokens": latent, "num_heads": config.num_heads}
    if config.tokenizer == "latent":
        return {"n_genes": G, "hidden_size": D, "latent_dim": min(config.latent_dim, G, len(x_sample) - 1),
                "token_dim": config.token_dim}
    groups = gene_modules(config.modules, adata, genes, config.n_modules, x_sample, config.seed)
    return {"n_genes": G, "hidden_size": D, "modules": [list(map(int, m)) for m in groups]}


def control_bank(rows, ctrl_rows: np.ndarray, ctrl_batch: np.ndarray, cov_frame: pd.DataFrame, names,
                 rng: np.random.Generator) -> tuple[torch.Tensor, pd.DataFrame, np.ndarray | None, np.ndarray]:
    """Up to :data:`BANK_PER_GROUP` control cells of each covariate group and batch (``ctrl_batch``:
    each control row's batch), the sources of generate() with a control source; the quota shrinks
    so that the bank holds at most :data:`BANK_MAX` cells. Kept per batch, so that generate() can
    start from the batches alike to the one it generates in. Returns the cells, their covariates,
    library sizes and batches."""
    strata = cov_frame.iloc[ctrl_rows].astype(str).assign(_batch=ctrl_batch)
    members = list(strata.groupby(list(strata.columns), observed=True).indices.values())
    quota = max(1, min(BANK_PER_GROUP, BANK_MAX // max(len(members), 1)))
    keep = np.sort(np.concatenate([rng.permutation(ctrl_rows[idx])[:quota] for idx in members] or [np.zeros(0)]
                                  ).astype(np.int64))
    bank_obs = cov_frame.iloc[keep].reset_index(drop=True)
    bank_obs.index = np.asarray(names)[keep].astype(str)
    bank_batch = np.asarray(ctrl_batch, dtype=np.int64)[np.searchsorted(ctrl_rows, keep)]  # ctrl_rows is sorted
    return torch.from_numpy(rows.all_rows(keep)), bank_obs, rows.library_sizes(keep), bank_batch
