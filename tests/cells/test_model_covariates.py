"""CellDiT end to end with tiny models: unseen perturbations and their priors, results within
covariates, batches centred and anchored, held-out covariate groups, the minimal command."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from tiny_cell_models import FIT, SHIFTED, TINY, G, build, counterfactual, counts_adata, jiggle, planted_adata

from celldit.cells import CellDiT, CellFitConfig


def test_unseen_perturbation_with_user_prior_features():
    adata = counts_adata()
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.standard_normal((3, 8)), index=["P", "Q", "NEW"])
    model = jiggle(build(adata, covariate_keys=["cell_type"], perturbation_features=table))
    assert model.vocab.perturbations == ["P", "Q", "NEW"] and list(model.vocab.seen_mask) == [True, True, False]
    ctrl = adata[adata.obs["perturbation"] == "control"]
    out = model.counterfactual(ctrl, ["NEW", "P+NEW"])
    assert out.n_obs == 2 * ctrl.n_obs and np.isfinite(out.X).all()
    assert np.abs(out.X[: ctrl.n_obs] - model.counterfactual(ctrl, "control").X).max() > 1e-3  # NEW does something
    with pytest.raises(KeyError, match="'ELSEWHERE'"):
        model.counterfactual(ctrl, "ELSEWHERE")


def test_unseen_perturbation_borrows_the_anchors_of_perturbations_alike():
    """A (+1 on genes 0-3) and B (-1 on genes 4-7) trained; NEW's prior features lie near
    A's. The untrained model's NEW anchor is the kernel mean of A's and B's anchors:
    weights exp(-(d2 - d2_min) / h), h = |f_A - f_B|^2 (median of one pair)."""
    from conftest import make_adata

    adata = make_adata({"control": 200, "A": 150, "B": 150}, 12, space="log", level=3.0, spread=0.2, sparse=False,
                       effects={"A": {g: 1.0 for g in range(4)}, "B": {g: -1.0 for g in range(4, 8)}}, seed=2)
    table = pd.DataFrame([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], index=["A", "B", "NEW"])
    model = build(adata, perturbation_features=table)
    ctrl = adata[adata.obs["perturbation"] == "control"].copy()
    shift = counterfactual(model, ctrl, "NEW", support="none").X.mean(0) - ctrl.X.mean(0)
    d2 = np.array([0.02, 1.62])
    w = np.exp(-(d2 - d2.min()) / 2.0)
    w /= w.sum()
    a, b = (model.conditions.anchors[model.conditions.row(((k,), (1.0,)))] for k in ("A", "B"))
    np.testing.assert_allclose(shift, w[0] * a + w[1] * b, atol=1e-4)
    np.testing.assert_allclose(shift[:4], w[0], atol=0.1)
    np.testing.assert_allclose(shift[4:8], -w[1], atol=0.1)


# -- results -----------------------------------------------------------------------------------
def test_results_anndata_and_anchors_within_covariates():
    adata = counts_adata()
    genes = ["g5", "g1", "g9", "g0"]
    model = build(adata, genes=genes, covariate_keys=["cell_type"], pair_keys=["replicate"], anchor=True,
                  center=False)  # uncentred: the anchor is the plain mean shift (centring: see below)
    assert model.genes == genes and model.space == "log1p_normalized"
    # hand-made anchors: mean(P) - mean(control) per cell type, averaged over cell types
    c = adata.X.astype(np.float64)
    logx = pd.DataFrame(np.log1p(1e4 * c / c.sum(1, keepdims=True)), columns=adata.var_names)[genes].to_numpy()
    lab, ct = adata.obs["perturbation"].to_numpy(), adata.obs["cell_type"].to_numpy()
    anchor = np.mean([logx[(lab == "P") & (ct == t)].mean(0) - logx[(lab == "control") & (ct == t)].mean(0)
                      for t in ("B", "T")], axis=0)
    assert anchor[1] > 1.0  # P raises g1
    # counts in, controls picked by label; support="balance": the exact values (not the default's rounding)
    out = model.counterfactual(adata, ["P", "control"], support="balance")
    ctrl = adata.obs_names[lab == "control"]
    n = len(ctrl)
    assert out.n_obs == 2 * n and list(out.var_names) == genes
    np.testing.assert_allclose(out.X[:n], logx[lab == "control"] + anchor, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.X[n:], logx[lab == "control"], rtol=1e-5, atol=1e-5)
    assert list(out.obs["perturbation"]) == ["P"] * n + ["control"] * n
    assert list(out.obs["celldit_source"]) == list(ctrl) * 2
    assert list(out.obs["cell_type"]) == list(adata.obs.loc[ctrl, "cell_type"]) * 2
    assert out.obs_names.is_unique
    assert out.uns["celldit"]["space"] == "log1p_normalized"
    gen = model.generate({"perturbation": "P", "cell_type": "B"}, n=9, seed=1)
    assert list(gen.var_names) == genes and list(gen.obs["cell_type"]) == ["B"] * 9
    assert list(gen.obs["perturbation"]) == ["P"] * 9
    b_ctrl = logx[(lab == "control") & (ct == "B")]
    dist = np.abs((gen.X - anchor)[:, None, :] - b_ctrl[None]).max(-1).min(1)
    assert dist.max() < 1e-5  # started from B controls
    with pytest.raises(ValueError, match="no training control cells"):
        model.generate({"perturbation": "P", "cell_type": "NK"}, n=2)
    planted = build(planted_adata(), anchor=False)
    res = counterfactual(planted, planted_adata()[:5], "P")
    assert planted.space == "as_given" and res.uns["celldit"]["space"] == "as_given"


def test_batches_are_centred_on_their_own_controls():
    """Two training batches with opposite offsets and a new batch with a third offset: the
    untrained anchored model predicts new-batch controls + the planted shift (the anchor
    is computed on batch-centred cells), and the control label is still the identity."""
    rng = np.random.default_rng(3)
    n, offsets = 60, {"b1": -1.0, "b2": 1.0, "b3": 4.0}
    xs, obs = [], []
    for b, off in offsets.items():
        base = 2.0 + off + 0.2 * rng.standard_normal((2 * n, G))
        base[n:, SHIFTED] += 1.0  # planted shift of P, in every batch
        xs.append(base)
        obs += [("control", b)] * n + [("P", b)] * n
    obs = pd.DataFrame(obs, columns=["perturbation", "batch"], index=[f"c{i}" for i in range(len(obs))])
    adata = AnnData(np.concatenate(xs).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    train, new = adata[obs["batch"] != "b3"].copy(), adata[(obs["batch"] == "b3") & (obs["perturbation"] == "control")].copy()
    # unbalanced batches: P cells of b2 only half kept, so an uncentred mean shift is biased
    keep = ~((train.obs["batch"] == "b2") & (train.obs["perturbation"] == "P")) | (np.arange(train.n_obs) % 2 == 0)
    train = train[keep].copy()
    model = build(train, pair_keys=["batch"])
    assert model.config.center
    out = counterfactual(model, new, ["control", "P"])
    x = new.X
    np.testing.assert_allclose(out.X[: new.n_obs], x, atol=1e-5)
    shift = out.X[new.n_obs:].mean(0) - x.mean(0)
    np.testing.assert_allclose(shift[SHIFTED], 1.0, atol=0.1)
    assert np.abs(shift[4:]).max() < 0.1
    uncentred = build(train, pair_keys=["batch"], center=False, batch_anchors=False)
    biased = counterfactual(uncentred, new, "P").X.mean(0) - x.mean(0)
    assert np.abs(biased[4:]).max() > 0.3  # the batch offset leaks into a pooled shift without centring
    # each batch's own shift is taken within the batch: no leak even uncentred
    within = build(train, pair_keys=["batch"], center=False)
    shift = counterfactual(within, new, "P").X.mean(0) - x.mean(0)
    assert np.abs(shift[4:]).max() < 0.1


def test_batch_anchors_weigh_the_batches_alike_to_the_new_one():
    """Batch b1 (offset -1) responds to P by +0.5, b2 (offset +1) by +1.5. A new batch at
    offset +1.1 resembles b2: its anchor weighs b2's shift by the kernel
    exp(-(d2 - d2_min) / h) (h = d2(b1, b2)); without batch anchors it is the plain mean (1.0).
    In training, each block starts from its own batch's shift."""
    rng = np.random.default_rng(5)
    n, batches = 80, {"b1": (-1.0, 0.5), "b2": (1.0, 1.5), "b3": (1.1, 0.0)}
    xs, obs = [], []
    for b, (off, effect) in batches.items():
        base = 2.0 + off + 0.05 * rng.standard_normal((2 * n, G))
        base[n:, SHIFTED] += effect
        xs.append(base)
        obs += [("control", b)] * n + [("P", b)] * n
    obs = pd.DataFrame(obs, columns=["perturbation", "batch"], index=[f"c{i}" for i in range(len(obs))])
    adata = AnnData(np.concatenate(xs).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    train = adata[obs["batch"] != "b3"].copy()
    new = adata[((obs["batch"] == "b3") & (obs["perturbation"] == "control")).to_numpy()].copy()
    d2 = np.array([(2.1 ** 2) * G, (0.1 ** 2) * G])  # new batch to b1, b2 (mean control cells)
    w = np.exp(-(d2 - d2.min()) / (4.0 * G))
    want = (w @ [0.5, 1.5]) / w.sum()
    model = build(train, pair_keys=["batch"])
    shift = counterfactual(model, new, "P").X.mean(0) - new.X.mean(0)
    np.testing.assert_allclose(shift[SHIFTED], want, atol=0.03)
    noise = build(train, pair_keys=["batch"], source="noise")  # the noise prior keeps one anchor per condition
    assert not noise.config.batch_anchored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        noise.fit(max_steps=2, batch_size=32, trainer={"progress_bar": False, "logger": None})
    plain = build(train, pair_keys=["batch"], batch_anchors=False)
    shift = counterfactual(plain, new, "P").X.mean(0) - new.X.mean(0)
    np.testing.assert_allclose(shift[SHIFTED], 1.0, atol=0.03)
    # training blocks start from their own batch's shift: source - matching control = its shift
    train_batches, _ = model._batches(CellFitConfig(batch_size=64, block_size=16, max_steps=2), 0)
    own = {group: model.conditions.group_shifts[(cond, group)] for (cond, group), _ in train_batches.strata}
    assert sorted(round(float(v[SHIFTED].mean()), 1) for v in own.values()) == [0.5, 1.5]
    for i, ((_cond, group), _) in enumerate(train_batches.strata):
        np.testing.assert_array_equal(train_batches.own_anchor[i], own[group])


def test_norman_unseen_combination_generates_end_to_end():
    """Norman toy (GEARS labels, per-part doses "1+1"): train without one combination whose
    singles are seen; its counterfactual starts from the sum of the singles' anchors and
    comes out finite, labelled, with the training genes."""
    import anndata as ad
    from conftest import shared_data

    adata = ad.read_h5ad(shared_data("norman2019_toy_combos.h5ad"))
    combo = "MAP2K6+ELMSAN1"
    labels = adata.obs["condition"].astype(str)
    train = adata[labels != combo].copy()
    model = CellDiT(train, perturbation_key="condition", control="ctrl", dose_key="dose_val",
                    perturbation_features=None, **TINY)
    assert ("ELMSAN1",) in [k[0] for k in model.conditions.keys]
    assert ("ELMSAN1", "MAP2K6") not in [k[0] for k in model.conditions.keys]
    ctrl = adata[labels == "ctrl"].copy()
    # untrained: control + additive anchor (compared before clipping at 0: layers['flow'])
    before = model.counterfactual(ctrl, combo, raw_layer=True).layers["flow"]
    single = model.counterfactual(ctrl, ["MAP2K6+ctrl", "ctrl+ELMSAN1"], raw_layer=True).layers["flow"]
    base = model.counterfactual(ctrl, "ctrl", raw_layer=True).layers["flow"]
    n = ctrl.n_obs
    additive = base + (single[:n] - base) + (single[n:] - base)
    np.testing.assert_allclose(before, additive, atol=1e-5)
    model.fit(max_steps=20, **FIT)
    after = model.counterfactual(ctrl, combo)
    assert np.isfinite(after.X).all() and list(after.var_names) == list(adata.var_names)
    assert set(after.obs["condition"]) == {combo}
    assert list(after.obs["celldit_source"]) == list(ctrl.obs_names)


def test_untrained_covariate_pairs_use_the_unknown_token():
    """P is trained only in cell type B: asked in T it gets the unknown covariate code (the
    row covariate dropout trains), in B its own code; dropout hides codes in training batches."""
    adata = counts_adata()
    keep = ~((adata.obs["perturbation"] == "P") & (adata.obs["cell_type"] == "T")).to_numpy()
    model = build(adata[keep].copy(), covariate_keys=["cell_type"], covariate_dropout=0.5)
    cov = pd.DataFrame({"cell_type": ["B", "T"]})
    codes = model.vocab.encode_covariates(cov)
    unknown = len(model.vocab.covariates["cell_type"])
    assert codes[:, 0].tolist() == [0, 1]
    assert model.sampler.rules.covariate_codes("P", None, cov, codes)[:, 0].tolist() == [0, unknown]
    assert model.sampler.rules.covariate_codes("Q", None, cov, codes)[:, 0].tolist() == [0, 1]  # Q was trained in both
    # training hides the codes of about half the blocks, behind the unknown row
    train, _ = model._batches(CellFitConfig(max_steps=40, batch_size=128, block_size=16), 0)
    codes_seen = np.concatenate([b["cov_idx"].numpy()[:, 0] for b in train])
    assert 0.35 < (codes_seen == unknown).mean() < 0.65 and set(codes_seen) == {0, 1, unknown}
    nodrop = build(adata[keep].copy(), covariate_keys=["cell_type"], covariate_dropout=0.0)
    assert nodrop.sampler.rules.covariate_codes("P", None, cov, codes)[:, 0].tolist() == [0, 1]


def test_held_out_cell_type_borrows_from_types_alike_at_baseline(tmp_path):
    """P raises genes 0-3 in three alike cell types (A1-A3) and genes 4-7 in a far type B.
    Held out in A3, the untrained model starts A3 controls from the group-weighted anchor:
    mostly the A types' shift (the plain mean-shift would give +1.5 on genes 0-3 and +0.5 on
    4-7); the saved model does the same."""
    rng = np.random.default_rng(0)
    base = {"A1": 2.0, "A2": 2.1, "A3": 1.9, "B": 6.0}
    x, obs = [], []
    for t, level in base.items():
        for lab in ("control", "P"):
            if t == "A3" and lab == "P":
                continue
            cells = level + 0.1 * rng.standard_normal((60, 12))
            if lab == "P":
                cells[:, :4 if t != "B" else 8] += 2.0 if t != "B" else 0.0
                if t == "B":
                    cells[:, 4:8] += 2.0
            x.append(cells)
            obs += [(lab, t)] * 60
    adata = AnnData(np.concatenate(x).astype(np.float32),
                    obs=pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"c{i}" for i in range(len(obs))]))
    model = build(adata, covariate_keys=["cell_type"], genes="all")
    a3 = adata[(adata.obs["cell_type"] == "A3").to_numpy() & (adata.obs["perturbation"] == "control").to_numpy()]
    shift = counterfactual(model, a3, "P").X.mean(0) - a3.X.mean(0)
    assert shift[:4].min() > 1.7 and np.abs(shift[4:8]).max() < 0.3, shift
    np.testing.assert_allclose(shift[8:], 0.0, atol=0.05)
    # a type trained with P keeps its own-covariate (plain) anchor
    a1 = adata[(adata.obs["cell_type"] == "A1").to_numpy() & (adata.obs["perturbation"] == "control").to_numpy()]
    plain = np.broadcast_to(model.conditions.anchors[1], a1.shape)  # +1.33 on genes 0-3, +0.67 on 4-7
    np.testing.assert_allclose(counterfactual(model, a1, "P", support="balance").X - a1.X, plain, atol=1e-5)
    model.save(tmp_path / "m")
    again = CellDiT.load(tmp_path / "m")
    np.testing.assert_allclose(counterfactual(again, a3, "P").X, counterfactual(model, a3, "P").X, atol=1e-6)


def test_without_pair_keys_new_cells_are_centred_and_a_batch_column_is_named():
    """No pair_keys and no covariates: the training cells are centred on their controls and a
    new batch on its own, so a batch offset does not leak into the prediction; a column that
    splits the controls into clearly different groups gets a warning naming the flag."""
    rng = np.random.default_rng(5)
    n = 80
    xs, obs = [], []
    for b, off in {"b1": -1.0, "b2": 1.0}.items():
        base = 2.0 + off + 0.2 * rng.standard_normal((2 * n, G))
        base[n:, SHIFTED] += 1.0
        xs.append(base)
        obs += [("control", b)] * n + [("P", b)] * n
    obs = pd.DataFrame(obs, columns=["perturbation", "batch"], index=[f"c{i}" for i in range(len(obs))])
    train = AnnData(np.concatenate(xs).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    with pytest.warns(UserWarning, match=r"'batch'.*--pair-keys batch"):
        model = CellDiT(train, input_space="log1p", perturbation_features=None, **TINY)
    assert model.config.centred and not model.config.pair_keys
    new = AnnData((5.0 + 0.2 * rng.standard_normal((n, G))).astype(np.float32), var=train.var)
    out = model.counterfactual(new, ["control", "P"], input_space="log1p")
    np.testing.assert_allclose(out.X[:n], new.X, atol=1e-5)
    shift = out.X[n:].mean(0) - new.X.mean(0)
    np.testing.assert_allclose(shift[SHIFTED], 1.0, atol=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a column that does not split the controls: no warning
        CellDiT(train[train.obs["batch"] == "b1"].copy(), input_space="log1p", perturbation_features=None, **TINY)
