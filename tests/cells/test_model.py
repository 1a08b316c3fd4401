"""CellDiT end to end with tiny models: what is learned, identities, save/load, errors.
(Conditions, covariates and batches: `test_model_covariates.py`; the planted data set is
described in `tests/tiny_cell_models.py`.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from anndata import AnnData
from tiny_cell_models import FIT, N_CTRL, N_P, SHIFTED, build, counterfactual, counts_adata, jiggle, planted_adata

from celldit.cells import CellDiT
from celldit.cells.start_cells import StartCells


@pytest.fixture(scope="module")
def planted() -> AnnData:
    return planted_adata()


@pytest.fixture(scope="module")
def control_model(planted) -> CellDiT:
    """Control source without anchors: the network has to learn the shift (~5 s)."""
    return build(planted, source="control", anchor=False).fit(max_steps=300, lr=2e-3, **FIT)


@pytest.fixture(scope="module")
def noise_model(planted) -> CellDiT:
    """Noise source (~10 s)."""
    return build(planted, source="noise").fit(max_steps=500, lr=4e-3, **dict(FIT, batch_size=256))


# -- what is learned -------------------------------------------------------------------------
def test_control_source_learns_the_planted_bimodal_shift(control_model, planted):
    assert control_model.is_trained and np.isfinite(control_model.history["final_loss"])
    x = planted.X
    truth = x[N_CTRL:].mean(0) - x[:N_CTRL].mean(0)
    out = counterfactual(control_model, planted[:N_CTRL], "P").X
    err = out.mean(0) - x[:N_CTRL].mean(0) - truth
    # the mean of the split follows the fraction of cells sent up (0.51-0.62 over fit seeds 0-2,
    # mean errors 0.03-0.33 on the +1.5 shift); an unsplit flow would err by about 1.5
    assert np.abs(err[SHIFTED]).max() < 0.4, err
    assert np.abs(err[4:]).max() < 0.15, err
    # more than a mean shift: the response is bimodal (true sd ~1.5, a shifted control ~0.3)
    assert out[:, SHIFTED].std(0).min() > 1.0
    high = out[:, SHIFTED].mean(1) > x[:N_CTRL, SHIFTED].mean() + 1.5
    assert 0.35 < high.mean() < 0.65


def test_untrained_anchor_model_is_the_mean_shift(planted):
    # without escapers: every cell gets the whole anchor (with them, see tests/cells/test_escapers.py)
    model = build(planted, source="control", anchor=True, escapers=False)
    ctrl = planted[:N_CTRL]
    shift = planted.X[N_CTRL:].mean(0) - planted.X[:N_CTRL].mean(0)
    np.testing.assert_allclose(model.conditions.anchor((("P",), (1.0,))), shift, atol=1e-5)
    # support="balance": the exact values (the default "discrete" rounds small values at random)
    np.testing.assert_allclose(counterfactual(model, ctrl, "P", support="balance").X, ctrl.X + shift, atol=1e-5)
    gen = model.generate("P", n=50, seed=3, support="none").X  # bank controls + shift
    # the bank is kept centred on the training controls; the 50 drawn cells are moved together
    # onto their mean (see celldit.cells.start_cells)
    start = StartCells(model, {}, n=50, seed=3)
    want = (model.bank_x[start.order] - start.centre).numpy() + model.reference.numpy() + shift
    np.testing.assert_allclose(gen, want, atol=1e-5)
    np.testing.assert_allclose(gen.mean(0), model.reference.numpy() + shift, atol=1e-5)
    # the anchor-free model starts at the identity
    np.testing.assert_array_equal(counterfactual(build(planted, anchor=False), ctrl, "P").X, ctrl.X)


def test_noise_source_generates_the_planted_mean(noise_model, planted):
    truth = planted.X[N_CTRL:].mean(0)
    err = noise_model.generate("P", n=1000, seed=0).X.mean(0) - truth
    assert np.abs(err[SHIFTED]).max() < 0.3, err
    assert np.abs(err[4:]).max() < 0.15, err
    err_ctrl = noise_model.generate("control", n=1000, seed=1).X.mean(0) - planted.X[:N_CTRL].mean(0)
    assert np.abs(err_ctrl).max() < 0.15, err_ctrl
    # a counterfactual inverts the controls to noise, then generates under P
    err_cf = counterfactual(noise_model, planted[:N_CTRL], "P").X.mean(0) - truth
    assert np.abs(err_cf[SHIFTED]).max() < 0.3 and np.abs(err_cf[4:]).max() < 0.15, err_cf


# -- control maps to itself --------------------------------------------------------------------
def test_control_label_is_the_identity_for_the_control_source(control_model, planted):
    ctrl = planted[:N_CTRL]
    guided = jiggle(build(planted, source="control", anchor=True, cfg_dropout=0.1))
    for model in (control_model, guided):
        for cfg in (1.0, 2.5):  # guided too: the unconditional branch of a control label is still 0
            out = counterfactual(model, ctrl, "control", cfg_scale=cfg)
            np.testing.assert_allclose(out.X, ctrl.X, rtol=0, atol=1e-6)
        moved = counterfactual(model, ctrl, "P").X  # while P does move them
        assert np.abs(moved[:, SHIFTED] - ctrl.X[:, SHIFTED]).mean() > 0.5
    more = counterfactual(guided, ctrl, "P", cfg_scale=2.5).X
    assert np.abs(more - counterfactual(guided, ctrl, "P").X).max() > 1e-3  # guidance acts on P


def test_noise_source_inversion_round_trip(noise_model, planted):
    ctrl = planted[:N_CTRL]
    for method, steps in (("rk4", 20), ("heun", 50), (None, None)):  # None: the default solver, Heun 20
        out = counterfactual(noise_model, ctrl, "control", method=method, steps=steps).X
        err = np.abs(out - ctrl.X)
        assert err.mean() < 1e-3 and err.max() < 1e-2, (method, err.mean(), err.max())  # measured ~5e-7, 3e-5
    default = counterfactual(noise_model, ctrl, "P").X
    np.testing.assert_array_equal(default, counterfactual(noise_model, ctrl, "P", method="heun", steps=20).X)
    assert np.abs(default - counterfactual(noise_model, ctrl, "P", method="heun", steps=50).X).max() > 0
    # the field is not trivial: a coarse Euler round trip does not close
    coarse = counterfactual(noise_model, ctrl, "control", method="euler", steps=5).X
    assert np.abs(coarse - ctrl.X).mean() > 0.01


# -- save / load -------------------------------------------------------------------------------
def gene_pert_adata(seed: int = 1) -> AnnData:
    """Planted-like data whose perturbations are genes (so expression priors cover them)."""
    adata = planted_adata(seed)
    labels = np.array(["control"] * N_CTRL + ["g2"] * (N_P // 2) + ["g3"] * (N_P // 2), dtype=object)
    adata.obs["perturbation"] = labels
    return adata


@pytest.mark.parametrize("source", ["control", "noise"])
@pytest.mark.parametrize("tokenizer", ["gene", "module", "latent"])
def test_save_load_round_trip(tmp_path, tokenizer, source):
    adata = gene_pert_adata()
    model = jiggle(build(adata, tokenizer=tokenizer, source=source, perturbation_features="expression",
                         latent_dim=12, token_dim=4))
    assert model.prior_dim > 0
    ctrl = adata[:40]
    kw = {"steps": 4} if source == "noise" else {}
    before = counterfactual(model, ctrl, ["g2", "g7"], **kw)  # g7: a prior-only perturbation
    gen_before = model.generate("g3", n=30, seed=5, **kw)
    if source == "control":  # the weights matter (an untrained network would give control + anchor)
        anchor = model.conditions.anchor((("g2",), (1.0,)))
        assert np.abs(before.X[:40] - (ctrl.X + anchor)).max() > 1e-3
    path = model.save(tmp_path / "model")
    assert {p.name for p in path.iterdir()} >= {"model.safetensors", "config.json", "genes.json", "vocab.json"}
    assert json.loads((path / "genes.json").read_text()) == model.genes
    with pytest.raises(FileExistsError):
        model.save(path)
    loaded = CellDiT.load(path)
    assert loaded.genes == model.genes and loaded.vocab == model.vocab and loaded.space == model.space
    after = counterfactual(loaded, ctrl, ["g2", "g7"], **kw)
    np.testing.assert_allclose(after.X, before.X, rtol=0, atol=1e-6)
    assert after.obs.equals(before.obs)
    np.testing.assert_allclose(loaded.generate("g3", n=30, seed=5, **kw).X, gen_before.X, rtol=0, atol=1e-6)
    assert not np.allclose(model.generate("g3", n=30, seed=6, **kw).X, gen_before.X)  # the seed matters
    model.save(path, overwrite=True)


def test_trained_model_save_load(tmp_path, control_model, planted):
    path = control_model.save(tmp_path / "trained")
    loaded = CellDiT.load(path)
    assert loaded.is_trained and loaded.config.anchor is False
    ctrl = planted[:N_CTRL]
    np.testing.assert_allclose(counterfactual(loaded, ctrl, "P").X, counterfactual(control_model, ctrl, "P").X,
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(loaded.generate("P", n=20, seed=2).X, control_model.generate("P", n=20, seed=2).X)


# -- errors ------------------------------------------------------------------------------------
def test_inputs_are_checked_with_named_errors():
    adata = counts_adata()
    model = build(adata, covariate_keys=["cell_type"], pair_keys=["replicate"])
    ctrl = adata[adata.obs["perturbation"] == "control"]
    with pytest.raises(ValueError, match="'g3'"):
        model.counterfactual(ctrl[:, [g for g in adata.var_names if g != "g3"]], "P")
    with pytest.raises(KeyError, match="'NOPE'"):
        model.counterfactual(ctrl, "NOPE")
    with pytest.raises(KeyError, match="'NOPE'"):
        model.counterfactual(ctrl, "P+NOPE")
    with pytest.raises(KeyError, match="'NOPE'"):
        model.generate({"perturbation": "NOPE", "cell_type": "T"})
    with pytest.raises(ValueError, match="no control cells in the input"):
        model.counterfactual(adata[adata.obs["perturbation"] == "P"], "Q")
    with pytest.raises(KeyError, match="'cell_type'"):
        model.generate("P", n=3)
    with pytest.raises(ValueError, match="'cell_type'"):
        model.counterfactual(AnnData(ctrl.X, var=ctrl.var), "P")  # no covariate column
    bad = ctrl.copy()
    bad.X[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.counterfactual(bad, "P")


@pytest.mark.parametrize("kwargs, match", [
    ({"perturbation_key": "treatment"}, "'treatment'"),
    ({"covariate_keys": ["donor"]}, "'donor'"),
    ({"pair_keys": ["batch"]}, "'batch'"),
    ({"control": "ctrl"}, "'ctrl'"),
])
def test_registration_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(counts_adata(), **kwargs)


def test_registration_needs_control_cells_and_finite_values():
    adata = counts_adata()
    with pytest.raises(ValueError, match="control"):
        build(adata[adata.obs["perturbation"] != "control"].copy())
    bad = adata.copy()
    bad.X[5, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build(bad)


# -- unseen perturbations ----------------------------------------------------------------------
