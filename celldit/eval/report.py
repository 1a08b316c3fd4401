"""Evaluate a prediction beside the baselines and write the report files.

:func:`evaluate` writes into ``out_dir``:

* ``metrics.csv`` - one row per condition and method (columns in ``docs/evaluation.md``);
* ``summary.json`` - ``{method: {metric: mean over conditions, metric_median: median}}``
  plus ``"n_conditions"``;
* ``report.md`` - the summary and per-condition tables in markdown;
* ``settings.json`` - spec, PCA space, seeds, baseline notes, split;
* ``figures/metrics_by_condition.png`` and ``figures/pca_real_vs_pred.png``;
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
import scipy.sparse as sp
from anndata import AnnData

from celldit.data.expression import check_expression, log_normalize
from celldit.data.spec import PerturbationSpec
from celldit.eval.baselines import BASELINES, make_baseline, prediction_requests
from celldit.eval.pca import PCASpace
from celldit.eval.scoring import (
    CORE_METRICS,
    EXTRA_METRICS,
    RANK_TEST_METRICS,
    condition_name,
    group_rows,
    score_predictions,
)

__all__ = ["EvaluationResult", "evaluate", "summarize", "prepare_prediction"]


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


def prepare_prediction(pred: AnnData) -> AnnData:
    """Bring a prediction to log1p-normalised space.

    Raw integer counts (or a ``counts`` layer) are normalised with
    :func:`~celldit.data.expression.log_normalize`; anything else is taken as already
    log-normalised (negative values allowed). NaN or infinite values raise ValueError.
    """
    is_counts = check_expression(pred.X, "pred X", allow_negative=True)
    values = pred.X.data if sp.issparse(pred.X) else np.asarray(pred.X)
    if "counts" in pred.layers or (is_counts and (values.size == 0 or values.min() >= 0)):
        return log_normalize(pred)
    return pred


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


def drop_small_conditions(real: AnnData, pred: AnnData | None, spec: PerturbationSpec,
                          min_cells: int) -> tuple[AnnData, AnnData | None, list[str]]:
    """Remove perturbed conditions with fewer than ``min_cells`` real cells from ``real``
    (and their cells from ``pred``); returns ``(real, pred, dropped condition names)``."""
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}")
    small = {key for key, rows in group_rows(real, spec).items()
             if key[0] not in spec.control_labels and len(rows) < min_cells}
    if not small:
        return real, pred, []

    def keep(adata: AnnData) -> np.ndarray:
        labels = spec.labels(adata)
        covs = spec.covariates(adata)
        keys = zip(labels, *(covs[k].astype(str) for k in spec.covariate_keys))
        return np.array([tuple(map(str, k)) not in small for k in keys])

    real = real[keep(real)].copy()
    pred = pred[keep(pred)].copy() if pred is not None else None
    return real, pred, sorted(condition_name(k[0], k[1:]) for k in small)


def evaluate(real: AnnData, pred: AnnData | None, spec: PerturbationSpec, *,
             train: AnnData | None = None, baselines: Sequence[str] = (),
             out_dir: str | Path | None = None, n_pcs: int = 30, max_cells: int = 300,
             seed: int = 0, rank_test: bool = False, figures: bool = True,
             cell_eval: bool = True, split: dict[str, Any] | None = None,
             normalize: bool = True, min_cells: int = 1, run_cell_eval: bool = False,
             loss_curve: tuple[list[int], list[float]] | None = None) -> EvaluationResult:
    """Score ``pred`` (method ``model``) and the named baselines on the conditions of ``pred``.

    Parameters
    ----------
    real
        Real cells: the true cells of each predicted condition and the control cells of
        each covariate group (counts or log-normalised; see ``normalize``).
    pred
        Predicted cells labelled under ``spec``'s keys; None to score baselines only
        (on every perturbed condition of ``real``).
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
        (see :func:`~celldit.eval.scoring.score_predictions`).
    figures, cell_eval
        Write the PNG figures (metrics, PCA, predicted-vs-true deltas, UMAP) / the cell-eval
        files (with ``out_dir``).
    run_cell_eval
        Also run the cell-eval package on those files (when installed) and put its mean
        scores under ``summary['cell_eval']``.
    loss_curve
        ``(steps, losses)`` of the model's training, drawn as ``figures/loss.png``.
    split
        A split's ``to_dict()`` to record in ``settings.json``.
    normalize
        Bring ``real``/``train`` to log1p-normalised space with
        :func:`~celldit.data.expression.log_normalize` and ``pred`` with
        :func:`prepare_prediction`.
    min_cells
        Score only conditions with at least this many real cells (the DESIGN protocols use
        40); smaller conditions are dropped from ``real`` and ``pred`` and listed in
        ``settings.json`` under ``dropped_conditions``.
    """
    if normalize:
        real = log_normalize(real)
        train = log_normalize(train) if train is not None else None
        pred = prepare_prediction(pred) if pred is not None else None
    spec.validate(real)
    real, pred, dropped = drop_small_conditions(real, pred, spec, min_cells)
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
    if train is not None:
        spec.validate(train)
        if not pd.Index(train.var_names).equals(pd.Index(real.var_names)):
            raise ValueError("train and real have different genes (var_names)")
    space = PCASpace(n_pcs, seed=seed).fit((train if train is not None else real).X)

    tables, predictions = [], {}
    requests = prediction_requests(real, spec)
    if pred is not None:
        tables.append(score_predictions(real, pred, spec, space, method="model",
                                        max_cells=max_cells, seed=seed, rank_test=rank_test))
        predictions["model"] = pred
        keep = set(tables[0]["condition"])
        names = [condition_name(r[spec.perturbation_key], [r[k] for k in spec.covariate_keys])
                 for _, r in requests.iterrows()]
        requests = requests[[n in keep for n in names]].reset_index(drop=True)
    has_combo = any(spec.is_combination(l) for l in requests[spec.perturbation_key])
    notes: dict[str, list[str]] = {}
    for name in baselines:
        if name == "additive" and not has_combo:
            notes[name] = ["skipped: no combination among the predicted conditions"]
            continue
        model = make_baseline(name).fit(train, spec)
        predictions[name] = model.predict(real, requests, seed=seed)
        notes[name] = list(model.notes)
        tables.append(score_predictions(real, predictions[name], spec, space, method=name,
                                        max_cells=max_cells, seed=seed, rank_test=rank_test))
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
                "dropped_conditions": dropped}
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
        files["fig_pca"] = plot_pca_real_vs_pred(real, predictions, spec, space, fig_dir / "pca_real_vs_pred.png",
                                                 seed=seed)
        shown = next((m for m in ("model", "mean_shift") if m in predictions), next(iter(predictions)))
        files["fig_delta"] = plot_delta_scatter(real, predictions[shown], spec, fig_dir / "delta_scatter.png",
                                                method=shown)
        files["fig_umap"] = plot_umap_real_vs_pred(real, predictions[shown], spec, space, fig_dir / "umap.png",
                                                   seed=seed)
        if loss_curve is not None:
            from celldit.train.callbacks import write_loss_curve

            files["fig_loss"] = write_loss_curve(fig_dir, *loss_curve)["loss_png"]
    if cell_eval or run_cell_eval:
        from celldit.eval.cell_eval import export_cell_eval
        from celldit.eval.cell_eval import run_cell_eval as run_it

        exported = export_cell_eval(real, predictions, spec, out / "cell_eval")
        files.update({f"cell_eval_{key}": path for key, path in exported.items()})
        if run_cell_eval:
            summary["cell_eval"] = run_it(exported, out / "cell_eval")
            files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return result
