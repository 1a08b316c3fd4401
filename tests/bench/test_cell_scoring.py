"""`celldit.bench.cell_scoring`, how `benchmarks/cells.py` scores a model beyond `evaluate`:
the same-footing reference of ``generate`` (the mean-shift baseline started from generated
control cells), the support rules side by side, the pooled block and the rule for weak
perturbations."""

from __future__ import annotations

import types

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celldit.bench import cell_scoring as scoring
from celldit.data.spec import PerturbationSpec
from celldit.eval.report import evaluate
from tests.conftest import make_adata


class _Generator:
    """Stands in for a model: ``generate`` hands back the given cells, whatever it is asked."""

    def __init__(self, cells):
        self.cells, self.calls = cells, []

    def generate(self, condition, n, **kwargs):
        self.calls.append((condition, n))
        return self.cells.copy()


def _screen(seed: int):
    counts = {"control": 120, "A": 80, "B": 80}
    effects = {"A": {0: 1.5, 1: -1.0}, "B": {2: 2.0}}
    return make_adata(counts, n_genes=10, space="log", effects=effects, sparse=False, seed=seed)


def _screen(seed: int):
    counts = {"control": 120, "A": 80, "B": 80}
    effects = {"A": {0: 1.5, 1: -1.0}, "B": {2: 2.0}}
    return make_adata(counts, n_genes=10, space="log", effects=effects, sparse=False, seed=seed)


def test_generated_controls_equal_to_the_real_ones_give_the_mean_shift_and_no_change_baselines():
    train, test = _screen(0), _screen(1)
    spec = PerturbationSpec("perturbation", control="control")
    controls = test[test.obs["perturbation"] == "control"].copy()
    model = _Generator(controls)
    refs = scoring.generated_references(model, test, controls, train, spec, ["A", "B"], seed=0)
    got = refs["mean_shift"]
    assert model.calls == [("control", controls.n_obs)]
    want = evaluate(test, None, spec, train=train, baselines=["mean_shift", "no_change"], min_cells=40, seed=0,
                    figures=False, cell_eval=False)
    for key in ("pearson_delta_de20", "mse_de20", "edistance"):
        assert got[key] == pytest.approx(float(want.summary["mean_shift"][key]), abs=1e-4), key
    assert refs["no_change"]["edistance"] == pytest.approx(float(want.summary["no_change"]["edistance"]), abs=1e-4)
    assert got["pearson_delta_de20"] > 0.9  # the planted effects are recovered
    # per condition, the reference of the weak rule: the baselines' own E-distances
    table = want.table.pivot_table(index="perturbation", columns="method", values="edistance")
    np.testing.assert_allclose(refs["per_condition"].sort_index().to_numpy(),
                               table[["mean_shift", "no_change"]].sort_index().to_numpy(), atol=1e-6)


def test_generated_controls_off_the_real_ones_score_worse():
    train, test = _screen(0), _screen(1)
    spec = PerturbationSpec("perturbation", control="control")
    controls = test[test.obs["perturbation"] == "control"].copy()
    exact = scoring.generated_references(_Generator(controls), test, controls, train, spec, ["A", "B"], seed=0)
    spread = controls.copy()
    spread.X = np.asarray(spread.X) + np.random.default_rng(2).normal(0, 1.0, spread.shape).astype(np.float32)
    worse = scoring.generated_references(_Generator(spread), test, controls, train, spec, ["A", "B"], seed=0)
    assert worse["mean_shift"]["edistance"] > exact["mean_shift"]["edistance"] + 0.1


def test_support_rules_scored_side_by_side_with_each_genes_detection_rate():
    """Real cells of each condition as the "prediction" keep every gene's detection rate under
    every rule; controls plus the mean shift detect a raised gene in every cell, which the
    "discrete" rule brings back near the real rate."""
    from celldit.cells.outputs import first_count_level
    from celldit.data.expression import log_normalize

    # a sparse gene 1 that A raises from about 0.1 to 0.5 counts per cell
    test = make_adata({"control": 400, "A": 400}, n_genes=8, effects={"A": {1: 1.6}},
                      level=[5, 0.1, 5, 5, 5, 5, 5, 5], seed=3)
    spec = PerturbationSpec("perturbation", control="control")
    logged = log_normalize(test)
    x = np.asarray(logged.X.toarray())
    library = np.asarray(test.X.sum(1)).ravel()
    is_a = (test.obs["perturbation"] == "A").to_numpy()
    real = ad.AnnData(x[is_a], obs=test.obs[is_a].copy(), var=test.var.copy())
    real.layers["flow"] = real.X.copy()
    got = scoring.score_by_support(test, real, spec, test, seed=0, levels=first_count_level(None, library[is_a]))
    assert got["discrete"]["detection_error"] == 0 and got["balance"]["detection_error"] == 0
    assert got["no_change_detection_error"] > 0.03  # gene 1 alone: about |0.1 - 0.4| / 8 genes
    shift = x[is_a].mean(0) - x[~is_a].mean(0)
    moved = ad.AnnData(x[~is_a] + shift, obs=real.obs.copy(), var=test.var.copy())
    moved.layers["flow"] = moved.X.copy()
    got = scoring.score_by_support(test, moved, spec, test, seed=0, levels=first_count_level(None, library[~is_a]))
    assert got["balance"]["detection_error"] > 0.05  # gene 1 detected in (nearly) every cell
    assert got["discrete"]["detection_error"] < got["balance"]["detection_error"] / 3
    assert "discrete" not in scoring.score_by_support(test, moved, spec, test, seed=0)  # no source cells: skipped


class _Counterfactual:
    """Stands in for a model: ``counterfactual`` hands back the given cells; no pair keys."""

    config = types.SimpleNamespace(pair_keys=[])

    def __init__(self, cells):
        self.cells = cells

    def counterfactual(self, controls, labels, **kwargs):
        return self.cells.copy()


def test_pooled_block_moves_the_mean_shift_toward_the_training_controls_mean():
    """Train and test drawn from one population (one training batch): the pooled control mean
    takes the training controls' share by the sample sizes (120 and 120: about half), and the
    mean shift moved by it predicts the test P cells' means better (mse_de20) than the plain one."""
    train, test = _screen(0), _screen(1)
    spec = PerturbationSpec("perturbation", control="control")
    stand_in = _Counterfactual(test[test.obs["perturbation"] != "control"].copy())
    plain = evaluate(test, None, spec, train=train, baselines=["mean_shift", "no_change"], seed=0, figures=False,
                     cell_eval=False)
    per_condition = plain.table.pivot_table(index="perturbation", columns="method", values="edistance")
    out = scoring.pooled_reference(stand_in, test, test[test.obs["perturbation"] == "control"].copy(), train, spec,
                                   ["A", "B"], per_condition, seed=0)
    assert 0.35 < out["weights"]["held-out batch itself"] < 0.65 and np.isclose(sum(out["weights"].values()), 1.0)
    assert out["mean_shift"]["mse_de20"] < plain.summary["mean_shift"]["mse_de20"]
    # the model row scores the stand-in's cells: the real P cells themselves
    assert out["model"]["pearson_delta_de20"] > 0.99




def _per_condition(mean_shift: list[float], no_change: list[float]) -> pd.DataFrame:
    index = pd.Index([f"P{i}" for i in range(len(mean_shift))], name="perturbation")
    return pd.DataFrame({"mean_shift": mean_shift, "no_change": no_change}, index=index)


def test_weak_rule_counts_only_perturbations_where_mean_shift_loses_to_no_change():
    """P0 and P2 are weak (mean shift above no change); P1 is not, so the model's large excess
    there does not count. P2 is above no change by 0.02 > 0.01: the rule fails there."""
    per_condition = _per_condition([0.30, 0.50, 0.25], [0.20, 0.90, 0.21])
    model = pd.Series({"P0": 0.205, "P1": 1.5, "P2": 0.23})
    got = scoring.weak_knockouts(model, per_condition)
    assert got["mean_shift_worse_than_no_change"] == ["P0", "P2"]
    assert got["model_above_no_change_by_0.01"] == ["P2"]
    assert got["max_model_minus_no_change"] == pytest.approx(0.02)
    assert scoring.weak_knockouts(model, per_condition, tolerance=0.05)["model_above_no_change_by_0.01"] == []


def test_weak_rule_with_no_weak_perturbation_and_with_a_missing_one():
    none_weak = scoring.weak_knockouts(pd.Series({"P0": 1.0}), _per_condition([0.1], [0.5]))
    assert none_weak["mean_shift_worse_than_no_change"] == [] and none_weak["max_model_minus_no_change"] is None
    with pytest.raises(ValueError, match="P1"):
        scoring.weak_knockouts(pd.Series({"P0": 0.2}), _per_condition([0.3, 0.3], [0.2, 0.2]))


def test_per_condition_edistance_reads_the_model_rows():
    """The model's per-condition E-distance, not a baseline's: real P cells as the prediction
    score below the mean-shift baseline's on every condition."""
    train, test = _screen(0), _screen(1)
    spec = PerturbationSpec("perturbation", control="control")
    real = test[test.obs["perturbation"] != "control"].copy()
    res = evaluate(test, real, spec, train=train, baselines=["mean_shift"], seed=0, figures=False, cell_eval=False)
    got = scoring.per_condition_edistance(res)
    table = res.table.pivot_table(index="perturbation", columns="method", values="edistance")
    assert sorted(got.index) == ["A", "B"]
    np.testing.assert_allclose(got.sort_index().to_numpy(), table["model"].sort_index().to_numpy())
    assert (got.sort_index() <= table["mean_shift"].sort_index()).all()
