"""Where generate() starts: distinct bank cells, drawn mostly from the training batches alike to
the batch generated in."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from celldit.cells import CellDiT, registration
from celldit.cells.start_cells import StartCells, batch_weights

G = 12


def _replicates(seed: int = 0) -> AnnData:
    """Replicates r1 (baseline) and r2 (every gene +3): 60 control and 30 P cells each."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(2.0, 3.0, G)
    xs, obs = [], []
    for rep, offset in (("r1", 0.0), ("r2", 3.0)):
        x = mu + offset + 0.3 * rng.standard_normal((90, G))
        x[60:, :3] += 1.0
        xs.append(x)
        obs += [("control", rep)] * 60 + [("P", rep)] * 30
    frame = pd.DataFrame(obs, columns=["perturbation", "rep"], index=[f"c{i}" for i in range(len(obs))])
    return AnnData(np.concatenate(xs).astype(np.float32), obs=frame, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))


def _model(adata: AnnData, fit: bool = False) -> CellDiT:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = CellDiT(adata, pair_keys=["rep"], hidden_size=16, depth=1, num_heads=2, perturbation_features=None)
        if fit:
            model.fit(max_steps=2, batch_size=32, trainer={"progress_bar": False, "logger": None})
    return model


def _rep_of_bank(model: CellDiT, adata: AnnData, rows: np.ndarray) -> np.ndarray:
    return adata.obs.loc[model.bank_obs.index[rows], "rep"].to_numpy()


def test_batch_weights_by_hand():
    means, target = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]), np.zeros(2)
    # squared distances 0, 1, 9 to the target; between batches 1, 9, 4: median 4
    want = np.exp(-np.array([0.0, 1.0, 9.0]) / 4.0)
    np.testing.assert_allclose(batch_weights(means, target), want / want.sum())
    np.testing.assert_allclose(batch_weights(means[:1], target), [1.0])


def test_bank_is_kept_per_batch_with_a_quota_and_a_cap(monkeypatch):
    adata = _replicates()
    monkeypatch.setattr(registration, "BANK_PER_GROUP", 20)
    model = _model(adata)
    reps = _rep_of_bank(model, adata, np.arange(len(model.bank_obs)))
    assert sorted(pd.Series(reps).value_counts().to_dict().items()) == [("r1", 20), ("r2", 20)]
    # bank_batch is each cell's row of control_batches (r1 -> 0, r2 -> 1)
    assert ((reps == "r2") == (model.bank_batch == 1)).all()
    assert (adata.obs.loc[model.bank_obs.index, "perturbation"] == "control").all()
    monkeypatch.setattr(registration, "BANK_MAX", 30)
    assert len(_model(adata).bank_obs) == 30  # 15 a batch


def test_bank_cells_are_distinct_until_the_group_is_used_up():
    adata = _replicates()
    model = _model(adata)
    size = len(model.bank_obs)
    start = StartCells(model, {}, n=size + 10, seed=0)
    first, _ = start.draw(size, need_library=False)
    picks = start.order[:size]
    assert len(np.unique(picks)) == size  # every bank cell once before any repeats
    np.testing.assert_allclose(first.numpy(), (model.bank_x[picks] - start.centre).numpy(), atol=1e-6)
    assert len(start.order) == size + 10
    rest, _ = start.draw(10, need_library=False)
    # a centred model: all the drawn cells together have exactly the batch's mean (0 here) ...
    np.testing.assert_allclose(np.vstack([first.numpy(), rest.numpy()]).mean(0), 0.0, atol=1e-5)
    assert np.abs(start.centre.numpy()).max() > 1e-3  # ... which the raw draws had not
    # ... and one cell is kept as drawn
    one = StartCells(model, {}, n=1, seed=0)
    np.testing.assert_array_equal(one.draw(1, need_library=False)[0].numpy(), model.bank_x[one.order].numpy())
    small = StartCells(model, {}, n=25, seed=1).order
    assert len(np.unique(small)) == 25


def test_generating_in_a_batch_starts_from_the_alike_batch(tmp_path):
    adata = _replicates()
    model = _model(adata, fit=True)
    r2 = adata[(adata.obs["rep"] == "r2") & (adata.obs["perturbation"] == "control")]
    # a first draw comes from each batch with the batch anchors' kernel weight (two batches:
    # exp(-d2 / d2) against 1, i.e. 0.27 / 0.73 for cells of r2); no batch given: 0.5 / 0.5
    want = batch_weights(model.control_batches[0].astype(np.float64), r2.X.mean(0).astype(np.float64))[1]
    assert 0.7 < want < 0.76
    first = [StartCells(model, {}, n=1, seed=s, batch_mean=r2.X.mean(0)).order[0] for s in range(400)]
    assert abs((_rep_of_bank(model, adata, np.array(first)) == "r2").mean() - want) < 0.07
    plain = [StartCells(model, {}, n=1, seed=s).order[0] for s in range(400)]
    assert abs((_rep_of_bank(model, adata, np.array(plain)) == "r2").mean() - 0.5) < 0.07
    # generate(controls=) uses it, and a saved model draws the same cells
    gen = model.generate("P", 40, controls=r2, support="none", seed=3)
    model.save(tmp_path / "m")
    loaded = CellDiT.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.bank_batch, model.bank_batch)
    np.testing.assert_allclose(loaded.generate("P", 40, controls=r2, support="none", seed=3).X, gen.X, atol=1e-6)


def test_a_folder_saved_without_bank_batches_draws_the_bank_alike(tmp_path):
    adata = _replicates()
    model = _model(adata, fit=True)
    model.bank_batch = None  # a folder saved before the bank kept its cells' batches
    model.save(tmp_path / "old")
    old = CellDiT.load(tmp_path / "old")
    assert old.bank_batch is None
    r2 = adata[(adata.obs["rep"] == "r2") & (adata.obs["perturbation"] == "control")]
    first = [StartCells(old, {}, n=1, seed=s, batch_mean=r2.X.mean(0)).order[0] for s in range(400)]
    assert abs((_rep_of_bank(old, adata, np.array(first)) == "r2").mean() - 0.5) < 0.07
    assert old.generate("P", 10, controls=r2, support="none").n_obs == 10


def test_no_bank_cells_of_the_group_is_a_clear_error():
    adata = _replicates()
    adata.obs["cell_type"] = "A"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = CellDiT(adata, covariate_keys=["cell_type"], hidden_size=16, depth=1, num_heads=2,
                        perturbation_features=None)
    with pytest.raises(ValueError, match="no training control cells with cell_type='B'"):
        StartCells(model, {"cell_type": "B"}, n=5)


def test_noise_prior_draws_are_centred_on_the_prior_mean_block_by_block():
    adata = _replicates()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = CellDiT(adata, pair_keys=["rep"], source="noise", hidden_size=16, depth=1, num_heads=2,
                        perturbation_features=None)
    start = StartCells(model, {}, n=50, seed=0)
    block, _ = start.draw(30, need_library=False)
    np.testing.assert_allclose(block.numpy().mean(0), start.prior_mean.numpy(), atol=1e-5)
    assert block.numpy().std(0).min() > 0.05  # still a spread of cells
    last, _ = start.draw(1, need_library=False)  # a block of one cell is kept as drawn
    assert np.abs(last.numpy()[0] - start.prior_mean.numpy()).max() > 1e-3
