"""Anchor shrinkage: noise-level shifts pulled toward no change, clear ones kept, by hand and
on cells with a planted effect (values, not shapes)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ArrayRows

from celldit.cells.anchors import build_condition_table
from celldit.cells.shrinkage import empirical_bayes, gate_factors, shrink_shifts


def test_gate_by_hand():
    se2 = np.ones((3, 4))
    d = np.array([[0.0, 0.0, 0.0, 0.0],   # z = 0: closed (floor)
                  [1.2, 1.2, 1.2, 1.2],   # z = 1.44: (1.44 - 1) / (2 - 1)
                  [3.0, 3.0, 3.0, 3.0]])  # z = 9: open
    np.testing.assert_allclose(gate_factors(d, se2, gate=2.0, floor=0.1), [0.1, 0.44, 1.0])
    shrunk, factors, mix = shrink_shifts(d, se2, "gate")
    np.testing.assert_allclose(shrunk, d * factors[:, None], rtol=1e-6)
    np.testing.assert_allclose(mix, 1.0)


def test_empirical_bayes_by_hand():
    # gene 0: true spread tau2 = mean d^2 - mean se2 = 5 - 1 = 4 -> factor 4 / 5; gene 1: no spread -> 0
    d = np.array([[1.0, 1.0], [3.0, -1.0]])
    se2 = np.ones((2, 2))
    np.testing.assert_allclose(empirical_bayes(d, se2), [[0.8, 0.0], [2.4, 0.0]], atol=1e-9)


def test_hybrid_keeps_clear_shifts_and_shrinks_noise():
    d = np.array([[3.0, -3.0, 3.0], [0.5, -0.2, 0.1]])
    se2 = np.ones_like(d)
    shrunk, factors, mix = shrink_shifts(d, se2, "hybrid", gate=2.0, floor=0.1)
    np.testing.assert_allclose(factors, [1.0, 0.1])
    np.testing.assert_allclose(shrunk[0], d[0], rtol=1e-6)  # open gate: the raw shift
    eb = empirical_bayes(d, se2)
    np.testing.assert_allclose(shrunk[1], 0.1 * eb[1], rtol=1e-5)  # closed: denoised, scaled to the floor
    assert np.abs(shrunk[1]).sum() < 0.1 * np.abs(d[1]).sum()
    plain, f, _ = shrink_shifts(d, se2, None)
    np.testing.assert_array_equal(plain, d.astype(np.float32))
    np.testing.assert_array_equal(f, 1.0)
    with pytest.raises(ValueError, match="anchor_shrinkage"):
        shrink_shifts(d, se2, "james-stein")


def test_condition_table_shrinks_a_null_knockout_and_keeps_a_real_one():
    """Cells: 400 controls, a knockout with a planted shift of 1.0 on 5 of 200 genes, and one
    with no effect. The null knockout's anchor (sampling noise, ~0.1 per gene) is shrunk to a
    fraction; the real one keeps its shift; group shifts shrink like their anchor."""
    rng = np.random.default_rng(0)
    n, g = 400, 200
    effect = np.zeros(g)
    effect[:5] = 1.0
    x = np.concatenate([rng.normal(size=(n, g)), rng.normal(size=(100, g)) + effect, rng.normal(size=(100, g))])
    ctrl, real, null = ((), ()), (("REAL",), (1.0,)), (("NULL",), (1.0,))
    keys = [ctrl] * n + [real] * 100 + [null] * 100
    groups = np.tile([0, 1], len(keys) // 2)  # two covariate groups, both with every condition
    plain, _ = build_condition_table(keys, groups, ArrayRows(x), g)
    table, _ = build_condition_table(keys, groups, ArrayRows(x), g, shrinkage="hybrid")
    r_real, r_null = table.keys.index(real), table.keys.index(null)
    assert table.gates[r_real] == 1.0 and table.gates[r_null] == pytest.approx(0.1)
    np.testing.assert_array_equal(table.anchors[r_real], plain.anchors[r_real])
    np.testing.assert_allclose(table.anchors[r_real][:5], 1.0, atol=0.25)
    assert np.abs(plain.anchors[r_null]).mean() > 0.05  # the plain estimate carries its noise
    assert np.abs(table.anchors[r_null]).mean() < 0.1 * np.abs(plain.anchors[r_null]).mean()
    # the group-weighted anchor of a held-out group comes out shrunk too
    np.testing.assert_allclose(table.group_shifts[(r_real, 0)], plain.group_shifts[(r_real, 0)], rtol=1e-6)
    assert np.abs(table.held_out_anchor(r_null, 0)).mean() < 0.1 * np.abs(plain.held_out_anchor(r_null, 0)).mean()


def test_unknown_shrinkage_is_named():
    from celldit.cells import CellDiTConfig

    with pytest.raises(ValueError, match="anchor_shrinkage='foo'"):
        CellDiTConfig(perturbation_key="p", control="c", anchor_shrinkage="foo")
    with pytest.raises(ValueError, match="shrinkage_gate"):
        CellDiTConfig(perturbation_key="p", control="c", shrinkage_gate=1.0)


def test_noise_level_conditions_keep_their_shrunk_anchor_and_the_gate_is_saved(tmp_path):
    """A clear knockout (P) and one without effect (Q): Q's gate is closed, and with
    ``gate_velocity`` its network velocity is scaled by the gate (one Euler step: exactly),
    P's is not; the gates survive save/load."""
    import warnings

    import torch
    from conftest import make_adata

    from celldit.cells import CellDiT

    adata = make_adata({"control": 200, "P": 100, "Q": 100}, 12, space="log", level=2.0, spread=0.3, sparse=False,
                       effects={"P": {0: 1.5, 1: -1.0}}, seed=1)
    kw = dict(perturbation_key="perturbation", control="control", hidden_size=16, depth=1, num_heads=2,
              perturbation_features=None, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gated, plain = CellDiT(adata, **kw), CellDiT(adata, **kw, gate_velocity=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gated.network.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plain.network.load_state_dict(gated.network.state_dict())
    t = gated.conditions
    p_row, q_row = t.row((("P",), (1.0,))), t.row((("Q",), (1.0,)))
    assert t.gates[p_row] == 1.0 and t.gates[q_row] < 0.5
    ctrl = adata[adata.obs["perturbation"] == "control"][:50].copy()
    start = ctrl.X + 0.0  # centred model: the input's own mean is removed and put back
    outs = {}
    for name, model in (("gated", gated), ("plain", plain)):
        for label in ("P", "Q"):
            outs[name, label] = model.counterfactual(ctrl, label, steps=1, method="euler", support="none").X
    anchor_q = t.anchors[q_row]
    moved_gated = outs["gated", "Q"] - start - anchor_q
    moved_plain = outs["plain", "Q"] - start - anchor_q
    assert np.abs(moved_plain).max() > 1e-3  # the jiggled network moves the cells
    np.testing.assert_allclose(moved_gated, t.gates[q_row] * moved_plain, atol=1e-5)
    np.testing.assert_allclose(outs["gated", "P"], outs["plain", "P"], atol=1e-6)
    gated.save(tmp_path / "m")
    back = CellDiT.load(tmp_path / "m")
    np.testing.assert_allclose(back.conditions.gates, t.gates, rtol=1e-6)
    np.testing.assert_allclose(back.counterfactual(ctrl, "Q", steps=1, method="euler", support="none").X,
                               outs["gated", "Q"], atol=1e-5)
