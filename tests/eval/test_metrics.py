"""celldit.eval.metrics pinned to hand-computed values, identities, sparse == dense."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from celldit.data.spec import PerturbationSpec
from celldit.eval import metrics as M
from celldit.eval.pca import PCASpace
from celldit.eval.scoring import score_predictions


# ------------------------------------------------------------------ gene-space metrics
def test_pearson_hand_value():
    # x̄ = 2, ȳ = 7/3: sum dxdy = 3, sum dx^2 = 2, sum dy^2 = 14/3 -> r = 3 / sqrt(28/3)
    assert M.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(28 / 3), abs=1e-12)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_constant_is_nan():
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(M.pearson_delta(np.array([0.5, -1.0, 2.0]), np.zeros(3)))


def test_pearson_delta_is_one_for_a_scaled_true_delta():
    rng = np.random.default_rng(0)
    d_true = rng.normal(size=50)
    assert M.pearson_delta(d_true, 2.5 * d_true) == pytest.approx(1.0)
    assert M.pearson_delta(d_true, -0.3 * d_true) == pytest.approx(-1.0)
    top = M.top_k_de_genes(d_true, 20)
    noisy = d_true.copy()
    noisy[np.setdiff1d(np.arange(50), top)] = 0.0  # only the DE genes right
    assert M.pearson_delta(d_true, 4 * noisy, top) == pytest.approx(1.0)
    assert M.pearson_delta(d_true, 4 * noisy) < 1.0


def test_top_k_de_genes_orders_by_absolute_delta_with_stable_ties():
    delta = np.array([0.1, -3.0, 2.0, 0.0, -2.0])
    assert M.top_k_de_genes(delta, 2).tolist() == [1, 2]
    assert M.top_k_de_genes(delta, 3).tolist() == [1, 2, 4]  # tie |2| = |-2|: gene order
    assert M.top_k_de_genes(delta, 99).tolist() == [1, 2, 4, 0, 3]
    with pytest.raises(ValueError, match="k must be"):
        M.top_k_de_genes(delta, 0)


def test_mse_mae_hand_values():
    pred, true = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    assert M.mse(pred, true, [1, 2]) == pytest.approx((1 + 4) / 2)
    assert M.mae(pred, true, [1, 2]) == pytest.approx((1 + 2) / 2)
    assert M.mse(pred, true) == pytest.approx(5 / 3)


def test_r2_mean_is_squared_pearson():
    assert M.r2_mean([1, 2, 4], [1, 2, 3]) == pytest.approx(27 / 28)
    true = np.array([0.1, 3.0, 1.2, 0.0])
    assert M.r2_mean(2 * true + 1, true) == pytest.approx(1.0)  # offsets and scale ignored


def test_nan_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        M.pearson_delta([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        M.energy_distance(np.array([[np.nan]]), np.array([[1.0]]))


# --------------------------------------------------------------- distribution metrics
def test_energy_distance_hand_value():
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0]])
    # E|x-y| = (3 + 2)/2, E|x-x'| = (0 + 1 + 1 + 0)/4 (self-pairs included), E|y-y'| = 0
    assert M.energy_distance(x, y) == pytest.approx(2 * 2.5 - 0.5 - 0.0)
    assert M.energy_distance(x, x) == pytest.approx(0.0)


def test_mmd_hand_values():
    x, y = np.array([[0.0]]), np.array([[1.0]])
    assert M.mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(2 - 2 * math.exp(-0.5))
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0]])
    # pooled pairwise distances 1, 3, 2 -> median bandwidth 2, k = exp(-d^2 / 8)
    assert M.median_bandwidth(x, y) == pytest.approx(2.0)
    kxx = (2 + 2 * math.exp(-1 / 8)) / 4
    kxy = (math.exp(-9 / 8) + math.exp(-4 / 8)) / 2
    assert M.mmd_rbf(x, y) == pytest.approx(kxx + 1 - 2 * kxy)


def test_sliced_wasserstein_one_dimension_is_w1():
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert M.sliced_wasserstein(x, y, n_projections=7) == pytest.approx(2.0)
    assert M.sliced_wasserstein(x, x) == pytest.approx(0.0)


@pytest.mark.parametrize("metric", [M.energy_distance, M.mmd_rbf, M.sliced_wasserstein])
def test_distribution_metrics_near_zero_for_one_distribution_and_grow_with_shift(metric):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(300, 5))
    same = metric(a, b)
    shifted = [metric(a, b + s) for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.25 * shifted[1]
    assert shifted[0] < shifted[1] < shifted[2]
    if metric is M.energy_distance:
        assert same < 0.05


def test_discrimination_scores():
    true = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert M.discrimination_scores(true, true).tolist() == [1.0, 1.0, 1.0]
    swapped = true[[1, 0, 2]]
    # condition 0's prediction sits on condition 1's truth: 1 of its 2 rivals is closer
    assert M.discrimination_scores(swapped, true).tolist() == [0.5, 0.5, 1.0]
    far = np.array([[0.6, 2.0], [1.0, 0.0], [0.0, 3.0]])  # both rivals closer than own
    assert M.discrimination_scores(far, true)[0] == 0.0
    # prediction (0.5, 0) is equidistant from conditions 0 and 1 -> tie counts 0.5
    pred = np.array([[0.5, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert M.discrimination_scores(pred, true)[0] == pytest.approx((0.5 + 1.0) / 2)
    assert np.isnan(M.discrimination_scores(true[:1], true[:1])).all()


def test_mean_expression_sparse_equals_dense_in_float64():
    rng = np.random.default_rng(0)
    dense = (rng.random((50, 8)) * (rng.random((50, 8)) > 0.6) * 5).astype(np.float32)
    np.testing.assert_allclose(M.mean_expression(sp.csr_matrix(dense)),
                               dense.astype(np.float64).mean(0), rtol=0, atol=1e-12)


# ----------------------------------------------------------- many conditions at once
def _toy(sparse: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_genes, labels, shifts = 12, ["ctrl", "A", "B", "C"], {"ctrl": 0.0, "A": 1.0,
                                                          "B": -0.5, "C": 2.0}
    blocks, obs = [], []
    for lab in labels:
        base = rng.poisson(2.0, size=(40, n_genes)).astype(np.float32)
        base[:, :3] += shifts[lab] if shifts[lab] > 0 else 0
        base[:, 3:5] = np.maximum(base[:, 3:5] + shifts[lab], 0)
        blocks.append(np.log1p(base))
        obs += [lab] * 40
    x = np.vstack(blocks)
    real = AnnData(sp.csr_matrix(x) if sparse else x,
                   obs=pd.DataFrame({"cond": obs}, index=[f"c{i}" for i in range(len(obs))]))
    real.var_names = [f"g{i}" for i in range(n_genes)]
    pred_x = x[40:] + rng.normal(0, 0.1, size=x[40:].shape).astype(np.float32)
    pred = AnnData(sp.csr_matrix(pred_x) if sparse else pred_x,
                   obs=pd.DataFrame({"cond": obs[40:]}, index=[f"p{i}" for i in range(120)]))
    pred.var_names = real.var_names
    return real, pred


def test_score_predictions_sparse_and_dense_agree():
    spec = PerturbationSpec("cond", control="ctrl")
    tables = []
    for sparse in (False, True):
        real, pred = _toy(sparse)
        space = PCASpace(5).fit(real.X)
        tables.append(score_predictions(real, pred, spec, space, max_cells=30, seed=3))
    dense_t, sparse_t = tables
    assert dense_t["condition"].tolist() == ["A", "B", "C"]
    num = dense_t.select_dtypes("number").columns
    np.testing.assert_allclose(dense_t[num].to_numpy(float), sparse_t[num].to_numpy(float),
                               rtol=1e-6, atol=1e-9)
    assert (dense_t["pearson_delta_all"] > 0.9).all()
    assert (dense_t["discrimination"] == 1.0).all()
    assert dense_t["n_true"].tolist() == [40, 40, 40]


def test_score_predictions_rank_test_columns():
    real, pred = _toy(True)
    spec = PerturbationSpec("cond", control="ctrl")
    table = score_predictions(real, pred, spec, PCASpace(3).fit(real.X), max_cells=20,
                              rank_test=True, k_de=5)
    for col in ("pearson_delta_rankde20", "mse_rankde20", "mae_rankde20"):
        assert col in table and table[col].notna().all()


def test_pca_space_sparse_arpack_path_matches_dense(monkeypatch):
    import celldit.eval.pca as pca_mod

    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(200, 15)).astype(np.float64)
    x[:100, :3] += 4  # a dominant direction
    dense = PCASpace(3).fit(x)
    monkeypatch.setattr(pca_mod, "_DENSE_LIMIT", 0)  # force the sparse ARPACK fit
    sparse = PCASpace(3).fit(sp.csr_matrix(x))
    za, zb = dense.transform(x), sparse.transform(sp.csr_matrix(x))
    for k in range(3):  # equal up to the sign of each component
        assert abs(M.pearson(za[:, k], zb[:, k])) == pytest.approx(1.0, abs=1e-6)
    assert dense.describe()["n_components_fitted"] == 3
    with pytest.raises(ValueError, match="at least 2 cells"):
        PCASpace(3).fit(x[:1])
