"""Baselines: exact shifts on synthetic data, and the DESIGN.md numbers on the real data."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import shared_data

from celldit.data.expression import log_normalize
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutCovariateGroup, HeldOutReplicate
from celldit.eval.baselines import (
    Additive,
    Linear,
    MeanShift,
    NoChange,
    TrainMean,
    gene_pca_embedding,
    make_baseline,
    prediction_requests,
)
from celldit.eval.metrics import mean_expression
from celldit.eval.report import evaluate

N_GENES = 6


def _cells(groups: dict[tuple[str, str], np.ndarray], n: int = 4, sparse: bool = False,
           noise: float = 0.0, seed: int = 0) -> AnnData:
    """n cells per (label, cell type) whose mean is exactly the given vector."""
    rng = np.random.default_rng(seed)
    xs, labels, types = [], [], []
    for (label, ct), mean in groups.items():
        eps = rng.normal(0, noise, size=(n, N_GENES)) if noise else np.zeros((n, N_GENES))
        xs.append(mean + eps - eps.mean(0))
        labels += [label] * n
        types += [ct] * n
    x = np.vstack(xs).astype(np.float64)
    obs = pd.DataFrame({"cond": labels, "ct": types}, index=[f"c{i}" for i in range(len(labels))])
    out = AnnData(sp.csr_matrix(x) if sparse else x, obs=obs)
    out.var_names = [f"g{i}" for i in range(N_GENES)]
    return out


BASE = {"T": np.array([1.0, 2, 0.5, 0, 3, 1]), "B": np.array([2.0, 1, 0.5, 1, 0, 2])}
SHIFT = {"A": np.array([1.0, 0, 0, -0.5, 0, 0]), "C": np.array([0.0, 2, 0, 0, 0, 1])}


def _shifted(label, ct, extra=0.0):
    total = BASE[ct].copy()
    for p in label.split("+"):
        if p != "ctrl":
            total = total + SHIFT[p]
    return total + extra


@pytest.mark.parametrize("sparse", [False, True])
def test_shift_baselines_exact(sparse):
    spec = PerturbationSpec("cond", control="ctrl", covariate_keys=["ct"])
    train = _cells({("ctrl", "T"): BASE["T"], ("A", "T"): _shifted("A", "T"),
                    ("C", "T"): _shifted("C", "T"), ("ctrl", "B"): BASE["B"],
                    ("A", "B"): _shifted("A", "B", 0.2)}, sparse=sparse, noise=0.3)
    test = _cells({("ctrl", "T"): BASE["T"], ("ctrl", "B"): BASE["B"] + 0.1,
                   ("A", "B"): BASE["B"], ("C", "B"): BASE["B"], ("A+C", "T"): BASE["T"]},
                  n=3, sparse=sparse, noise=0.3, seed=1)
    req = prediction_requests(test, spec)
    assert sorted(zip(req["cond"], req["ct"], req["n_cells"])) == [
        ("A", "B", 3), ("A+C", "T", 3), ("C", "B", 3)]

    def means(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pred = model.fit(train, spec).predict(test, req)
        out = {}
        for (label, ct) in zip(req["cond"], req["ct"]):
            rows = (pred.obs["cond"] == label).to_numpy() & (pred.obs["ct"] == ct).to_numpy()
            out[label] = mean_expression(pred.X[rows])
        return out, pred

    ctrl_b, ctrl_t = BASE["B"] + 0.1, BASE["T"]  # test controls the predictions start from
    got, pred = means(NoChange())
    assert pred.n_obs == 9 and list(pred.var_names) == list(test.var_names)
    np.testing.assert_allclose(got["A"], ctrl_b, atol=1e-6)
    got, _ = means(MeanShift())
    np.testing.assert_allclose(got["A"], ctrl_b + SHIFT["A"] + 0.2, atol=1e-6)  # own group
    np.testing.assert_allclose(got["C"], ctrl_b + SHIFT["C"], atol=1e-6)  # other group's
    tm_t = (SHIFT["A"] + SHIFT["C"]) / 2
    np.testing.assert_allclose(got["A+C"], ctrl_t + tm_t, atol=1e-6)  # unseen: train_mean
    got, _ = means(TrainMean())
    np.testing.assert_allclose(got["A"], ctrl_b + SHIFT["A"] + 0.2, atol=1e-6)  # B: only A
    np.testing.assert_allclose(got["A+C"], ctrl_t + tm_t, atol=1e-6)
    got, _ = means(Additive())
    np.testing.assert_allclose(got["A+C"], ctrl_t + SHIFT["A"] + SHIFT["C"], atol=1e-6)


def test_unseen_perturbation_warns_and_request_mode_draws_n_cells():
    spec = PerturbationSpec("cond", control="ctrl")
    train = _cells({("ctrl", "T"): BASE["T"], ("A", "T"): _shifted("A", "T")})
    test = _cells({("ctrl", "T"): BASE["T"], ("C", "T"): BASE["T"]}, n=5)
    req = prediction_requests(test, spec)
    with pytest.warns(UserWarning, match="unseen in training"):
        pred = MeanShift().fit(train, spec).predict(test, req, cells="request")
    assert pred.n_obs == 5
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("magic")


def test_linear_recovers_linear_effects_from_a_user_table():
    spec = PerturbationSpec("cond", control="ctrl")
    emb = pd.DataFrame({"e1": [1.0, 0.0, 1.0, 2.0], "e2": [0.0, 1.0, 1.0, -1.0]},
                       index=["A", "C", "D", "E"])
    w = np.vstack([SHIFT["A"], SHIFT["C"]])  # effect = e @ w, exactly linear

    def eff(p):
        return emb.loc[p].to_numpy() @ w

    train = _cells({("ctrl", "T"): BASE["T"], **{(p, "T"): BASE["T"] + eff(p) for p in "ACD"}})
    test = _cells({("ctrl", "T"): BASE["T"], ("E", "T"): BASE["T"]})
    model = Linear(embeddings=emb, alpha=1e-8).fit(train, spec)
    pred = model.predict(test, prediction_requests(test, spec))
    e_rows = (pred.obs["cond"] == "E").to_numpy()
    np.testing.assert_allclose(mean_expression(pred.X[e_rows]), BASE["T"] + eff("E"), atol=1e-4)
    assert model.sources["E"] == "user_table"


def test_linear_covariate_slopes_follow_baseline_expression():
    spec = PerturbationSpec("cond", control="ctrl", covariate_keys=["ct"])
    bases = {ct: np.linspace(0, 2, N_GENES) * k + 1 for ct, k in
             (("a", 0.5), ("b", 1.0), ("c", 2.0), ("d", 1.5))}
    resp = {ct: 0.3 + 0.8 * (b - np.mean(list(bases.values())[:3], axis=0)) for ct, b in
            bases.items()}  # response linear in the group's baseline
    groups = {}
    for ct in "abc":
        groups[("ctrl", ct)] = bases[ct]
        groups[("stim", ct)] = bases[ct] + resp[ct]
    train = _cells(groups)
    test = _cells({("ctrl", "d"): bases["d"], ("stim", "d"): bases["d"]})
    req = prediction_requests(test, spec)
    lin = Linear(covariate_penalty=1e-9).fit(train, spec).predict(test, req)
    ms = MeanShift().fit(train, spec).predict(test, req)
    truth = bases["d"] + resp["d"]
    rows = (lin.obs["cond"] == "stim").to_numpy()
    np.testing.assert_allclose(mean_expression(lin.X[rows]), truth, atol=1e-5)
    assert np.abs(mean_expression(ms.X[rows]) - truth).max() > 0.1  # mean shift cannot


def test_gene_pca_embedding_shape():
    adata = _cells({("ctrl", "T"): BASE["T"], ("A", "T"): _shifted("A", "T")}, noise=0.5)
    table = gene_pca_embedding(adata, n_components=3)
    assert table.shape == (N_GENES, 3) and list(table.index) == list(adata.var_names)


# ---------------------------------------------------------------------------- real data
@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small eigen/SVD problems: one BLAS thread avoids oversubscribing busy CI cores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def kang():
    return log_normalize(ad.read_h5ad(shared_data("kang2018_pbmc_ifnb_celltypes.h5ad")))


@pytest.mark.parametrize("cell_type,de20,r2", [("CD14+ Monocytes", 0.573, 0.792),
                                               ("CD4 T cells", 0.898, 0.927),
                                               ("B cells", 0.914, 0.928)])
def test_kang_mean_shift_reproduces_design(kang, cell_type, de20, r2):
    adata = kang
    spec = PerturbationSpec("group_id", control="ctrl", covariate_keys=["cluster_id"])
    m = HeldOutCovariateGroup(spec, key="cluster_id", values=[cell_type]).masks(adata)
    res = evaluate(adata[m.test].copy(), None, spec, train=adata[m.train].copy(),
                   baselines=["mean_shift", "linear"], normalize=False, n_pcs=10, max_cells=100)
    ms = res.summary["mean_shift"]
    assert res.summary["n_conditions"] == 1
    assert ms["pearson_delta_de20"] == pytest.approx(de20, abs=5e-4)
    assert ms["r2_mean"] == pytest.approx(r2, abs=5e-4)
    assert res.summary["linear"]["r2_mean"] > ms["r2_mean"] - 0.02


def test_papalexi_mean_shift_reproduces_design():
    raw = ad.read_h5ad(shared_data("papalexi2021_thp1_crispr_ko.h5ad"))
    adata = log_normalize(raw)
    spec = PerturbationSpec("perturbation", control="control")
    m = HeldOutReplicate(spec, key="bio_rep", values=["rep_3"]).masks(adata)
    labels = spec.labels(adata)
    names, counts = np.unique(labels[m.test], return_counts=True)
    keep = [n for n, c in zip(names, counts) if c >= 40 and n != "control"]
    test = m.test & (np.isin(labels, keep) | spec.control_mask(adata))
    res = evaluate(adata[test].copy(), None, spec, train=adata[m.train].copy(),
                   baselines=["no_change", "mean_shift"], normalize=False)  # 30 PCs, 300 cells
    ms = res.summary["mean_shift"]
    assert res.summary["n_conditions"] == 23
    assert ms["pearson_delta_de20"] == pytest.approx(0.418, abs=5e-4)
    assert ms["pearson_delta_all"] == pytest.approx(0.321, abs=5e-4)
    assert ms["mse_de20"] == pytest.approx(0.109, abs=5e-4)
    # E-distance depends on the drawn cells (seed sd ~0.009): DESIGN 0.299 and 0.622
    assert ms["edistance"] == pytest.approx(0.299, abs=0.015)
    assert res.summary["no_change"]["edistance"] == pytest.approx(0.622, abs=0.015)
