"""Evaluate a prediction beside the baselines and write the report files.

:func:`evaluate` writes into ``out_dir``:

* ``metrics.csv`` - one row per condition and method (columns in ``docs/evaluation.md``);
* ``summary.json`` - ``{method: {metric: mean over conditions, metric_median: median}}``
  plus ``"n_conditions"``;
* ``report.md`` - the summary and per-condition tables in markdown;
* ``settings.json`` - spec, PCA space, seeds, baseline notes, split;
* ``figures/``: ``metrics_by_condition.png``, ``pca_real_vs_pred.png``, ``delta_scatter.png``
  (predicted vs true deltas), ``umap.png`` (real and predicted cells) and ``loss.png``;
* ``cell_eval/`` - ``real.h5ad`` and ``pred_<method>.h5ad`` in the layout of the
  ``cell-eval`` package, with the command to run it in ``cell_eval/README.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from celldit.data.spec import PerturbationSpec
from celldit.eval.baselines import BASELINES, make_baseline
from celldit.eval.pca import PCASpace
from celldit.eval.scoring import CORE_METRICS, EXTRA_METRICS, RANK_TEST_METRICS, condition_name, score_conditions

__all__ = ["EvaluationResult", "align_genes", "evaluate", "fit_baseline", "summarize"]


@dataclass
class EvaluationResult:
    """What :func:`evaluate` computed: the per-condition ``table``, the ``summary`` dict,
    the written ``files`` and the baselines' ``predictions``."""

    table: pd.DataFrame
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    predictions: dict[str, AnnData] = field(default_factory=dict)


def summarize(table: pd.DataFrame) -> dict[str, Any]:
    """``{method: {metric: mean, metric + "_median": median}}`` + ``n_conditions``.

    Means and medians are over conditions, ignoring NaN (e.g. an undefined Pearson).
    ``n_conditions`` is the number of distinct conditions in ``table``.
    """
    metrics = [m for m in (*CORE_METRICS, *EXTRA_METRICS, *RANK_TEST_METRICS)
               if m in table.columns]
    out: dict[str, Any] = {}
    for method, sub in table.groupby("method", sort=False):
        entry: dict[str, float | None] = {}
        for m in metrics:
            vals = sub[m].to_numpy(dtype=float)
            ok = vals[np.isfinite(vals)]
            entry[m] = float(ok.mean()) if ok.size else None
        for m in metrics:
            vals = sub[m].to_numpy(dtype=float)
            ok = vals[np.isfinite(vals)]
            entry[f"{m}_median"] = float(np.median(ok)) if ok.size else None
        out[str(method)] = entry
    out["n_conditions"] = int(table["condition"].nunique())
    return out


def _markdown(summary: dict[str, Any], table: pd.DataFrame, settings: dict[str, Any]) -> str:
    metrics = [m for m in (*CORE_METRICS, *EXTRA_METRICS) if m in table.columns]

    def fmt(v):
        return "nan" if v is None or not np.isfinite(v) else f"{v:.4g}"

    lines = ["# celldit evaluation", "",
             f"{summary['n_conditions']} conditions; expression log1p(normalize_total(1e4)); "
             f"distribution metrics in {settings['pca']['n_components_fitted']} PCs, "
             f"at most {settings['max_cells']} cells a side.", "",
             "## Mean over conditions", "",
             "| method | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for method, entry in summary.items():
        if isinstance(entry, dict):
            lines.append(f"| {method} | " + " | ".join(fmt(entry.get(m)) for m in metrics) + " |")
    lines += ["", "## Per condition", "", "| condition | method | " + " | ".join(metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for _, row in table.iterrows():
        lines.append(f"| {row['condition']} | {row['method']} | "
                     + " | ".join(fmt(float(row[m])) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def evaluate(real: AnnData, pred: AnnData | None, spec: PerturbationSpec, *,
             train: AnnData | None = None, baselines: Sequence[str] = (),
             out_dir: str | Path | None = None, n_pcs: int = 30, max_cells: int = 300,
             seed: int = 0, rank_test: bool = False, figures: bool = True,
             cell_eval: bool = True, umap: bool = True, split: dict[str, Any] | None = None,
             normalize: bool = True, min_cells: int = 1, run_cell_eval: bool = False,
             loss_curve: tuple[list[int], list[float]] | None = None, layer: str | None = None,
             export_cells: int = 1000) -> EvaluationResult:
    """Score ``pred`` (method ``model``) and the named baselines on the conditions of ``pred``.

    Memory stays bounded by one condition: real and training cells are read through
    :class:`~celldit.data.rows.ExpressionRows` (counts normalised on read, nothing copied),
    group means come from one chunked pass, and each method contributes at most
    ``max_cells`` cells of a condition at a time (a baseline's cells are control cells plus
    its shift, built for the drawn cells only).

    Parameters
    ----------
    real
        Real cells: the true cells of each predicted condition and the control cells of
        each covariate group (counts or log1p-normalised; in memory or backed).
    pred
        Predicted cells labelled under ``spec``'s keys (their genes: all of ``real``'s or a
        subset, e.g. a model's genes); None to score baselines only (on every perturbed
        condition of ``real``).
    spec
        Keys and control label(s).
    train
        Training cells: fit the baselines and the PCA space. Without it the PCA space is
        fitted on ``real`` and baselines cannot run.
    baselines
        Names from :data:`celldit.eval.baselines.BASELINES`, or ``["all"]`` (``additive``
        only when a predicted condition is a combination).
    out_dir
        Where to write the report files (nothing is written when None).
    n_pcs, max_cells, seed, rank_test
        PCA dimension, cells a side, seed, and the rank-test DE columns
        (see :func:`~celldit.eval.scoring.score_conditions`).
    figures, cell_eval
        Write the PNG figures (metrics, PCA, predicted-vs-true deltas, UMAP) / the cell-eval
        files (with ``out_dir``; at most ``export_cells`` cells of a condition per method).
    umap
        With ``figures``, also draw ``figures/umap.png`` (scanpy's neighbours and UMAP: about
        20 s on a 2-core CPU, most of it numba compiling UMAP's kernels once per process).
    split
        A split's ``to_dict()`` to record in ``settings.json``.
    normalize
        Read ``real``/``train`` as counts or log1p values, whichever they hold (False: they
        are log1p-normalised already).
    min_cells
        Score only conditions with at least this many real cells (the DESIGN protocols use
        40); smaller conditions are listed in ``settings.json`` under ``dropped_conditions``.
    run_cell_eval
        Also run the cell-eval package on the exported files (when installed) and put its
        mean scores under ``summary['cell_eval']``.
    loss_curve
        ``(steps, losses)`` of the model's training, drawn as ``figures/loss.png``.
    layer
        Where the real and training cells' values are (see
        :func:`~celldit.data.rows.counts_source`).
    """
    from celldit.eval.cells import CellsPrediction, GroupedCells, ShiftPrediction

    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}")
    space_of = "auto" if normalize else "log1p"
    if not normalize:
        layer = layer or "X"  # X holds the log1p values (a counts layer beside them is not read)
    spec.validate(real)
    genes = None
    if pred is not None:
        pred = align_genes(real, pred, spec)
        genes = list(map(str, pred.var_names))
    real_cells = _grouped(real, spec, genes, layer, space_of)
    baselines = list(baselines)
    if baselines == ["all"]:
        baselines = [b for b in BASELINES if b != "additive"] + ["additive"]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {sorted(BASELINES)} or all")
    if baselines and train is None:
        raise ValueError("baselines need training cells: pass train= (--train or --split)")
    if pred is None and not baselines:
        raise ValueError("nothing to evaluate: give a prediction or at least one baseline")
    train_cells = None
    if train is not None:
        spec.validate(train)
        missing = pd.Index(real_cells.genes).difference(pd.Index(map(str, train.var_names)))
        if len(missing):
            raise ValueError(f"train lacks {len(missing)} of the evaluated genes (e.g. {list(missing[:5])})")
        train_cells = _grouped(train, spec, real_cells.genes, layer, space_of)
    space = PCASpace(n_pcs, seed=seed).fit_rows((train_cells or real_cells).rows)

    small = {k for k, rows in real_cells.groups.items() if k[0] not in spec.control_labels and len(rows) < min_cells}
    dropped = sorted(condition_name(k[0], k[1:]) for k in small)
    tables, predictions = [], {}
    keys = sorted(k for k in real_cells.groups if k[0] not in spec.control_labels and k not in small)
    if pred is not None:
        model = CellsPrediction(GroupedCells.from_adata(pred, spec, prediction=True))
        model.cells_.groups = {k: v for k, v in model.cells_.groups.items() if k not in small}
        tables.append(score_conditions(real_cells, model, spec, space, method="model",
                                       max_cells=max_cells, seed=seed, rank_test=rank_test))
        predictions["model"] = model
        keys = sorted(k for k in model.keys() if k[0] not in spec.control_labels)
    has_combo = any(spec.is_combination(k[0]) for k in keys)
    notes: dict[str, list[str]] = {}
    for name in baselines:
        if name == "additive" and not has_combo:
            notes[name] = ["skipped: no combination among the predicted conditions"]
            continue
        fitted = make_baseline(name).fit(train_cells, spec)
        predictions[name] = ShiftPrediction(fitted, real_cells, spec, keys)
        tables.append(score_conditions(real_cells, predictions[name], spec, space, method=name,
                                       max_cells=max_cells, seed=seed, rank_test=rank_test))
        notes[name] = list(fitted.notes)
    table = pd.concat(tables, ignore_index=True)
    summary = summarize(table)
    result = EvaluationResult(table, summary, predictions=predictions)
    if out_dir is None:
        return result

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"spec": spec.to_dict(), "pca": space.describe(), "pca_fitted_on":
                "train" if train is not None else "real", "max_cells": max_cells, "seed": seed,
                "k_de": 20, "rank_test": rank_test, "baselines": baselines,
                "baseline_notes": notes, "split": split, "min_cells": min_cells,
                "dropped_conditions": dropped, "genes": len(real_cells.genes)}
    files = result.files
    files["metrics"] = out / "metrics.csv"
    table.to_csv(files["metrics"], index=False)
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    files["settings"] = out / "settings.json"
    files["settings"].write_text(json.dumps(settings, indent=2, default=str) + "\n")
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(_markdown(summary, table, settings))
    if figures:
        from celldit.eval.figures import (
            plot_delta_scatter,
            plot_metric_bars,
            plot_pca_real_vs_pred,
            plot_umap_real_vs_pred,
        )

        fig_dir = out / "figures"
        files["fig_metrics"] = plot_metric_bars(table, fig_dir / "metrics_by_condition.png")
        files["fig_pca"] = plot_pca_real_vs_pred(real_cells, predictions, spec, space,
                                                 fig_dir / "pca_real_vs_pred.png", seed=seed)
        shown = next((m for m in ("model", "mean_shift") if m in predictions), next(iter(predictions)))
        files["fig_delta"] = plot_delta_scatter(real_cells, predictions[shown], spec, fig_dir / "delta_scatter.png",
                                                method=shown)
        if umap:
            files["fig_umap"] = plot_umap_real_vs_pred(real_cells, predictions[shown], spec, space,
                                                       fig_dir / "umap.png", seed=seed)
        if loss_curve is not None:
            from celldit.train.callbacks import write_loss_curve

            files["fig_loss"] = write_loss_curve(fig_dir, *loss_curve)["loss_png"]
    if cell_eval or run_cell_eval:
        from celldit.eval.cell_eval import export_cell_eval
        from celldit.eval.cell_eval import run_cell_eval as run_it

        exported = export_cell_eval(real_cells, predictions, spec, out / "cell_eval", max_cells=export_cells,
                                    seed=seed)
        files.update({f"cell_eval_{key}": path for key, path in exported.items()})
        if run_cell_eval:
            summary["cell_eval"] = run_it(exported, out / "cell_eval")
            files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return result


def align_genes(real: AnnData, pred: AnnData, spec: PerturbationSpec) -> AnnData:
    """Check the prediction's keys and genes: its genes must be among the real ones (the
    real cells are normalised over all of theirs, then scored on the prediction's)."""
    for key in (spec.perturbation_key, *spec.covariate_keys):
        if key not in pred.obs.columns:
            raise ValueError(f"pred: obs key {key!r} is missing (columns: {list(pred.obs.columns)[:20]}); "
                             "the prediction must label each cell under the registered keys")
    pred_genes = pd.Index(map(str, pred.var_names))
    if not pred_genes.is_unique:
        dup = pred_genes[pred_genes.duplicated()].unique()[:5].tolist()
        raise ValueError(f"pred: var_names are not unique (e.g. {dup}); run pred.var_names_make_unique()")
    extra = pred_genes.difference(pd.Index(map(str, real.var_names)))
    if len(extra):
        raise ValueError(f"pred has {len(extra)} genes that are not in real (e.g. {list(extra[:5])}); "
                         "predict on genes that were measured")
    return pred


def fit_baseline(train: AnnData, spec: PerturbationSpec, name: str = "mean_shift", genes: list[str] | None = None):
    """The baseline ``name`` fitted on ``train`` as :func:`evaluate` fits it, and the grouped
    training cells it was fitted on (their ``rows`` are what evaluate's PCA space is fitted on).

    Returns
    -------
    tuple
        ``(fitted baseline, GroupedCells)``.
    """
    spec.validate(train)
    cells = _grouped(train, spec, genes, None, "auto")
    return make_baseline(name).fit(cells, spec), cells


def _grouped(adata: AnnData, spec: PerturbationSpec, genes: list[str] | None, layer: str | None, space: str):
    from celldit.data.rows import ExpressionRows
    from celldit.eval.cells import GroupedCells, _keys

    rows = ExpressionRows(adata, genes, layer=layer, input_space=space, warn_log1p=False)
    return GroupedCells(rows, _keys(adata, spec), rows.genes)
