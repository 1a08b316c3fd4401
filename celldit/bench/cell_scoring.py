"""How ``benchmarks/cells.py`` scores a cell model beyond :func:`celldit.eval.report.evaluate`.

Each function takes predicted cells (or a model that makes them) and the real cells of the
held-out split, and returns plain numbers for the benchmark's JSON:

- :func:`method_summary`: the metrics of chosen methods, rounded;
- :func:`weak_knockouts`: the per-condition rule for perturbations where the mean shift is worse
  than no change (a prediction must stay near its controls there);
- :func:`score_by_support`: the same flow output put on log1p's support by every rule, scored;
- :func:`pooled_reference`: counterfactuals with ``control_mean="pooled"`` beside the mean
  shift moved by the same kind of pooled control mean (:func:`pooled_mean_shift`);
- :func:`generated_references`: ``generate``'s references on the same footing (generated
  control cells, as they are and moved by the mean shift);
- :func:`generated_in_batch`: ``generate``'s cells of each label in a held-out batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..cells.control_mean import DEFAULT_POOLING, batch_labels, pooled_control_mean
from ..cells.outputs import SUPPORTS, first_count_level, to_support
from ..data.expression import log_normalize
from ..data.spec import PerturbationSpec
from ..eval.report import evaluate, fit_baseline

METRICS = ("pearson_delta_de20", "pearson_delta_all", "mse_de20", "r2_mean", "edistance")


def generated_in_batch(model, labels: Sequence[str], controls: ad.AnnData, **kwargs) -> ad.AnnData:
    """``model.generate`` of each label in the batch of ``controls``, as many cells per label as
    there are controls (the scorer draws a prediction's cells with replacement, and repeats from
    a smaller pool lower its within-sample distance, which inflates E-distance), in one AnnData.
    ``kwargs`` go to ``generate`` (seed, solver, support ...)."""
    parts = [model.generate(label, n=controls.n_obs, controls=controls, **kwargs) for label in labels]
    cells = ad.concat(parts, merge="same")
    cells.obs_names_make_unique()
    return cells


def rounded_summary(summary: Mapping, methods: Sequence[str]) -> dict:
    """``{method: {metric: value}}`` of a summary (``evaluate(...).summary`` or
    :func:`~celldit.eval.report.summarize`'s), rounded to 4 places."""
    def num(v):
        return None if v is None else round(float(v), 4)

    return {m: {k: num(summary[m][k]) for k in METRICS if k in summary[m]} for m in methods}


def method_summary(res, methods: Sequence[str]) -> dict:
    """:func:`rounded_summary` of an :func:`evaluate` result."""
    return rounded_summary(res.summary, methods)


def _score(real: ad.AnnData, pred: ad.AnnData, spec: PerturbationSpec, train: ad.AnnData, seed: int,
           min_cells: int = 40):
    """``evaluate`` of one prediction without baselines, figures or cell-eval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # values below 0 are scored as they are
        return evaluate(real, pred, spec, train=train, min_cells=min_cells, baselines=[], seed=seed, figures=False,
                        cell_eval=False)


def weak_knockouts(model_edistance: pd.Series, per_condition: pd.DataFrame, tolerance: float = 0.01) -> dict:
    """The rule for weak perturbations: where the mean shift is worse than no change, the
    prediction must not be worse than no change by more than ``tolerance``.

    Parameters
    ----------
    model_edistance
        E-distance of the prediction per condition (index: perturbation).
    per_condition
        E-distance per condition (index) and method (columns ``mean_shift``, ``no_change``),
        scored with the same seed.
    tolerance
        The excess over no change allowed.

    Returns
    -------
    dict
        ``mean_shift_worse_than_no_change`` (the weak perturbations),
        ``model_above_no_change_by_0.01`` (those where the rule fails) and
        ``max_model_minus_no_change`` (None when no perturbation is weak).
    """
    weak = per_condition.index[per_condition["mean_shift"] > per_condition["no_change"]]
    above = model_edistance.reindex(weak) - per_condition.loc[weak, "no_change"]
    if above.isna().any():
        raise ValueError(f"no model E-distance for weak perturbations {sorted(above.index[above.isna()])}")
    return {"mean_shift_worse_than_no_change": sorted(weak),
            "model_above_no_change_by_0.01": sorted(above.index[above > tolerance]),
            "max_model_minus_no_change": round(float(above.max()), 4) if len(above) else None}


def per_condition_edistance(res) -> pd.Series:
    """The model's E-distance per condition of an :func:`evaluate` result."""
    table = res.table[res.table["method"] == "model"]
    return table.set_index("perturbation")["edistance"]


def first_levels(model, controls: ad.AnnData, pred: ad.AnnData) -> np.ndarray:
    """(n,) first count level of each predicted cell's source control cell (``celldit_source``)."""
    rows = model.sampler.input_rows(controls)
    library = rows.library_sizes(np.arange(controls.n_obs))
    levels = first_count_level(None, library) if library is not None else rows.smallest_positive()
    return levels[controls.obs_names.get_indexer(pred.obs["celldit_source"].astype(str))]


def score_by_support(real: ad.AnnData, pred: ad.AnnData, spec: PerturbationSpec, train: ad.AnnData, seed: int,
                     levels: np.ndarray | None = None, min_cells: int = 40) -> dict:
    """The same predicted cells (their flow output, ``layers['flow']``) brought to log1p's support
    by each rule of :data:`~celldit.cells.outputs.SUPPORTS`, one condition at a time as the
    output writer does, and scored: a paired comparison of the rules.

    ``"discrete"`` needs ``levels`` (each cell's source's first count level; cells generated
    from noise have none, and skip it). Each rule also gets its *detection error*: the mean
    over genes and conditions of |fraction of predicted cells with X > 0 - the real cells'|.
    """
    flow, labels = np.asarray(pred.layers["flow"]), pred.obs[spec.perturbation_key].astype(str).to_numpy()
    real_labels = real.obs[spec.perturbation_key].astype(str).to_numpy()
    real_x = real[:, pred.var_names].X
    detected = {lab: np.asarray((real_x[real_labels == lab] > 0).mean(0)).ravel() for lab in np.unique(labels)}
    out = {}
    rng = np.random.default_rng([seed, 3])
    for how in SUPPORTS if levels is not None else [h for h in SUPPORTS if h != "discrete"]:
        x = np.empty_like(flow)
        for lab in np.unique(labels):
            rows = labels == lab
            x[rows] = to_support(flow[rows], how, first_level=None if levels is None else levels[rows], rng=rng)
        res = _score(real, ad.AnnData(x, obs=pred.obs, var=pred.var), spec, train, seed, min_cells)
        out[how] = method_summary(res, ["model"])["model"]
        out[how]["detection_error"] = round(float(np.mean([np.abs((x[labels == lab] > 0).mean(0) - detected[lab]).mean()
                                                           for lab in detected])), 4)
    control = np.asarray((real_x[np.isin(real_labels, spec.control_labels)] > 0).mean(0)).ravel()
    out["no_change_detection_error"] = round(float(np.mean([np.abs(control - d).mean() for d in detected.values()])), 4)
    return out


def _dense(a: ad.AnnData) -> np.ndarray:
    return np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)


def pooled_mean_shift(test: ad.AnnData, train: ad.AnnData, spec: PerturbationSpec, keep: list[str],
                      pair_keys: Sequence[str], pooling: float = DEFAULT_POOLING) -> tuple[ad.AnnData, dict]:
    """The mean-shift baseline moved by a pooled control mean: the held-out controls (the scorer's
    log1p cells) plus each condition's plain training shift plus ``pooling`` times their mean
    pooled with the training batches' (``pair_keys``) minus their own mean.

    Returns
    -------
    ``(cells, weights)``: the cells, ``keep`` in turn, and the pooled mean's shares (the
    held-out batch itself first, then each training batch by name).
    """
    key, control = spec.perturbation_key, spec.control_labels[0]
    x_train, x_test = log_normalize(train), log_normalize(test)
    ctrl_train = x_train[x_train.obs[key] == control]
    batches = batch_labels(ctrl_train.obs, pair_keys)
    xc, names = _dense(ctrl_train), np.unique(batches)
    refs, sizes = np.stack([xc[batches == b].mean(0) for b in names]), np.array([(batches == b).sum() for b in names])
    held = _dense(x_test[x_test.obs[key] == control])
    pooled_mean, weights = pooled_control_mean(held, refs, sizes)
    plain = {p: _dense(x_train[x_train.obs[key] == p]).mean(0) - xc.mean(0) for p in keep}
    cells = np.vstack([held + plain[p] + pooling * (pooled_mean - held.mean(0)) for p in keep]).astype(np.float32)
    obs = pd.DataFrame({key: np.repeat(keep, len(held))}, index=[str(i) for i in range(len(cells))])
    shares = dict(zip(["held-out batch itself", *names], np.round(weights, 3).tolist()))
    return ad.AnnData(cells, obs=obs, var=test.var.copy()), shares


def pooled_reference(model, test: ad.AnnData, controls: ad.AnnData, train: ad.AnnData, spec: PerturbationSpec,
                     keep: list[str], per_condition: pd.DataFrame, *, seed: int, steps: int | None = None,
                     cfg_scale: float = 1.0, support: str = "discrete", pooling: float = DEFAULT_POOLING) -> dict:
    """The model's counterfactuals with ``control_mean="pooled"`` and ``pooling`` (the same model
    and seed), and the mean-shift baseline moved by the same kind of pooled control mean, the
    same fraction of the way (:func:`pooled_mean_shift`), scored alike, with the
    weak-perturbation rule (:func:`weak_knockouts`) for the model's."""
    pred = model.counterfactual(controls, keep, steps=steps, cfg_scale=cfg_scale, seed=seed, support=support,
                                control_mean="pooled", pooling=pooling)
    moved, weights = pooled_mean_shift(test, train, spec, keep, model.config.pair_keys, pooling)
    out = {"pooling": pooling, "weights": weights}
    for name, p in (("model", pred), ("mean_shift", moved)):
        res = _score(test, p, spec, train, seed)
        out[name] = method_summary(res, ["model"])["model"]
        if name == "model":
            rule = weak_knockouts(per_condition_edistance(res), per_condition)
            out["model_above_no_change_by_0.01"] = rule["model_above_no_change_by_0.01"]
            out["max_model_minus_no_change"] = rule["max_model_minus_no_change"]
    return out


def generated_references(model, test: ad.AnnData, controls: ad.AnnData, train: ad.AnnData, spec: PerturbationSpec,
                         keep: list[str], *, seed: int, steps: int | None = None, support: str = "balance") -> dict:
    """``generate``'s references on the same footing: generated control cells (as many as
    ``controls``, on their mean) standing in for the real ones, as they are (no change) and
    moved by the plain mean shift.

    ``generate`` knows the held-out batch only by its controls' mean; the plain baselines carry
    its real cells, so they differ from ``generate`` by what real cells are worth as well.

    Returns
    -------
    dict
        ``mean_shift`` and ``no_change``: their metrics; ``per_condition``: a DataFrame of their
        E-distance per condition (columns ``mean_shift``, ``no_change``), the reference of the
        weak-perturbation rule (:func:`weak_knockouts`) for generated cells.
    """
    made = model.generate(spec.control_labels[0], n=controls.n_obs, controls=controls, seed=seed, steps=steps,
                          support=support)
    fitted, _ = fit_baseline(train, spec, "mean_shift")
    if not made.var_names.equals(fitted.var_names):
        raise ValueError("the model's genes differ from the scored genes")
    x = np.asarray(made.X, dtype=np.float32)
    shifts = {"mean_shift": {lab: fitted.shift(lab, (), x.mean(0)).astype(np.float32) for lab in keep},
              "no_change": dict.fromkeys(keep, np.float32(0.0))}
    out, per_condition = {}, {}
    for name, shift in shifts.items():
        ref = ad.concat([ad.AnnData(x + shift[lab], var=made.var, obs={spec.perturbation_key: [lab] * len(x)})
                         for lab in keep])
        ref.obs_names_make_unique()
        res = _score(test, ref, spec, train, seed)
        out[name] = method_summary(res, ["model"])["model"]
        per_condition[name] = per_condition_edistance(res)
    out["per_condition"] = pd.DataFrame(per_condition)
    return out
