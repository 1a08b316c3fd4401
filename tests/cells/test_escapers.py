"""Escapers: the share of a knockout's cells left in the control state, estimated and sampled."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_adata
from tiny_cell_models import FIT, N_CTRL, SHIFTED, build, counterfactual, planted_adata

from celldit.cells import CellDiT, CellFitConfig
from celldit.cells.escapers import MAX_ESCAPERS, escaper_fraction, escaper_fractions, escaper_multipliers


def _cells(rng, n: int, share: float, delta: float, genes: int = 6) -> np.ndarray:
    """(n, genes) cells centred per gene: ``share`` unmoved, the rest moved by ``delta`` along the
    first three genes together (unit spread per gene)."""
    x = rng.normal(size=(n, genes))
    x[:, :3] += (delta / np.sqrt(3)) * (rng.random(n) >= share)[:, None]
    return x - x.mean(0)


U = np.r_[np.ones(3) / np.sqrt(3), np.zeros(3)]  # the shift's direction


# -- the estimate ----------------------------------------------------------------------------
@pytest.mark.parametrize("share", [0.2, 0.5])
def test_the_share_of_a_two_component_mixture_is_recovered(share):
    rng = np.random.default_rng(0)
    treated, controls = _cells(rng, 4000, share, 4.0), _cells(rng, 4000, 0.0, 0.0)
    assert abs(escaper_fraction(treated, controls, U * 4.0 * (1 - share)) - share) < 0.05


def test_spread_without_a_mixture_is_not_taken_for_escapers():
    rng = np.random.default_rng(1)
    controls = _cells(rng, 2000, 0.0, 0.0)
    # every cell moved: spread as the controls
    assert escaper_fraction(_cells(rng, 2000, 0.0, 3.0), controls, U * 3.0) == 0.0
    # each gene twice as spread, independently (count noise at a lower level): no cross terms
    assert escaper_fraction(2.0 * _cells(rng, 2000, 0.0, 0.0), controls, U * 3.0) == 0.0
    # a one-gene shift has no cross terms to read, however split its cells are
    one = rng.normal(size=(2000, 6))
    one[:, 0] += 4.0 * (rng.random(2000) >= 0.5)
    assert escaper_fraction(one - one.mean(0), controls, np.eye(6)[0] * 2.0) == 0.0
    assert escaper_fraction(_cells(rng, 2, 0.5, 4.0), controls, U * 2.0) == 0.0  # two cells
    assert escaper_fraction(_cells(rng, 2000, 0.5, 4.0), controls, np.zeros(6)) == 0.0  # no shift
    # a spread far beyond the shift is capped: the moved part would run away
    assert escaper_fraction(_cells(rng, 2000, 0.5, 20.0), controls, U * 0.5) == MAX_ESCAPERS


class _Rows:
    def __init__(self, x):
        self.x = x

    def all_rows(self, idx):
        return self.x[idx]


def test_fractions_per_condition_within_batches_and_only_where_eligible():
    rng = np.random.default_rng(2)
    g, n = 6, 1500
    blocks, cond, group = [], [], []
    for batch, offset in enumerate((0.0, 3.0)):  # batch 1 shifts every cell: not an escaper
        for c in range(4):
            x = rng.normal(size=(n, g)) + offset
            if c in (1, 3):  # mixtures on genes 0-2: 40% unmoved, the rest +4 along U
                x[:, :3] += (4.0 / np.sqrt(3)) * (rng.random(n) >= 0.4)[:, None]
            elif c == 2:  # a plain shift whose size differs between batches
                x[:, :3] += (2.0 + 2.0 * batch) / np.sqrt(3)
            blocks.append(x), cond.append(np.full(n, c)), group.append(np.full(n, batch))
    x, cond, group = np.concatenate(blocks), np.concatenate(cond), np.concatenate(group)
    anchors = np.stack([0.0 * U, 2.4 * U, 3.0 * U, 2.4 * U])
    eligible = np.array([True, True, True, False])
    out = escaper_fractions(_Rows(x), cond, group, anchors, eligible, max_cells=2000)
    assert out[0] == 0.0 and out[2] == 0.0 and out[3] == 0.0, out
    assert abs(out[1] - 0.4) < 0.06, out


def test_multipliers_keep_the_mean_and_are_seeded():
    m = escaper_multipliers(0.3, 100, np.random.default_rng(0))
    assert (m == 0).sum() == 30 and m.mean() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(m, escaper_multipliers(0.3, 100, np.random.default_rng(0)))
    assert not np.array_equal(m, escaper_multipliers(0.3, 100, np.random.default_rng(1)))
    np.testing.assert_array_equal(escaper_multipliers(0.0, 7, np.random.default_rng(0)), np.ones(7))
    np.testing.assert_array_equal(escaper_multipliers(0.01, 7, np.random.default_rng(0)), np.ones(7))


# -- in the model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted():
    """Perturbation P moves genes 0-3 by +3 in half its cells (penetrance 0.5)."""
    return planted_adata()


def test_the_planted_half_is_found_and_the_untrained_model_splits(planted):
    model = build(planted, source="control", anchor=True)
    share = model.effects().loc["P", "escapers"]
    assert 0.4 < share < 0.6, share
    ctrl = planted[:N_CTRL]
    shift = model.conditions.anchor((("P",), (1.0,)))
    out = counterfactual(model, ctrl, "P", support="balance", seed=4).X
    moved = out - ctrl.X
    # the untrained network outputs zero: each cell is its control plus 0 or the anchor / (1 - p)
    escaped = np.abs(moved).max(1) < 1e-5
    k = int(round(share * N_CTRL))
    assert escaped.sum() == k
    np.testing.assert_allclose(moved[~escaped], np.tile(shift * N_CTRL / (N_CTRL - k), (N_CTRL - k, 1)), atol=1e-4)
    np.testing.assert_allclose(moved.mean(0), shift, atol=1e-4)  # the mean is the mean shift's
    # the spread of the real split (sd ~1.5 on genes 0-3) instead of the controls' (~0.3)
    assert out[:, SHIFTED].std(0).min() > 1.2
    # the same cells escape whatever other labels are carried, and another seed picks others
    both = counterfactual(model, ctrl, ["control", "P"], support="balance", seed=4)
    np.testing.assert_array_equal(both[both.obs["perturbation"] == "P"].X, out)
    assert not np.array_equal(counterfactual(model, ctrl, "P", support="balance", seed=5).X, out)
    # generate splits alike
    gen = model.generate("P", n=100, seed=0, support="none").X
    assert gen[:, SHIFTED].std(0).min() > 1.2
    # and without escapers nothing splits
    plain = counterfactual(build(planted, source="control", escapers=False), ctrl, "P", support="balance").X
    assert plain[:, SHIFTED].std(0).max() < 0.5


def test_a_null_knockout_has_no_escapers_and_shares_survive_save_and_load(tmp_path):
    adata = make_adata({"control": 150, "P": 150, "N": 150}, 10, space="log", level=2.0, spread=0.3, sparse=False,
                       effects={"P": dict.fromkeys(range(3), 2.5)}, penetrance={"P": 0.6}, seed=3)
    model = build(adata, source="control")
    shares = model.effects()["escapers"]
    assert shares["N"] == 0.0 and 0.3 < shares["P"] < 0.55, shares
    model.save(tmp_path / "m")
    loaded = CellDiT.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.effects()["escapers"], shares)
    assert build(adata, source="control", escapers=False).effects()["escapers"].eq(0).all()


def test_counts_lowered_to_a_few_per_cell_are_not_escapers():
    # every P cell moves (g1 x5, g4 x0.3: its zeros make it far more spread in log space)
    adata = make_adata({"control": 300, "P": 300}, 12, effects={"P": {1: 1.6, 4: -1.2}}, level=np.full(12, 5.0),
                       sparse=False, seed=0)
    assert build(adata, source="control").effects().loc["P", "escapers"] == 0.0
    split = make_adata({"control": 300, "P": 300}, 12, effects={"P": {1: 1.6, 2: 1.6, 4: -1.2}},
                       penetrance={"P": 0.7}, level=np.full(12, 5.0), sparse=False, seed=0)
    assert 0.15 < build(split, source="control").effects().loc["P", "escapers"] < 0.45


def test_training_batches_draw_escapers_at_the_share(planted):
    model = build(planted, source="control")
    share = model.conditions.escaper_share((("P",), (1.0,)))
    batches, _ = model._batches(CellFitConfig(max_steps=1, batch_size=128, block_size=64), seed=0)
    scales = np.concatenate([s for i in range(40)
                             for s in batches.draw(np.random.default_rng(i))[5] if s is not None])
    np.testing.assert_allclose(np.unique(scales), [0.0, 1 / (1 - share)], rtol=1e-6)
    assert abs((scales == 0).mean() - share) < 0.05
    # the split sources start nearer their (OT-paired) targets: a far lower flow loss than
    # sources that all get the whole anchor, from the first steps on
    with_escapers = model.fit(max_steps=30, lr=2e-3, **FIT).history["losses"]
    plain = build(planted, source="control", escapers=False).fit(max_steps=30, lr=2e-3, **FIT).history["losses"]
    assert np.mean(with_escapers) < 0.6 * np.mean(plain), (np.mean(with_escapers), np.mean(plain))
