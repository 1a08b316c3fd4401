"""control_mean="pooled": a batch's mean control cell pooled with the training batches'."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from celldit.cells import CellDiT
from celldit.cells.control_mean import DEFAULT_POOLING, pooled_control_mean, pooled_shift

G = 40


def _cells(rng, mean, n, sd=1.0):
    return mean + sd * rng.standard_normal((n, G))


def test_pooling_with_a_batch_alike_halves_the_error_of_the_mean():
    """Two samples of one population (60 and 60 cells): the pooled mean weighs them about
    half and half, and its squared error is about half the own mean's."""
    rng = np.random.default_rng(0)
    own_err, pooled_err, shares = [], [], []
    for _ in range(200):
        mu = rng.uniform(0, 3, G)
        x, ref = _cells(rng, mu, 60), _cells(rng, mu, 60)
        pooled, w = pooled_control_mean(x, ref.mean(0, keepdims=True), np.array([60]))
        own_err.append(((x.mean(0) - mu) ** 2).sum())
        pooled_err.append(((pooled - mu) ** 2).sum())
        shares.append(w[0])
    assert 0.4 < np.mean(shares) < 0.65
    assert 0.4 < np.mean(pooled_err) / np.mean(own_err) < 0.65


def test_a_far_batch_adds_almost_nothing_and_the_same_cells_give_their_own_mean():
    rng = np.random.default_rng(1)
    mu = rng.uniform(0, 3, G)
    x = _cells(rng, mu, 80)
    far = (mu + 3.0)[None]  # another cell type: every gene 3 sd away
    pooled, w = pooled_control_mean(x, far, np.array([500]))
    assert w[1] < 0.002 and np.abs(pooled - x.mean(0)).max() < 0.01
    # the batch's own training cells among the references (a held-out type's controls): kept
    pooled, w = pooled_control_mean(x, np.vstack([x.mean(0), far[0]]), np.array([80, 500]))
    np.testing.assert_allclose(pooled, x.mean(0), atol=0.01)
    # one reference alike, one far: the share goes to the alike one
    alike = _cells(rng, mu, 80).mean(0)
    _, w = pooled_control_mean(x, np.vstack([alike, far[0]]), np.array([80, 500]))
    assert w[1] > 0.3 and w[2] < 0.002 and np.isclose(w.sum(), 1.0)


def test_pooled_shift_is_one_vector_per_batch_and_one_cell_is_refused():
    rng = np.random.default_rng(2)
    mu = rng.uniform(0, 3, G)
    x = np.vstack([_cells(rng, mu, 30), _cells(rng, mu + 0.2, 30)])
    batch = np.array(["a"] * 30 + ["b"] * 30)
    ref, sizes = _cells(rng, mu, 30).mean(0, keepdims=True), np.array([30])
    shift = pooled_shift(x, batch, ref, sizes)
    for b in ("a", "b"):
        rows = batch == b
        assert np.ptp(shift[rows], axis=0).max() == 0  # the same vector for every cell of a batch
        want, _ = pooled_control_mean(x[rows], ref, sizes)
        np.testing.assert_allclose(shift[rows][0], want - x[rows].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 control cells.*control_mean='observed'"):
        pooled_control_mean(x[:1], ref, sizes)


def _replicates(seed: int = 3) -> AnnData:
    """Three replicates of one population (log space); P shifts genes 0-3 by +1."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(2.0, 3.0, G)
    xs, obs = [], []
    for rep in ("r1", "r2", "r3"):
        base = np.clip(mu + 0.4 * rng.standard_normal((100, G)), 0, None)
        base[50:, :4] += 1.0
        xs.append(base)
        obs += [("control", rep)] * 50 + [("P", rep)] * 50
    frame = pd.DataFrame(obs, columns=["perturbation", "rep"], index=[f"c{i}" for i in range(len(obs))])
    return AnnData(np.concatenate(xs).astype(np.float32), obs=frame,
                   var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))


def test_counterfactual_with_pooled_control_mean(tmp_path):
    """Pooled: every cell moves by the batch's pooled-minus-observed mean (recorded as the
    training batches' means), in memory and after save/load, and in generate(controls=)."""
    adata = _replicates()
    train = adata[adata.obs["rep"] != "r3"].copy()
    new = adata[(adata.obs["rep"] == "r3") & (adata.obs["perturbation"] == "control")].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = CellDiT(train, pair_keys=["rep"], hidden_size=16, depth=1, num_heads=2, perturbation_features=None)
    means, sizes = model.control_batches
    ctrl = train[train.obs["perturbation"] == "control"]
    for rep, mean in zip(("r1", "r2"), means):
        np.testing.assert_allclose(mean, ctrl[ctrl.obs["rep"] == rep].X.mean(0), atol=1e-5)
    assert sizes.tolist() == [50, 50]
    observed = model.counterfactual(new, ["control", "P"], support="none")
    pooled = model.counterfactual(new, ["control", "P"], support="none", control_mean="pooled", pooling=1.0)
    want = pooled_shift(new.X, np.zeros(new.n_obs), means, sizes)[0]
    np.testing.assert_allclose(pooled.X - observed.X, np.broadcast_to(want, observed.shape), atol=1e-5)
    assert np.abs(want).max() > 0.01  # it moved
    assert (observed.uns["celldit"]["control_mean"], pooled.uns["celldit"]["control_mean"]) == ("observed", "pooled")
    # the saved model pools alike
    model.save(tmp_path / "m")
    again = CellDiT.load(tmp_path / "m").counterfactual(new, "P", support="none", control_mean="pooled",
                                                        pooling=1.0)
    np.testing.assert_allclose(again.X, pooled.X[new.n_obs:], atol=1e-6)
    with pytest.raises(ValueError, match="control_mean='mean'"):
        model.counterfactual(new, "P", control_mean="mean")
    with pytest.raises(ValueError, match="pass controls="):
        model.generate("P", 5, control_mean="pooled")
    gen = model.generate("P", 5, controls=new, support="none", control_mean="pooled", pooling=1.0, seed=1)
    base = model.generate("P", 5, controls=new, support="none", seed=1)
    np.testing.assert_allclose(gen.X - base.X, np.broadcast_to(want, base.shape), atol=1e-5)
    # a fraction of the way: the move scales (by default DEFAULT_POOLING of it), 0 is the
    # observed mean, and it is recorded
    default = model.counterfactual(new, "P", support="none", control_mean="pooled")
    np.testing.assert_allclose(default.X - observed.X[new.n_obs:], np.broadcast_to(DEFAULT_POOLING * want, default.shape),
                               atol=1e-5)
    assert default.uns["celldit"]["pooling"] == DEFAULT_POOLING == 0.5
    half = model.counterfactual(new, ["control", "P"], support="none", control_mean="pooled", pooling=0.25)
    np.testing.assert_allclose(half.X - observed.X, np.broadcast_to(0.25 * want, observed.shape), atol=1e-5)
    assert (half.uns["celldit"]["pooling"], pooled.uns["celldit"]["pooling"]) == (0.25, 1.0)
    none = model.counterfactual(new, "P", support="none", control_mean="pooled", pooling=0.0)
    np.testing.assert_allclose(none.X, observed.X[new.n_obs:], atol=1e-6)
    gen_half = model.generate("P", 5, controls=new, support="none", control_mean="pooled", pooling=0.25, seed=1)
    np.testing.assert_allclose(gen_half.X - base.X, np.broadcast_to(0.25 * want, base.shape), atol=1e-5)
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="pooling=.*fraction in \\[0, 1\\]"):
            model.counterfactual(new, "P", control_mean="pooled", pooling=bad)
    model.control_batches = None  # a folder saved before the training batches' means were kept
    with pytest.raises(ValueError, match="refit it, or use control_mean='observed'"):
        model.counterfactual(new, "P", control_mean="pooled")
