"""Score predicted cells against real cells, condition by condition.

A *condition* is a perturbation label together with the values of the covariate keys
(e.g. ``stim`` in ``cluster_id = B cells``). For each condition of the prediction the
true cells T, the predicted cells G and the control cells C (real controls with the same
covariates) are gathered; only those rows are densified, never a whole data set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celldit.data.expression import check_expression, keep_torch_threads
from celldit.data.spec import PerturbationSpec
from celldit.eval import metrics as M
from celldit.eval.pca import PCASpace

__all__ = [
    "CORE_METRICS",
    "EXTRA_METRICS",
    "condition_name",
    "group_rows",
    "align_prediction",
    "rank_test_de_genes",
    "score_conditions",
    "score_predictions",
]

#: metric columns fixed by the report formats (metrics.csv, summary.json)
CORE_METRICS = ("pearson_delta_all", "pearson_delta_de20", "mse_de20", "r2_mean",
                "edistance", "mmd", "discrimination")
#: further metric columns always reported after the core ones
EXTRA_METRICS = ("mae_de20", "sliced_wasserstein")
#: columns added by the rank-test DE option
RANK_TEST_METRICS = ("pearson_delta_rankde20", "mse_rankde20", "mae_rankde20")


def condition_name(label: str, covariates: Iterable[str] = ()) -> str:
    """``"label"`` or, with covariates, ``"label | cov1 | cov2"`` (values in key order)."""
    covs = [str(c) for c in covariates]
    return " | ".join([str(label), *covs])


def group_rows(adata: AnnData, spec: PerturbationSpec) -> dict[tuple[str, ...], np.ndarray]:
    """Row indices of each (label, *covariate values) group of ``adata``."""
    frame = pd.DataFrame({"__label": spec.labels(adata)}, index=np.arange(adata.n_obs))
    covs = spec.covariates(adata)
    for key in spec.covariate_keys:
        frame[key] = covs[key].to_numpy()
    keys = ["__label", *spec.covariate_keys]
    return {tuple(str(v) for v in (k if isinstance(k, tuple) else (k,))): np.asarray(idx)
            for k, idx in frame.groupby(keys, sort=True, observed=True).indices.items()}


def align_prediction(real: AnnData, pred: AnnData, spec: PerturbationSpec,
                     name: str = "pred") -> AnnData:
    """Check a prediction against the real data; return it with genes in real's order.

    Raises
    ------
    ValueError
        If the prediction lacks the perturbation or a covariate key, its genes differ from
        the real genes, or its ``X`` holds NaN or infinite values (negative values are
        allowed: a shifted control cell may dip below 0).
    """
    for key in (spec.perturbation_key, *spec.covariate_keys):
        if key not in pred.obs.columns:
            raise ValueError(
                f"{name}: obs key {key!r} is missing (columns: {list(pred.obs.columns)[:20]}); "
                "the prediction must label each cell under the registered keys"
            )
    real_genes, pred_genes = pd.Index(real.var_names), pd.Index(pred.var_names)
    if not pred_genes.is_unique:
        raise ValueError(f"{name}: var_names are not unique")
    if not real_genes.equals(pred_genes):
        missing = real_genes.difference(pred_genes)
        extra = pred_genes.difference(real_genes)
        if len(missing) or len(extra):
            raise ValueError(
                f"{name} and real have different genes: {len(missing)} real genes missing "
                f"from {name} (e.g. {list(missing[:5])}), {len(extra)} {name} genes not in real "
                f"(e.g. {list(extra[:5])}); predict on the real var_names"
            )
        pred = pred[:, real_genes].copy()
    check_expression(pred.X, f"{name} X", allow_negative=True)
    return pred


def rank_test_de_genes(true_cells, control_cells, k: int = 20,
                       method: str = "wilcoxon") -> np.ndarray:
    """Top-``k`` DE genes of T vs C by scanpy's ``rank_genes_groups`` (``rankby_abs=True``).

    Genes are ranked by the absolute test statistic of ``method`` (default Wilcoxon
    rank-sum) comparing the true cells with the control cells; returns gene indices.
    """
    import scanpy as sc

    def dense(x):
        return x.toarray() if sp.issparse(x) else np.asarray(x)

    x = np.vstack([dense(true_cells), dense(control_cells)]).astype(np.float64)
    groups = np.array(["T"] * true_cells.shape[0] + ["C"] * control_cells.shape[0])
    ad = AnnData(x, obs=pd.DataFrame({"g": pd.Categorical(groups)},
                                     index=[str(i) for i in range(len(groups))]))
    ad.var_names = [str(i) for i in range(x.shape[1])]
    with keep_torch_threads():
        sc.tl.rank_genes_groups(ad, "g", groups=["T"], reference="C", method=method,
                                rankby_abs=True, n_genes=min(k, x.shape[1]))
    names = ad.uns["rank_genes_groups"]["names"]["T"]
    return np.asarray([int(n) for n in names[:k]])


def _subsample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= n:
        return rows
    return np.sort(rng.choice(rows, n, replace=False))


def score_predictions(real: AnnData, pred: AnnData, spec: PerturbationSpec, space: PCASpace, *,
                      method: str = "model", **kwargs) -> pd.DataFrame:
    """One row of metrics per predicted condition of ``pred`` (AnnData of predicted cells)
    against ``real`` (see :func:`score_conditions` for the keyword arguments)."""
    from .cells import CellsPrediction, GroupedCells

    spec.validate(real)
    pred = align_prediction(real, pred, spec)
    prediction = CellsPrediction(GroupedCells.from_adata(pred, spec, prediction=True))
    return score_conditions(GroupedCells.from_adata(real, spec), prediction, spec, space, method=method, **kwargs)


def score_conditions(
    real: Any,
    prediction: Any,
    spec: PerturbationSpec,
    space: PCASpace,
    *,
    method: str = "model",
    k_de: int = 20,
    max_cells: int = 300,
    seed: int = 0,
    rank_test: bool = False,
    n_projections: int = 50,
) -> pd.DataFrame:
    """One row of metrics per predicted condition.

    Parameters
    ----------
    real
        Real cells (:class:`~celldit.eval.cells.GroupedCells`, log1p-normalised on read): the
        true cells of every predicted condition and the control cells of each covariate group.
    prediction
        A prediction (:class:`~celldit.eval.cells.CellsPrediction` or
        :class:`~celldit.eval.cells.ShiftPrediction`): for each condition, its mean predicted
        cell and cells drawn from it. Control conditions are ignored.
    spec
        The perturbation spec of ``real``.
    space
        A fitted :class:`PCASpace` (for ``edistance``, ``mmd``, ``sliced_wasserstein``).
    method
        Value of the ``method`` column.
    k_de
        Number of DE genes for the ``*_de20`` columns (20 by default; the column names keep
        ``de20``).
    max_cells
        Cells per side for the distribution metrics: ``n = min(|T|, max_cells)``. The n true
        cells are drawn without replacement, the n predicted cells with replacement (so a
        prediction of any size gives n cells), with
        ``numpy.random.default_rng([seed, i, side])`` for the i-th condition (sorted order),
        so every method sees the same true cells. At most these cells (and one condition's
        true cells for the means) are held at once.
    rank_test
        Also report ``pearson_delta_rankde20``, ``mse_rankde20``, ``mae_rankde20`` on the DE
        genes of :func:`rank_test_de_genes`.
    n_projections
        Directions of :func:`~celldit.eval.metrics.sliced_wasserstein`.

    Returns
    -------
    pandas.DataFrame
        Columns ``condition, method``, :data:`CORE_METRICS`, :data:`EXTRA_METRICS`
        (+ rank-test columns), then ``perturbation``, the covariate keys, ``n_true``,
        ``n_pred``, ``n_control``.
    """
    keys = [k for k in prediction.keys() if k[0] not in spec.control_labels]
    if not keys:
        raise ValueError(f"pred has no perturbed cells in obs[{spec.perturbation_key!r}]")
    records, pred_deltas, true_deltas = [], [], []
    for i, key in enumerate(sorted(keys)):
        name = condition_name(key[0], key[1:])
        if key not in real.groups:
            where = "" if not spec.covariate_keys else (
                f" with {dict(zip(spec.covariate_keys, key[1:]))}")
            raise ValueError(
                f"condition {key[0]!r}{where} of pred is absent from the real data "
                f"(obs[{spec.perturbation_key!r}]); evaluate only conditions that were measured"
            )
        control_keys = real.control_keys(spec, key[1:])
        if not control_keys:
            raise ValueError(f"no real control cells for covariates "
                             f"{dict(zip(spec.covariate_keys, key[1:]))} (condition {name!r})")
        t_rows = real.groups[key]
        mean_t, mean_c, mean_g = real.mean(key), real.mean(control_keys), prediction.mean(key)
        d_true, d_pred = mean_t - mean_c, mean_g - mean_c
        de = M.top_k_de_genes(d_true, k_de)
        rec = {
            "condition": name, "method": method,
            "pearson_delta_all": M.pearson_delta(d_true, d_pred),
            "pearson_delta_de20": M.pearson_delta(d_true, d_pred, de),
            "mse_de20": M.mse(mean_g, mean_t, de),
            "r2_mean": M.r2_mean(mean_g, mean_t),
        }
        t_sub = _subsample(t_rows, max_cells, np.random.default_rng([seed, i, 0]))
        zt = space.transform(real.cells(t_sub))
        zg = space.transform(prediction.sample(key, len(t_sub), np.random.default_rng([seed, i, 1])))
        rec["edistance"] = M.energy_distance(zg, zt)
        rec["mmd"] = M.mmd_rbf(zg, zt)
        rec["discrimination"] = np.nan  # filled below
        rec["mae_de20"] = M.mae(mean_g, mean_t, de)
        rec["sliced_wasserstein"] = M.sliced_wasserstein(zg, zt, n_projections, seed=seed)
        c_rows = np.concatenate([real.groups[k] for k in control_keys])
        if rank_test:
            de_r = rank_test_de_genes(real.cells(t_rows), real.cells(c_rows), k_de)
            rec["pearson_delta_rankde20"] = M.pearson_delta(d_true, d_pred, de_r)
            rec["mse_rankde20"] = M.mse(mean_g, mean_t, de_r)
            rec["mae_rankde20"] = M.mae(mean_g, mean_t, de_r)
        rec["perturbation"] = key[0]
        rec.update(dict(zip(spec.covariate_keys, key[1:])))
        rec.update(n_true=len(t_rows), n_pred=prediction.size(key), n_control=len(c_rows))
        records.append(rec)
        pred_deltas.append(d_pred)
        true_deltas.append(d_true)
    table = pd.DataFrame.from_records(records)
    table["discrimination"] = M.discrimination_scores(np.vstack(pred_deltas),
                                                      np.vstack(true_deltas))
    return table
