"""`benchmarks/cells.py` pieces that need no real training: the same-footing reference of
``generate`` (the mean-shift baseline started from generated control cells), the support and
pooled blocks, the borrowing-scale rules, and the ``--ema-decay`` flag (a 3-step fit)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from celldit.data.spec import PerturbationSpec
from celldit.eval.report import evaluate
from tests.conftest import load_benchmark, make_adata


@pytest.fixture(scope="module")
def cells():
    return load_benchmark("cells")


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


def test_generated_controls_equal_to_the_real_ones_give_the_mean_shift_baseline(cells):
    train, test = _screen(0), _screen(1)
    spec = PerturbationSpec("perturbation", control="control")
    controls = test[test.obs["perturbation"] == "control"].copy()
    model = _Generator(controls)
    args = types.SimpleNamespace(seed=0, sample_steps=None, support="balance")
    got = cells._generated_mean_shift(model, test, controls, train, spec, ["A", "B"], args)
    assert model.calls == [("control", controls.n_obs)]
    want = evaluate(test, None, spec, train=train, baselines=["mean_shift"], min_cells=40, seed=0, figures=False,
                    cell_eval=False).summary["mean_shift"]
    for key in ("pearson_delta_de20", "mse_de20", "edistance"):
        assert got[key] == pytest.approx(float(want[key]), abs=1e-4), key
    assert got["pearson_delta_de20"] > 0.9  # the planted effects are recovered


def test_generated_controls_off_the_real_ones_score_worse(cells):
    train, test = _screen(0), _screen(1)
    spec = PerturbationSpec("perturbation", control="control")
    controls = test[test.obs["perturbation"] == "control"].copy()
    args = types.SimpleNamespace(seed=0, sample_steps=None, support="balance")
    exact = cells._generated_mean_shift(_Generator(controls), test, controls, train, spec, ["A", "B"], args)
    spread = controls.copy()
    spread.X = np.asarray(spread.X) + np.random.default_rng(2).normal(0, 1.0, spread.shape).astype(np.float32)
    worse = cells._generated_mean_shift(_Generator(spread), test, controls, train, spec, ["A", "B"], args)
    assert worse["edistance"] > exact["edistance"] + 0.1


def test_support_rules_scored_side_by_side_with_each_genes_detection_rate(cells):
    """Real cells of each condition as the "prediction" keep every gene's detection rate under
    every rule; controls plus the mean shift detect a raised gene in every cell, which the
    "discrete" rule brings back near the real rate."""
    import anndata as ad

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
    got = cells._by_support(test, real, spec, test, seed=0, levels=first_count_level(None, library[is_a]))
    assert got["discrete"]["detection_error"] == 0 and got["balance"]["detection_error"] == 0
    assert got["no_change_detection_error"] > 0.03  # gene 1 alone: about |0.1 - 0.4| / 8 genes
    shift = x[is_a].mean(0) - x[~is_a].mean(0)
    moved = ad.AnnData(x[~is_a] + shift, obs=real.obs.copy(), var=test.var.copy())
    moved.layers["flow"] = moved.X.copy()
    got = cells._by_support(test, moved, spec, test, seed=0, levels=first_count_level(None, library[~is_a]))
    assert got["balance"]["detection_error"] > 0.05  # gene 1 detected in (nearly) every cell
    assert got["discrete"]["detection_error"] < got["balance"]["detection_error"] / 3
    assert "discrete" not in cells._by_support(test, moved, spec, test, seed=0)  # no source cells: skipped


def test_borrowing_scale_rules_for_a_held_out_knockout_follow_the_others_effects():
    """Held out: A. The others (B, C) share one clear effect on gene 0; the unscaled fall-back
    and train_mean both carry it, the scale fitted on two alike anchors is about 1, and no
    change is zero."""
    module = load_benchmark("borrowing_scale")
    counts = {"control": 400, "A": 200, "B": 200, "C": 200}
    effects = {"A": {3: 1.0}, "B": {0: 1.5}, "C": {0: 1.5}}
    train = make_adata(counts, n_genes=10, effects=effects, level=20.0, obs={"bio_rep": ["rep_1", "rep_2"]}, seed=4)
    control_mean = np.zeros(10)
    shifts, scale = module.held_out_shifts(train, control_mean, "A")
    assert 0.9 < scale <= 1.0
    assert np.all(shifts["no_change"] == 0)
    for rule in ("scale_1", "train_mean"):
        assert shifts[rule][0] > 1.0, rule  # log1p of a 4.5x rate: about 1.5 minus the library-size share
        # A's own effect (gene 3) is not known: gene 3 moves as the untouched genes do (their
        # share of the library shrinks as gene 0 grows)
        assert abs(shifts[rule][3] - np.median(shifts[rule][4:])) < 0.1, rule
    np.testing.assert_allclose(shifts["loo_scale"], scale * shifts["scale_1"])
    np.testing.assert_allclose(shifts["scale_1"], shifts["train_mean"], atol=0.15)
    np.testing.assert_array_equal(shifts["on_target"], shifts["scale_1"])  # A, B, C are not gene names


def test_borrowing_scale_on_target_rule_lowers_a_held_out_knockouts_own_gene():
    """Knockouts named after genes g0, g4, g5, g6 each lower their own gene (rate x e^-0.7);
    g0 held out: the on-target rule sets gene 0 at the others' median relative drop times the
    carried cells' level, and leaves every other gene at the unscaled fall-back."""
    module = load_benchmark("borrowing_scale")
    names = ("g0", "g4", "g5", "g6")
    counts = {"control": 400, **dict.fromkeys(names, 150)}
    effects = {n: {int(n[1:]): -0.7} for n in names}
    train = make_adata(counts, n_genes=10, effects=effects, level=20.0, obs={"bio_rep": ["rep_1", "rep_2"]}, seed=5)
    control_mean = np.full(10, 2.0)
    shifts, _ = module.held_out_shifts(train, control_mean, "g0")
    # each gene holds ~1/10 of 1e4 counts: log1p level ~6.9, so a drop of 0.7 is ~10% of it
    assert -0.15 < shifts["on_target"][0] / 2.0 < -0.06
    assert abs(shifts["scale_1"][0]) < 0.1  # the others do not move g0
    np.testing.assert_array_equal(shifts["on_target"][1:], shifts["scale_1"][1:])
    plain, _ = module.held_out_shifts(train, control_mean, "g0", on_target=False)
    np.testing.assert_array_equal(plain["on_target"], plain["scale_1"])


class _Counterfactual:
    """Stands in for a model: ``counterfactual`` hands back the given cells; no pair keys."""

    config = types.SimpleNamespace(pair_keys=[])

    def __init__(self, cells):
        self.cells = cells

    def counterfactual(self, controls, labels, **kwargs):
        return self.cells.copy()


def test_pooled_block_moves_the_mean_shift_toward_the_training_controls_mean(cells):
    """Train and test drawn from one population (one training batch): the pooled control mean
    takes the training controls' share by the sample sizes (120 and 120: about half), and the
    mean shift moved by it predicts the test P cells' means better (mse_de20) than the plain one."""
    train, test = _screen(0), _screen(1)
    spec = PerturbationSpec("perturbation", control="control")
    stand_in = _Counterfactual(test[test.obs["perturbation"] != "control"].copy())
    plain = evaluate(test, None, spec, train=train, baselines=["mean_shift", "no_change"], seed=0, figures=False,
                     cell_eval=False)
    per_condition = plain.table.pivot_table(index="perturbation", columns="method", values="edistance")
    args = types.SimpleNamespace(sample_steps=None, cfg_scale=1.0, seed=0, support="discrete")
    out = cells._pooled(stand_in, test, test[test.obs["perturbation"] == "control"].copy(), train, spec, ["A", "B"],
                        per_condition, args)
    assert 0.35 < out["weights"]["rep_3 itself"] < 0.65 and np.isclose(sum(out["weights"].values()), 1.0)
    assert out["mean_shift"]["mse_de20"] < plain.summary["mean_shift"]["mse_de20"]
    # the model row scores the stand-in's cells: the real P cells themselves
    assert out["model"]["pearson_delta_de20"] > 0.99


@pytest.mark.parametrize("flag, decay", [(None, 0.999), ("none", None), ("0.5", 0.5)])
def test_ema_decay_flag_reaches_the_fit(cells, flag, decay):
    """``--ema-decay``: absent keeps CellDiT.fit's default, 'none' samples the last weights."""
    args = types.SimpleNamespace(anchor_shrinkage="hybrid", tokenizer="module", source="control", no_anchor=False,
                                 no_batch_anchors=False, no_gate_velocity=False, no_on_target=False, hidden_size=16,
                                 depth=1, num_heads=2, cfg_dropout=0.2, covariate_dropout=0.0, group_bandwidth="median",
                                 seed=0, max_steps=3, batch_size=32, lr=1e-3, ema_decay=flag)
    model, timing = cells._train(_screen(0), args, perturbation_key="perturbation", control="control",
                                 perturbation_features=None)
    assert model.plan.ema_decay == decay and (model.plan.ema is None) == (decay is None)
    assert timing["train_s"] > 0
