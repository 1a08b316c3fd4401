"""The on-target prior (celldit.cells.on_target): a knockout lowers its own target."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import ArrayRows, make_adata

from celldit.cells import CellDiT
from celldit.cells.anchors import build_condition_table
from celldit.cells.on_target import MIN_LEVEL, OnTargetRule

GENES = [f"g{i}" for i in range(6)]


def test_the_fraction_is_the_median_of_the_trained_targets_relative_changes():
    control = np.array([2.0, 4.0, 1.0, MIN_LEVEL / 2, 3.0, 3.0])
    anchors = np.zeros((6, 6))
    anchors[1, 0], anchors[2, 1], anchors[3, 2], anchors[4, 3] = -0.4, -2.4, -0.2, -0.01  # ratios -0.2, -0.6, -0.2
    names = {1: "g0", 2: "g1", 3: "g2", 4: "g3", 5: "DRUG"}  # g3 barely expressed, DRUG not a gene: skipped
    rule = OnTargetRule.fit(names, anchors, GENES, control)
    assert rule.fraction == pytest.approx(-0.2)
    assert dict(rule.ratios) == pytest.approx({"g0": -0.2, "g1": -0.6, "g2": -0.2})
    assert OnTargetRule.fit({1: "g0", 2: "g1", 5: "DRUG"}, anchors, GENES, control) is None  # two are too few


def test_an_untrained_target_is_set_at_its_level_in_each_batch():
    rule = OnTargetRule(-0.5, {})
    x = np.zeros((4, 6))
    x[:, 2] = [0.5, -0.5, 1.0, 3.0]  # centred on each batch's controls
    means = {"a": np.full(6, 2.0), "b": np.full(6, 4.0)}
    anchors = np.ones((4, 6))
    rule.set_targets(anchors, ["g2", "NOT_A_GENE"], GENES, x, (np.array(["a", "a", "b", "b"]), means))
    np.testing.assert_allclose(anchors[:, 2], [-1.0, -1.0, -0.5 * 6.0, -0.5 * 6.0])  # levels 2.0 and 4.0 + 2.0
    np.testing.assert_array_equal(np.delete(anchors, 2, axis=1), 1.0)  # every other gene keeps its anchor
    plain = np.zeros((4, 6))
    rule.set_targets(plain, ["g2"], GENES, x + 1.0)  # one uncentred batch: its mean
    np.testing.assert_allclose(plain[:, 2], -0.5 * 2.0)


def test_shrinkage_spares_a_knockouts_own_target():
    """g0 KO lowers g0 by 0.3 and nothing else; the 49 other genes carry only noise, so the
    condition's evidence is weak and hybrid shrinkage closes its gate. With the target's
    column named, g0 keeps its measured shift; every other gene is shrunk as before."""
    rng = np.random.default_rng(0)
    n, g = 200, 50
    x = rng.normal(3.0, 1.0, (2 * n, g))
    x[n:, 0] -= 0.3
    keys = [((), ())] * n + [(("g0",), (1.0,))] * n
    groups = np.zeros(2 * n, dtype=np.int64)
    plain, _ = build_condition_table(keys, groups, ArrayRows(x), g, shrinkage="hybrid", floor=0.1)
    kept, _ = build_condition_table(keys, groups, ArrayRows(x), g, shrinkage="hybrid", floor=0.1,
                                    target_columns={f"g{j}": j for j in range(g)})
    raw = x[n:].mean(0) - x[:n].mean(0)
    assert plain.gates[1] < 0.5 and abs(plain.anchors[1, 0]) < 0.5 * abs(raw[0])  # shrunk without the prior
    assert kept.anchors[1, 0] == pytest.approx(raw[0], abs=1e-5)
    np.testing.assert_allclose(kept.anchors[1, 1:], plain.anchors[1, 1:], atol=1e-6)
    assert kept.gates[1] == plain.gates[1]


def _screen(seed: int = 0):
    """Log-space screen: knockouts of g0..g4 each lower their own gene by 40% of its level
    (g5 also shifts every knockout's g6 by +0.5, a shared off-target response); g4 is held out."""
    level = np.linspace(2.0, 4.0, 10)
    effects = {f"g{i}": {i: -0.4 * level[i], 6: 0.5} for i in range(5)}
    adata = make_adata({"control": 300, **{f"g{i}": 150 for i in range(5)}}, 10, space="log", level=level,
                       spread=0.3, sparse=False, effects=effects, seed=seed)
    train = adata[adata.obs["perturbation"] != "g4"].copy()
    return adata, train, level


def _build(train, **kw) -> CellDiT:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # log-space X used as given
        return CellDiT(train, hidden_size=32, depth=1, num_heads=4, **kw)


def test_an_unseen_knockout_lowers_its_target_and_the_ablation_does_not(tmp_path):
    adata, train, level = _screen()
    ctrl = adata[adata.obs["perturbation"] == "control"].copy()
    truth = adata[adata.obs["perturbation"] == "g4"].X.mean(0) - ctrl.X.mean(0)
    shifts = {}
    for on in (True, False):
        model = _build(train, on_target=on)
        shifts[on] = model.counterfactual(ctrl, "g4", support="none").X.mean(0) - ctrl.X.mean(0)
    rule = _build(train).sampler.on_target_rule
    assert rule.fraction == pytest.approx(-0.4, abs=0.03)
    assert shifts[True][4] == pytest.approx(rule.fraction * ctrl.X[:, 4].mean(), abs=1e-4)
    assert abs(shifts[True][4] - truth[4]) < 0.1 < abs(shifts[False][4] - truth[4])
    np.testing.assert_allclose(np.delete(shifts[True], 4), np.delete(shifts[False], 4), atol=1e-4)
    assert shifts[True][6] > 0.1  # the shared response (+0.5) is still borrowed, as without the prior
    assert _build(train, on_target=False).sampler.on_target_rule is None


def test_a_model_saved_before_the_prior_predicts_as_it_did(tmp_path):
    import json

    _, train, _ = _screen(1)
    ctrl = train[train.obs["perturbation"] == "control"].copy()
    model = _build(train)
    model.save(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    raw = json.loads(config.read_text())
    assert raw["config"]["on_target"] is True
    np.testing.assert_array_equal(CellDiT.load(tmp_path / "m").counterfactual(ctrl, "g4").X,
                                  model.counterfactual(ctrl, "g4").X)
    del raw["config"]["on_target"]  # as written by a celldit without the prior
    config.write_text(json.dumps(raw))
    old = CellDiT.load(tmp_path / "m")
    assert old.config.on_target is False and old.sampler.on_target_rule is None
