"""`benchmarks/peers.py` pieces that run without the peers' environments: counts drawn from a
count model's means, re-scoring of predictions already on disk, and the tuning rank."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def peers():
    return load_benchmark("peers")


def _normalised(means: np.ndarray) -> np.ndarray:
    return np.log1p(1e4 * means / means.sum(1, keepdims=True)).astype(np.float32)


def test_counts_drawn_recover_the_means_at_each_source_cells_library_size(peers):
    rng = np.random.default_rng(0)
    n, genes = 400, 6
    profile = np.array([0.0, 0.5, 1.0, 2.0, 6.5, 40.0])  # one gene never expressed
    library = rng.integers(50, 2000, n).astype(float)
    counts = rng.poisson(profile * library[:, None] / profile.sum())
    controls = ad.AnnData(np.zeros((n, genes), np.float32), layers={"counts": counts.astype(np.float32)})
    # two conditions: the second doubles gene 3 (CPA's predicted means, normalised by its tutorial)
    effect = profile.copy()
    effect[3] *= 2
    means = np.concatenate([np.tile(profile, (n, 1)), np.tile(effect, (n, 1))])
    obs = pd.DataFrame({"perturbation": ["A"] * n + ["B"] * n}, index=[f"c{i}" for i in range(2 * n)])
    pred = ad.AnnData(_normalised(means), obs=obs)

    drawn = peers.counts_drawn(pred, controls, seed=1)
    raw = drawn.layers["counts"]
    assert drawn.shape == pred.shape and list(drawn.obs["perturbation"]) == list(obs["perturbation"])
    assert np.all(raw[:, 0] == 0)  # a zero mean draws zeros only
    assert np.array_equal(raw, np.round(raw))  # counts
    # per condition, the mean drawn count per unit library is the predicted proportion
    for rows, prof in ((slice(0, n), profile), (slice(n, 2 * n), effect)):
        lib = np.tile(library, 2)[rows]
        rate = raw[rows].sum(0) / lib.sum()
        np.testing.assert_allclose(rate, prof / prof.sum(), rtol=0.1, atol=1e-3)
    # X is the drawn counts normalised like the data; cells now have zeros that the means lacked
    np.testing.assert_allclose(drawn.X, np.log1p(1e4 * raw / np.maximum(raw.sum(1, keepdims=True), 1)), rtol=1e-5)
    assert (drawn.X[:, 1] == 0).sum() > 5 and (pred.X[:, 1] == 0).sum() == 0
    with pytest.raises(ValueError, match="multiple of the 400 control cells"):
        peers.counts_drawn(pred[:401], controls, seed=1)


def test_reuse_takes_the_prediction_on_disk_and_does_not_run_the_peer(peers, tmp_path):
    out = tmp_path / "pred_cpa_rep3_seed2.h5ad"
    ad.AnnData(np.ones((2, 3), np.float32)).write_h5ad(out)
    out.with_suffix(".json").write_text(json.dumps({"seed": 2, "train_s": 5.0, "settings": {"x": 1}}))
    missing = str(tmp_path / "no-such-python")
    path, info = peers.run_peer(missing, "cpa", tmp_path, 2, {}, "rep3", {}, reuse=True)
    assert path == out and info["train_s"] == 5.0 and info["wall_s"] is None
    # another seed's run is not taken for this one: the runner is started (and fails here)
    with pytest.raises(FileNotFoundError):
        peers.run_peer(missing, "cpa", tmp_path, 3, {}, "rep3", {}, reuse=True)


def test_tuning_choice_is_the_best_mean_rank_with_missing_values_last(peers):
    scores = {"a": {"pearson_delta_de20": 0.5, "pearson_delta_all": 0.3, "mse_de20": 0.2, "edistance": 0.4},
              "b": {"pearson_delta_de20": 0.6, "pearson_delta_all": 0.4, "mse_de20": 0.1, "edistance": 0.3},
              "c": {"pearson_delta_de20": None, "pearson_delta_all": 0.9, "mse_de20": 0.3, "edistance": 0.5}}
    best, ranks = peers.choose(scores)
    assert best == "b" and ranks == {"a": 2.25, "b": 1.25, "c": 2.5}
