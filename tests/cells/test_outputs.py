"""Predicted cells in the ecosystem's shapes, on the training normalisation basis, in memory or on disk."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import make_adata

from celldit.cells import CellDiT
from celldit.data.expression import log_normalize

TINY = {"hidden_size": 16, "depth": 1, "num_heads": 2, "perturbation_features": None}


@pytest.fixture(scope="module")
def screen():
    adata = make_adata({"control": 80, "P": 60, "Q": 60}, 30, effects={"P": {0: 1.5, 1: 1.5}, "Q": {2: -2.0}},
                       obs={"cell_type": ["T", "B"]}, level=np.linspace(0.5, 8, 30), seed=1)
    adata.var["symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    adata.var["highly_variable"] = np.arange(adata.n_vars) < 20
    adata.obs["n_counts"] = np.asarray(adata.X.sum(1)).ravel()
    return adata


@pytest.fixture(scope="module")
def model(screen):
    return CellDiT(screen, covariate_keys=["cell_type"], genes="var:highly_variable", **TINY)


def controls(adata):
    return adata[adata.obs["perturbation"] == "control"].copy()


def test_output_shapes_follow_scanpy_conventions(model, screen):
    out = model.counterfactual(controls(screen), ["P", "Q"], counts=True, raw_layer=True, seed=3)
    n = int((screen.obs["perturbation"] == "control").sum())
    assert out.shape == (2 * n, 20) and list(out.var_names) == [f"g{i}" for i in range(20)]
    assert list(out.var["symbol"]) == [f"SYM{i}" for i in range(20)]  # the input's annotations are kept
    for key in ("perturbation", "cell_type", "celldit_source"):
        assert isinstance(out.obs[key].dtype, pd.CategoricalDtype), key
    # X: the flow output on log1p's support; the raw flow output is kept on request
    flow = out.layers["flow"]
    assert flow.min() < 0 <= out.X.min()
    library = np.tile(screen.obs["n_counts"].to_numpy()[screen.obs["perturbation"] == "control"], 2)
    level = np.log1p(1e4 / library)[:, None]  # each source cell's first count level
    balanced = model.counterfactual(controls(screen), ["P", "Q"], support="balance", seed=3).X
    np.testing.assert_array_equal(model.counterfactual(controls(screen), ["P", "Q"], raw_layer=True,
                                                       seed=3).layers["flow"], flow)  # same flow, every rule
    for block in (slice(0, n), slice(n, 2 * n)):
        # "balance": each gene's mean over a condition's cells kept exactly
        kept = flow[block].mean(0) > 0
        np.testing.assert_allclose(balanced[block].mean(0)[kept], flow[block].mean(0)[kept], rtol=1e-4, atol=1e-5)
        assert np.all(balanced[block][:, ~kept] == 0)
        # "discrete" (default): balance's values below the first count level go to 0 or to it,
        # so a detected gene is never below one count, and the means move by rounding noise only
        x, b = out.X[block], balanced[block]
        assert np.all((x == 0) | (x >= level[block] * (1 - 1e-6)))
        np.testing.assert_array_equal(x[b >= level[block]], b[b >= level[block]])
        small = (b > 0) & (b < level[block])
        assert small.mean() > 0.05  # the rule had something to round
        sd = np.sqrt((b * (level[block] - b) * small).sum(0)) / len(b)  # sd of each gene's rounded mean
        assert np.all(np.abs(x.mean(0) - b.mean(0)) <= 4 * sd + 1e-5)
    clipped = model.counterfactual(controls(screen), ["P"], support="clip").X
    np.testing.assert_array_equal(clipped, np.clip(flow[:n], 0, None))
    with pytest.raises(ValueError, match="support='round'"):
        model.counterfactual(controls(screen), ["P"], support="round")
    # the counts layer: Poisson draws around expm1(x) * library size / 1e4
    expected = np.expm1(out.X) * library[:, None] / 1e4
    counts = out.layers["counts"].toarray()
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    assert abs(counts.sum() / expected.sum() - 1) < 0.02
    # obsm['X_pca'] is the model's PCA of the training cells
    mean, components = model.pca
    np.testing.assert_allclose(out.obsm["X_pca"], (out.X - mean) @ components, rtol=1e-4, atol=1e-4)
    gen = model.generate({"perturbation": "P", "cell_type": "B"}, n=7, counts=True)
    assert list(gen.var["symbol"]) == [f"SYM{i}" for i in range(20)] and "counts" in gen.layers
    assert isinstance(gen.obs["cell_type"].dtype, pd.CategoricalDtype)


def test_streamed_output_equals_the_in_memory_one(model, screen, tmp_path):
    kw = {"counts": True, "seed": 5, "batch_size": 17}  # several blocks per label
    mem = model.counterfactual(controls(screen), ["P", "Q"], **kw)
    disk = model.counterfactual(controls(screen), ["P", "Q"], out=tmp_path / "cf.h5ad", **kw)
    assert disk.isbacked
    disk.file.close()
    back = ad.read_h5ad(tmp_path / "cf.h5ad")
    np.testing.assert_array_equal(back.X, mem.X)
    np.testing.assert_array_equal(back.layers["counts"].toarray(), mem.layers["counts"].toarray())
    np.testing.assert_array_equal(back.obsm["X_pca"], mem.obsm["X_pca"])
    assert back.obs.equals(mem.obs) and list(back.var["symbol"]) == list(mem.var["symbol"])
    with pytest.raises(FileExistsError, match="already exists"):
        model.counterfactual(controls(screen), "P", out=tmp_path / "cf.h5ad")
    # an error half way leaves no file behind
    with pytest.raises(KeyError, match="'NOPE'"):
        model.counterfactual(controls(screen), ["P", "NOPE"], out=tmp_path / "half.h5ad")
    assert not (tmp_path / "half.h5ad").exists() and not list(tmp_path.glob(".half*"))


def test_zarr_stores_in_and_out(model, screen, tmp_path):
    from celldit.data.files import read_cells

    kw = {"counts": True, "raw_layer": True, "seed": 5, "batch_size": 17}
    mem = model.counterfactual(controls(screen), ["P", "Q"], **kw)
    store = tmp_path / "cf.zarr"
    model.counterfactual(controls(screen), ["P", "Q"], out=store, **kw)
    back = ad.read_zarr(store)  # anndata reads what was streamed
    np.testing.assert_array_equal(back.X, mem.X)
    np.testing.assert_array_equal(back.layers["counts"].toarray(), mem.layers["counts"].toarray())
    np.testing.assert_array_equal(back.layers["flow"].toarray(), mem.layers["flow"])
    np.testing.assert_array_equal(back.obsm["X_pca"], mem.obsm["X_pca"])
    assert back.obs.equals(mem.obs)
    # a zarr store as input, its matrix left on disk: the same cells as the in-memory input
    controls(screen).write_zarr(tmp_path / "ctrl.zarr")
    lazy = read_cells(tmp_path / "ctrl.zarr", backed=True)
    assert not isinstance(lazy.X, np.ndarray) and "Dataset" in type(lazy.X).__name__
    again = model.counterfactual(lazy, ["P", "Q"], **kw)
    np.testing.assert_array_equal(again.X, mem.X)
    # overwrite replaces a store whole; without it the store is kept
    with pytest.raises(FileExistsError):
        model.counterfactual(controls(screen), "P", out=store)
    model.counterfactual(controls(screen), "P", out=store, overwrite=True)
    assert ad.read_zarr(store).n_obs == controls(screen).n_obs and not list(tmp_path.glob(".cf.zarr*"))


def test_inputs_normalise_on_the_training_basis(model, screen):
    """The model's library sizes are totals over its 30 training genes (it models 20 of
    them). An input carrying only the 20 model genes cannot be normalised like that from
    its own columns: an error says so, and a size-factor column gives the exact result."""
    full = controls(screen)
    reference = model.counterfactual(full, "control")
    expected = log_normalize(full).X.toarray()[:, :20]
    np.testing.assert_allclose(reference.X, expected, rtol=0, atol=1e-5)  # control label: the input itself
    narrow = full[:, :20].copy()
    with pytest.raises(ValueError, match="lacks 10 of the 30 genes.*size_factor_key"):
        model.counterfactual(narrow, "control")
    sized = model.counterfactual(narrow, "control", size_factor_key="n_counts")
    np.testing.assert_allclose(sized.X, reference.X, rtol=0, atol=1e-5)
    # log1p input computed on the full gene set needs no library sizes
    logged = log_normalize(full)[:, :20].copy()
    del logged.layers["counts"]  # else the counts layer is read first (the default rule)
    np.testing.assert_allclose(model.counterfactual(logged, "control").X, reference.X, rtol=0, atol=1e-5)


def test_dose_without_a_dose_key_is_refused(model, screen):
    with pytest.raises(ValueError, match="without a dose key"):
        model.counterfactual(controls(screen), "P", dose=10)


def test_support_rules_keep_each_genes_mean_and_balance_turns_the_spread_around_zero_into_zeros():
    from celldit.cells.outputs import to_support

    rng = np.random.default_rng(0)
    n = 2000
    # gene 0: 70% "zeros" smeared around 0 by the flow (sd 0.3), 30% expressed near 4;
    # gene 1: all expressed, no negative value; gene 2: mean below zero
    expressed = rng.random(n) < 0.3
    g0 = np.where(expressed, 4.0 + 0.2 * rng.standard_normal(n), 0.3 * rng.standard_normal(n))
    g1 = 2.0 + 0.1 * rng.standard_normal(n)
    g2 = -0.5 + 0.1 * rng.standard_normal(n)
    x = np.stack([g0, g1, g2], 1).astype(np.float32)
    out = {how: to_support(x, how) for how in ("rescale", "balance", "clip")}
    for how in ("rescale", "balance"):
        assert (out[how] >= 0).all()
        np.testing.assert_allclose(out[how][:, :2].mean(0), x[:, :2].mean(0), rtol=1e-5)
        assert np.all(out[how][:, 2] == 0)  # a mean below zero cannot be kept: all zeros
    np.testing.assert_array_equal(out["balance"][:, 1], x[:, 1])  # nothing to balance: untouched
    # balance: the smeared cells become zeros (about as many as the data has) and the expressed
    # values keep their level; rescale keeps half the smear and scales every expressed value down
    zeros = {how: (out[how][:, 0] == 0).mean() for how in out}
    assert zeros["balance"] > 0.6 and zeros["rescale"] < 0.4
    level = {how: out[how][expressed, 0].mean() for how in out}
    assert abs(level["balance"] - 4.0) < 0.05 and level["rescale"] < 3.85
    assert out["clip"][:, 0].mean() > x[:, 0].mean() + 0.05  # clipping alone raises the mean
    with pytest.raises(ValueError, match="support='round'"):
        to_support(x, "round")


def test_discrete_support_puts_detected_genes_at_one_count_or_more_and_keeps_means_in_expectation():
    from celldit.cells.outputs import first_count_level, to_support

    rng = np.random.default_rng(1)
    n = 4000
    library = rng.integers(150, 300, n).astype(float)
    level = first_count_level(None, library)
    np.testing.assert_allclose(level, np.log1p(1e4 / library))
    # without library sizes: a log1p cell's smallest positive value (a gene counted once); 0 for an empty cell
    counts = np.array([[0, 1, 3], [2, 0, 5], [0, 0, 0]], dtype=float)
    logged = np.log1p(1e4 * counts / np.maximum(counts.sum(1, keepdims=True), 1))
    np.testing.assert_allclose(first_count_level(logged), [np.log1p(1e4 / 4), np.log1p(2e4 / 7), 0.0])
    # gene 0: a control gene at 0 lifted by a shift of +0.8 (real cells would detect it in ~20%);
    # gene 1: expressed at one count or more; gene 2: smeared around 0, mean 0.3
    x = np.stack([np.full(n, 0.8), level + rng.random(n), 0.3 + 0.5 * rng.standard_normal(n)], 1).astype(np.float32)
    out = to_support(x, "discrete", first_level=level, rng=np.random.default_rng(0))
    assert np.all((out == 0) | (out >= level[:, None].astype(np.float32)))
    np.testing.assert_array_equal(out[:, 1], x[:, 1])  # values at or above one count are kept
    # as many cells detect gene 0 as the probabilities add to (within one), where balance has all
    assert abs((out[:, 0] > 0).sum() - (0.8 / level).sum()) <= 1 and (to_support(x, "balance")[:, 0] > 0).all()
    # the means move by far less than independent draws would (their sd: 0.03 for gene 0)
    np.testing.assert_allclose(out.mean(0), x.mean(0), atol=0.005)
    # each value goes up with its own probability: the cells of the lowest levels most often
    ups = np.mean([to_support(x[:, :1], "discrete", first_level=level, rng=np.random.default_rng(s))[:, 0] > 0
                   for s in range(100)], axis=0)
    low, high = level < np.quantile(level, 0.2), level > np.quantile(level, 0.8)
    np.testing.assert_allclose([ups[low].mean(), ups[high].mean()], [np.mean(0.8 / level[low]),
                                                                      np.mean(0.8 / level[high])], atol=0.01)
    again = to_support(x, "discrete", first_level=level, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)  # seeded
    # a cell with no count (level 0) is left as "balance" leaves it
    lone = to_support(x[:3], "discrete", first_level=np.zeros(3), rng=rng)
    np.testing.assert_array_equal(lone, to_support(x[:3], "balance"))
    with pytest.raises(ValueError, match="needs first_level"):
        to_support(x, "discrete")


def test_generate_takes_discrete_only_from_a_bank_of_counted_control_cells(screen):
    noise = CellDiT(screen, source="noise", **TINY)
    with pytest.raises(ValueError, match="support='discrete'.*use support='balance'"):
        noise.generate("P", n=5, support="discrete")
    assert (noise.generate("P", n=5).X >= 0).all()  # generate's default: balance
    control = CellDiT(screen, **TINY)
    made = control.generate("P", n=200, support="discrete", seed=2)
    levels = np.log1p(1e4 / control.bank_library)
    assert np.all((made.X == 0) | (made.X >= levels.min() * (1 - 1e-6)))
    assert (made.X == 0).mean() > (control.generate("P", n=200, seed=2).X == 0).mean()
