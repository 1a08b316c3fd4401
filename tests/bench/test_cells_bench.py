"""Benchmark-script pieces that need no real training: the borrowing-scale rules of
`benchmarks/borrowing_scale.py` and the ``--ema-decay`` flag of `benchmarks/cells.py` (a
3-step fit). Scoring is tested in `test_cell_scoring.py`."""

from __future__ import annotations

import types

import numpy as np
import pytest

from tests.conftest import load_benchmark, make_adata


@pytest.fixture(scope="module")
def cells():
    return load_benchmark("cells")


def _screen(seed: int):
    counts = {"control": 120, "A": 80, "B": 80}
    effects = {"A": {0: 1.5, 1: -1.0}, "B": {2: 2.0}}
    return make_adata(counts, n_genes=10, space="log", effects=effects, sparse=False, seed=seed)


def test_borrowing_scale_rules_for_a_held_out_knockout_follow_the_others_effects():
    """Held out: A. The others (B, C) share one clear effect on gene 0; the unscaled fall-back
    and train_mean both carry it, the scale fitted on two alike anchors is about 1, and no
    change is zero."""
    module = load_benchmark("borrowing_scale")
    counts = {"control": 400, "A": 200, "B": 200, "C": 200}
    effects = {"A": {3: 1.0}, "B": {0: 1.5}, "C": {0: 1.5}}
    train = make_adata(counts, n_genes=10, effects=effects, level=20.0, obs={"bio_rep": ["rep_1", "rep_2"]}, seed=4)
    control_mean = np.zeros(10)
    shifts, scale = module.held_out_shifts(train, control_mean, "A")
    assert 0.9 < scale <= 1.0
    assert np.all(shifts["no_change"] == 0)
    for rule in ("scale_1", "train_mean"):
        assert shifts[rule][0] > 1.0, rule  # log1p of a 4.5x rate: about 1.5 minus the library-size share
        # A's own effect (gene 3) is not known: gene 3 moves as the untouched genes do (their
        # share of the library shrinks as gene 0 grows)
        assert abs(shifts[rule][3] - np.median(shifts[rule][4:])) < 0.1, rule
    np.testing.assert_allclose(shifts["loo_scale"], scale * shifts["scale_1"])
    np.testing.assert_allclose(shifts["scale_1"], shifts["train_mean"], atol=0.15)
    np.testing.assert_array_equal(shifts["on_target"], shifts["scale_1"])  # A, B, C are not gene names


def test_borrowing_scale_on_target_rule_lowers_a_held_out_knockouts_own_gene():
    """Knockouts named after genes g0, g4, g5, g6 each lower their own gene (rate x e^-0.7);
    g0 held out: the on-target rule sets gene 0 at the others' median relative drop times the
    carried cells' level, and leaves every other gene at the unscaled fall-back."""
    module = load_benchmark("borrowing_scale")
    names = ("g0", "g4", "g5", "g6")
    counts = {"control": 400, **dict.fromkeys(names, 150)}
    effects = {n: {int(n[1:]): -0.7} for n in names}
    train = make_adata(counts, n_genes=10, effects=effects, level=20.0, obs={"bio_rep": ["rep_1", "rep_2"]}, seed=5)
    control_mean = np.full(10, 2.0)
    shifts, _ = module.held_out_shifts(train, control_mean, "g0")
    # each gene holds ~1/10 of 1e4 counts: log1p level ~6.9, so a drop of 0.7 is ~10% of it
    assert -0.15 < shifts["on_target"][0] / 2.0 < -0.06
    assert abs(shifts["scale_1"][0]) < 0.1  # the others do not move g0
    np.testing.assert_array_equal(shifts["on_target"][1:], shifts["scale_1"][1:])
    plain, _ = module.held_out_shifts(train, control_mean, "g0", on_target=False)
    np.testing.assert_array_equal(plain["on_target"], plain["scale_1"])


@pytest.mark.parametrize("flag, decay", [(None, 0.999), ("none", None), ("0.5", 0.5)])
def test_ema_decay_flag_reaches_the_fit(cells, flag, decay):
    """``--ema-decay``: absent keeps CellDiT.fit's default, 'none' samples the last weights (and
    ``--no-escapers``, set in the first case, reaches the model)."""
    args = types.SimpleNamespace(anchor_shrinkage="hybrid", tokenizer="module", source="control", no_anchor=False,
                                 no_batch_anchors=False, no_gate_velocity=False, no_on_target=False,
                                 no_escapers=flag is None, hidden_size=16,
                                 depth=1, num_heads=2, cfg_dropout=0.2, covariate_dropout=0.0, group_bandwidth="median",
                                 seed=0, max_steps=3, batch_size=32, lr=1e-3, ema_decay=flag)
    model, timing = cells._train(_screen(0), args, perturbation_key="perturbation", control="control",
                                 perturbation_features=None)
    assert model.plan.ema_decay == decay and (model.plan.ema is None) == (decay is None)
    assert model.config.escapers is (flag is not None)  # --no-escapers reaches the model too
    assert timing["train_s"] > 0


def test_solver_steps_scores_one_saved_model_at_each_setting(tmp_path, capsys):
    """`benchmarks/solver_steps.py` on the bundled screen (its file name is the shared one's):
    one row per setting, the first the reference of the paired differences, and a nearly
    untrained control-source model (its cells are control + anchor) scores alike at 2 and 1 Euler
    steps: the ODE moves them little."""
    import json

    from celldit.cells import CellDiT
    from celldit.data.bundled import BUNDLED_DIR, bundled_papalexi

    module = load_benchmark("solver_steps")
    adata, _ = bundled_papalexi()
    train = adata[(adata.obs["bio_rep"] != "rep_3").to_numpy()]
    train = train[np.random.default_rng(0).permutation(train.n_obs)[:1500]].copy()
    CellDiT(train, perturbation_key="perturbation", control="control", pair_keys=["bio_rep"],
            hidden_size=32, depth=1).fit(max_steps=3, batch_size=64).save(tmp_path / "model")
    assert module.main(["--data", str(BUNDLED_DIR), "--model", str(tmp_path / "model"),
                        "--solvers", "euler:2", "euler:1", "--generate", "--out", str(tmp_path / "steps.json")]) == 0
    result = json.loads((tmp_path / "steps.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert list(result["solvers"]) == ["euler:2", "euler:1"] and result["config"]["cells"] == 666 * 23
    first = result["relative_to_first"]["euler:2"]
    assert all(v == 0 for k, v in {**first, **first["generate"]}.items() if k not in ("sample_time", "generate"))
    assert abs(result["relative_to_first"]["euler:1"]["edistance"]) < 0.01
    assert result["solvers"]["euler:1"]["edistance"] < 0.55  # anchors from 1,500 cells: 0.44; no change 0.63
    # generate (bank cells on rep_3's control mean + anchor) is scored too, and alike at 2 and 1 steps
    assert abs(result["relative_to_first"]["euler:1"]["generate"]["edistance"]) < 0.01
    assert result["solvers"]["euler:1"]["generate"]["edistance"] < 0.55
    for bad in ("euler", "euler:0", "rk45:10"):
        with pytest.raises(SystemExit):
            module.main(["--data", str(BUNDLED_DIR), "--model", str(tmp_path / "model"), "--solvers", bad])
    assert "METHOD one of euler" in capsys.readouterr().err


def test_pooling_fraction_trains_saves_and_scores_each_fraction(tmp_path, capsys):
    """`benchmarks/pooling_fraction.py --train` on the bundled screen (a 2-step model): the model
    is saved, fraction 0 scores as the observed counterfactuals, and the rule that picks the
    largest fraction follows the conditions above no change."""
    import json

    from celldit.cells import CellDiT
    from celldit.data.bundled import BUNDLED_DIR

    module = load_benchmark("pooling_fraction")
    out = tmp_path / "pooling.json"
    assert module.main(["--data", str(BUNDLED_DIR), "--model", str(tmp_path / "model"), "--train", "--max-steps", "2",
                        "--fractions", "1", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert list(result["fractions"]) == ["0.0", "1.0"] and result["config"]["conditions"] == 23
    assert CellDiT.load(tmp_path / "model").config.seed == 0  # saved, and loads
    zero, one = result["fractions"]["0.0"], result["fractions"]["1.0"]
    # the correction moves every condition alike: the mean-level error falls (rep_3 pools with rep_2)
    assert one["mse_de20"] < zero["mse_de20"] and one["pearson_delta_de20"] > zero["pearson_delta_de20"]
    for row in (zero, one):
        assert set(row["not_clear"]["above_no_change_by_0.01"]) <= set(result["config"]["not_clear"])
    # mean shift moved by none of its pooled correction is the plain baseline; moved by all, it gains too
    assert abs(zero["mean_shift_moved"]["pearson_delta_de20"] - result["baselines"]["mean_shift"]["pearson_delta_de20"]) < 1e-3
    assert one["mean_shift_moved"]["mse_de20"] < zero["mean_shift_moved"]["mse_de20"]
    keep = module.largest_fraction_keeping
    assert keep({0.0: ["A"], 0.5: ["A"], 1.0: ["A", "B"]}) == 0.5
    assert keep({0.0: [], 0.25: ["B"], 0.5: []}) == 0.0  # the first new one stops it
    assert keep({0.0: [], 1.0: []}) == 1.0
    with pytest.raises(SystemExit):
        module.main(["--data", str(BUNDLED_DIR), "--model", str(tmp_path / "model"), "--fractions", "1.5"])
    with pytest.raises(SystemExit):
        module.main(["--data", str(BUNDLED_DIR), "--model", str(tmp_path / "model"), "--held-out", "rep_9"])
    assert "not a value of obs['bio_rep']" in capsys.readouterr().err


def test_validation_protocol_holds_out_rep_2_and_scores_there(cells, tmp_path, monkeypatch):
    """``--protocol papalexi_rep2`` (the validation replicate) trains on rep_1 + rep_3 only and
    scores rep_2's cells: each planted knockout's held-out cells are carried from rep_2's
    controls, and the mean-shift baseline recovers the planted shift (pd_de20 near 1)."""
    counts = {"control": 240, "A": 150, "B": 150}
    effects = {"A": {0: 1.5, 1: -1.0}, "B": {2: 2.0, 3: 1.0}}
    screen = make_adata(counts, n_genes=12, effects=effects, level=20.0,
                        obs={"bio_rep": ["rep_1", "rep_2", "rep_3"]}, seed=3)
    screen.write_h5ad(tmp_path / cells.PAPALEXI)
    seen = {}
    real_train = cells._train

    def spy(train, args, **registration):
        seen["reps"] = set(train.obs["bio_rep"].astype(str))
        return real_train(train, args, **registration)

    monkeypatch.setattr(cells, "_train", spy)
    args = cells.build_parser().parse_args(["--data", str(tmp_path), "--protocol", "papalexi_rep2", "--max-steps", "3",
                                            "--batch-size", "32", "--hidden-size", "16", "--depth", "1",
                                            "--num-heads", "2", "--threads", "1"])
    args.tokenizer, args.source = "module", "control"  # main() runs the grid one pair at a time
    out = cells.PROTOCOLS["papalexi_rep2"](args.data, args)
    assert seen["reps"] == {"rep_1", "rep_3"}
    assert out["held_out"] == "rep_2" and out["n_conditions"] == 2
    assert out["cells"] == 2 * 80  # rep_2's 80 control cells, carried to A and B
    assert out["metrics"]["mean_shift"]["pearson_delta_de20"] > 0.9
    assert np.isfinite(out["metrics"]["model"]["edistance"])
