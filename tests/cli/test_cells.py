"""`celldit fit`, `counterfactual`, `generate` and `demo`: files, values and the errors that name the problem.

A small synthetic screen (3 knockouts + control, 2 replicates, 40 genes, Poisson counts
with planted effects) and tiny models (5 steps, width 32, one block); the demo test runs
`demo --quick` on the bundled Papalexi data (the one slower test, about 20 s).
"""

from __future__ import annotations

import json
import shlex

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CONFIGS, make_adata

from celldit.cells import CellDiT
from celldit.cells.effects import evidence_summary
from celldit.cli import main
from celldit.cli.fit import build_parser
from celldit.data.expression import log_normalize

N_GENES = 40
CELLS = 40  # per label and replicate
LABELS = ("ctrl", "KO1", "KO2", "KO3")
# KO1 multiplies the rate of genes 0-4 by 4, KO2 divides genes 5-9 by 4, KO3 multiplies genes 10-14
EFFECTS = {"KO1": dict.fromkeys(range(0, 5), np.log(4.0)), "KO2": dict.fromkeys(range(5, 10), -np.log(4.0)),
           "KO3": dict.fromkeys(range(10, 15), np.log(4.0))}
TINY = ["--max-steps", "5", "--hidden-size", "32", "--depth", "1", "--batch-size", "32", "--threads", "1"]


def _screen(seed: int = 0):
    """Raw counts (rate 6), the planted effects, replicates r1 and r2 (CELLS per label each)."""
    labels = [lab for lab in LABELS for _ in range(2 * CELLS)]
    return make_adata(labels, N_GENES, effects=EFFECTS, level=6.0, obs={"rep": ["r1"] * CELLS + ["r2"] * CELLS},
                      gene_prefix="gene", seed=seed)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The screen, its r2 cells (inputs of counterfactuals) and a model trained without KO3."""
    d = tmp_path_factory.mktemp("cli_cells")
    screen = _screen()
    paths = {"dir": d, "data": d / "screen.h5ad", "r2": d / "r2.h5ad", "model": d / "model"}
    screen.write_h5ad(paths["data"])
    screen[screen.obs["rep"] == "r2"].copy().write_h5ad(paths["r2"])
    code = main(["fit", str(paths["data"]), "--perturbation-key", "perturbation", "--control", "ctrl",
                 "--pair-keys", "rep", "--holdout", "perturbation=KO3", "--tokenizer", "gene",
                 *TINY, "--out", str(paths["model"])])
    assert code == 0
    return paths


# ---------------------------------------------------------------------------------- fit
def test_fit_writes_a_loadable_model_and_what_was_held_out(files):
    model = CellDiT.load(files["model"])
    assert model.genes == [f"gene{i}" for i in range(N_GENES)]
    assert model.history["steps"] == 5 and np.isfinite(model.history["final_loss"])
    assert model.vocab.seen == ["KO1", "KO2"]  # KO3 was held out
    assert "KO3" not in model.vocab.seen
    record = json.loads((files["model"] / "holdout.json").read_text())
    assert record["holdout"] == [{"perturbation": "KO3"}]
    assert record["labels_not_trained"] == ["KO3"]
    assert record["n_held_out"] == 2 * CELLS and record["n_train"] == 6 * CELLS
    assert record["split"]["kind"] == "held_out_perturbations"
    assert record["split"]["perturbations"] == ["KO3"]


def test_fit_backed_prints_a_summary(files, capsys, tmp_path):
    code, out, _ = _run(["fit", files["data"], "--perturbation-key", "perturbation", "--control", "ctrl",
                         "--holdout", "rep=r2", "perturbation=KO1", "--backed", *TINY, "--out", tmp_path / "m"],
                        capsys)
    assert code == 0
    # r2 (160 cells) and r1's KO1 cells (40) are held out
    assert f"trained on {8 * CELLS - 5 * CELLS} cells x {N_GENES} genes ({5 * CELLS} held out)" in out
    assert "2 perturbed conditions + control, 5 steps, final loss" in out
    effects = pd.read_csv(tmp_path / "m" / "effects.csv", index_col=0)  # the evidence line and its table
    assert sorted(effects.index) == ["KO2", "KO3"]
    assert f"evidence of an effect per condition: {evidence_summary(effects)} ({tmp_path / 'm' / 'effects.csv'})" in out
    record = json.loads((tmp_path / "m" / "holdout.json").read_text())
    assert record["holdout"] == [{"rep": "r2"}, {"perturbation": "KO1"}] and record["split"] is None
    assert CellDiT.load(tmp_path / "m").vocab.seen == ["KO2", "KO3"]


def test_fit_on_a_zarr_store_on_disk_equals_the_h5ad_in_memory(files, capsys, tmp_path):
    ad.read_h5ad(files["data"]).write_zarr(tmp_path / "screen.zarr")
    args = ["--perturbation-key", "perturbation", "--control", "ctrl", "--holdout", "rep=r2", *TINY]
    assert _run(["fit", tmp_path / "screen.zarr", "--backed", *args, "--out", tmp_path / "z"], capsys)[0] == 0
    assert _run(["fit", files["data"], *args, "--out", tmp_path / "h"], capsys)[0] == 0
    z, h = CellDiT.load(tmp_path / "z"), CellDiT.load(tmp_path / "h")
    for key, value in h.network.state_dict().items():
        np.testing.assert_array_equal(z.network.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    code, _, err = _run(["fit", tmp_path / "nothing.zarr", *args, "--out", tmp_path / "n"], capsys)
    assert code == 2 and "nothing.zarr" in err and "does not exist" in err


def test_fit_holdout_rule_with_two_keys(files, capsys, tmp_path):
    code, out, _ = _run(["fit", files["data"], "--perturbation-key", "perturbation", "--control", "ctrl",
                         "--holdout", "rep=r2&perturbation=KO1", *TINY, "--out", tmp_path / "m"], capsys)
    assert code == 0
    assert f"({CELLS} held out)" in out
    assert CellDiT.load(tmp_path / "m").vocab.seen == ["KO1", "KO2", "KO3"]  # r1 still has KO1


def test_fit_refuses_an_existing_out(files, capsys):
    before = sorted(p.name for p in files["model"].iterdir())
    code, _, err = _run(["fit", files["data"], "--perturbation-key", "perturbation", "--control", "ctrl",
                         *TINY, "--out", files["model"]], capsys)
    assert code == 2 and "already exists" in err and str(files["model"]) in err
    assert sorted(p.name for p in files["model"].iterdir()) == before


@pytest.mark.parametrize("flags, name", [
    (["--perturbation-key", "guide"], "'guide'"),
    (["--perturbation-key", "perturbation", "--pair-keys", "batch"], "'batch'"),
    (["--perturbation-key", "perturbation", "--holdout", "donor=d1"], "'donor'"),
    (["--perturbation-key", "perturbation", "--holdout", "perturbation=KO9"], "'KO9'"),
])
def test_fit_names_a_missing_obs_key_or_value(files, capsys, tmp_path, flags, name):
    code, _, err = _run(["fit", files["data"], *flags, "--control", "ctrl", *TINY, "--out", tmp_path / "m"], capsys)
    assert code == 2
    assert err.startswith("celldit fit: error:") and name in err
    assert not (tmp_path / "m").exists()


def test_fit_config_values_flags_override_and_unknown_keys(files, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": str(files["data"]), "perturbation_key": "perturbation",
                                      "control": "ctrl", "pair_keys": ["rep"], "tokenizer": "gene",
                                      "max_steps": 4, "hidden_size": 32, "depth": 1, "batch_size": 32,
                                      "holdout": {"perturbation": ["KO2", "KO3"]}}))
    code, _, _ = _run(["fit", "--config", config, "--max-steps", "3", "--out", tmp_path / "m"], capsys)
    assert code == 0
    model = CellDiT.load(tmp_path / "m")
    assert model.history["steps"] == 3  # the flag beats the file
    assert model.vocab.seen == ["KO1"] and model.config.hidden_size == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("perturbation_key: perturbation\ncontrol: ctrl\nmax_step: 5\nhidden: 3\n")
    code, _, err = _run(["fit", files["data"], "--config", bad, "--out", tmp_path / "m2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "max_step" in err
    code, _, err = _run(["fit", files["data"], "--control", "ctrl", "--max-steps", "0", "--out", tmp_path / "m3"],
                        capsys)
    assert code == 2 and "max_steps=0: must be >= 1" in err and not (tmp_path / "m3").exists()


# ------------------------------------------------------------------------ counterfactual
def test_counterfactual_all_labels_sources_genes_and_effects(files, capsys):
    out = files["dir"] / "cf_all.h5ad"
    code, stdout, _ = _run(["counterfactual", files["model"], "--input", files["r2"], "--all", "--out", out], capsys)
    assert code == 0 and f"{2 * CELLS} cells ({CELLS} control cells x 2 perturbation(s))" in stdout
    pred = ad.read_h5ad(out)
    real = ad.read_h5ad(files["r2"])
    controls = real.obs_names[real.obs["perturbation"] == "ctrl"].tolist()
    assert sorted(pred.obs["perturbation"].unique()) == ["KO1", "KO2"]  # every trained label, no control
    assert pred.obs["perturbation"].value_counts().to_dict() == {"KO1": CELLS, "KO2": CELLS}
    for label in ("KO1", "KO2"):
        assert pred.obs.loc[pred.obs["perturbation"] == label, "celldit_source"].tolist() == controls
    assert pred.var_names.tolist() == CellDiT.load(files["model"]).genes
    # the planted effects: KO1 raises genes 0-4 (x4, ~ +1 in log space, the other genes dip
    # by normalisation), KO2 lowers genes 5-9; the predicted shifts follow the real r2 ones
    norm = log_normalize(real)

    def mean(adata, label):
        return np.asarray(adata[adata.obs["perturbation"] == label].X.mean(0)).ravel()

    ctrl = mean(norm, "ctrl")
    for label, genes, sign in (("KO1", slice(0, 5), 1), ("KO2", slice(5, 10), -1)):
        predicted, observed = mean(pred, label) - ctrl, mean(norm, label) - ctrl
        assert (sign * predicted[genes]).min() > 0.8
        assert np.corrcoef(predicted, observed)[0, 1] > 0.95
        assert np.abs(predicted - observed).mean() < 0.15


def test_counterfactual_of_the_control_label_is_the_input(files, capsys):
    out = files["dir"] / "cf_ctrl.h5ad"
    code, _, _ = _run(["counterfactual", files["model"], "--input", files["r2"], "--perturbation", "ctrl",
                       "--out", out], capsys)
    assert code == 0
    pred = ad.read_h5ad(out)
    real = ad.read_h5ad(files["r2"])
    expected = log_normalize(real[real.obs["perturbation"] == "ctrl"].copy())
    assert pred.obs["celldit_source"].tolist() == expected.obs_names.tolist()
    np.testing.assert_allclose(np.asarray(pred.X), expected.X.toarray(), rtol=0, atol=1e-6)  # float32 rounding


def test_counterfactual_pooled_control_mean_moves_every_cell_alike(files, capsys):
    paths = {how: files["dir"] / f"cf_{how}.h5ad" for how in ("observed", "pooled")}
    for how, out in paths.items():
        code, _, _ = _run(["counterfactual", files["model"], "--input", files["r2"], "--perturbation", "KO1",
                           "--support", "none", "--control-mean", how, "--out", out], capsys)
        assert code == 0
    moved = np.asarray(ad.read_h5ad(paths["pooled"]).X) - np.asarray(ad.read_h5ad(paths["observed"]).X)
    np.testing.assert_allclose(moved, np.broadcast_to(moved[0], moved.shape), atol=1e-5)  # one vector per batch
    assert np.abs(moved[0]).max() > 1e-3
    quarter = files["dir"] / "cf_pooled_quarter.h5ad"
    code, _, _ = _run(["counterfactual", files["model"], "--input", files["r2"], "--perturbation", "KO1",
                       "--support", "none", "--control-mean", "pooled", "--pooling", "0.25", "--out", quarter], capsys)
    assert code == 0
    part = ad.read_h5ad(quarter)
    from celldit.cells.control_mean import DEFAULT_POOLING
    from celldit.cli.counterfactual import DEFAULT_POOLING as CLI_DEFAULT

    assert CLI_DEFAULT == DEFAULT_POOLING  # the CLI's copy (it does not import torch to parse)
    # `moved` took the default fraction of the correction; this one a quarter of the whole
    np.testing.assert_allclose(np.asarray(part.X) - np.asarray(ad.read_h5ad(paths["observed"]).X),
                               0.25 / DEFAULT_POOLING * moved, atol=1e-5)
    assert part.uns["celldit"]["pooling"] == 0.25


def test_counterfactual_errors(files, capsys):
    out = files["dir"] / "cf_bad.h5ad"
    code, _, err = _run(["counterfactual", files["model"], "--input", files["r2"], "--perturbation", "KO1",
                         "NOPE", "--out", out], capsys)
    assert code == 2 and err.startswith("celldit counterfactual: error:") and "'NOPE'" in err
    assert not out.exists()
    code, _, err = _run(["counterfactual", files["model"], "--input", files["r2"], "--perturbation", "KO3",
                         "--out", out], capsys)  # held out, and this model has no prior features for it
    assert code == 2 and "'KO3'" in err
    existing = files["dir"] / "exists.h5ad"
    existing.write_text("keep")
    code, _, err = _run(["counterfactual", files["model"], "--input", files["r2"], "--all", "--out", existing],
                        capsys)
    assert code == 2 and "already exists" in err and existing.read_text() == "keep"
    code, _, err = _run(["counterfactual", files["model"], "--input", files["dir"] / "missing.h5ad", "--all",
                         "--out", out], capsys)
    assert code == 2 and "missing.h5ad" in err
    assert not list(files["dir"].glob(".*tmp*"))  # no temporary file left behind


# ------------------------------------------------------------------------------ generate
def test_generate_writes_n_cells_under_the_condition(files, capsys):
    out = files["dir"] / "gen.h5ad"
    code, stdout, _ = _run(["generate", files["model"], "--condition", "perturbation=KO1", "--n", "7",
                            "--seed", "3", "--out", out], capsys)
    assert code == 0 and "wrote 7 cells" in stdout
    cells = ad.read_h5ad(out)
    assert cells.shape == (7, N_GENES) and (cells.obs["perturbation"] == "KO1").all()
    norm = log_normalize(ad.read_h5ad(files["data"]))
    ctrl_mean = np.asarray(norm[norm.obs["perturbation"] == "ctrl"].X.mean(0)).ravel()
    assert (np.asarray(cells.X).mean(0) - ctrl_mean)[:5].mean() > 0.8  # KO1's planted rise
    code, _, err = _run(["generate", files["model"], "--condition", "perturbation=KO1", "donor=d1", "--n", "3",
                         "--out", files["dir"] / "gen2.h5ad"], capsys)
    assert code == 2 and "'donor'" in err


# --------------------------------------------------------------------------------- demo
def test_demo_settings_match_the_config_and_configs_load():
    from celldit.cells.demo import DEMO_SETTINGS

    parser = build_parser()
    demo = parser.parse_args(["--config", str(CONFIGS / "papalexi_rep3.yaml")]).as_dict()
    defaults = parser.get_defaults().as_dict()
    changed = {k for k, v in demo.items() if k != "config" and v != defaults[k]}
    assert changed <= set(DEMO_SETTINGS)  # the file sets what the demo sets, and nothing else
    for key, value in DEMO_SETTINGS.items():
        assert demo[key] == value or [demo[key]] == value, key
    for name in ("papalexi_rep3.yaml", "kang_celltype.yaml", "norman_toy.yaml"):
        cfg = parser.parse_args(["--config", str(CONFIGS / name)])
        assert cfg.perturbation_key and cfg.control


@pytest.mark.slow
@pytest.mark.timeout(120)  # the one slower test of this file (about 20 s on 2 CPU cores)
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = _run(["demo", "--quick", "--out", out, "--no-progress-bar"], capsys)
    assert code == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {"model", "no_change", "train_mean", "mean_shift", "linear"} <= set(summary)
    assert summary["n_conditions"] == 23  # rep_3 perturbations with >= 40 cells
    # the control-source flow starts at control + mean shift: even 20 steps track the effects
    assert summary["model"]["pearson_delta_de20"] > 0.2
    assert summary["model"]["mse_de20"] < summary["no_change"]["mse_de20"]
    model = CellDiT.load(out / "model")
    record = json.loads((out / "model" / "holdout.json").read_text())
    assert record["holdout"] == [{"bio_rep": "rep_3"}] and record["n_held_out"] == 5300
    pred = ad.read_h5ad(out / "counterfactuals.h5ad")
    assert pred.n_obs == 150 * 23 and pred.var_names.tolist() == model.genes
    assert json.loads((out / "split.json").read_text())["kind"] == "held_out_replicate"
    figures = out / "report" / "figures"  # every figure but the UMAP (left to `celldit evaluate`)
    assert (figures / "pca_real_vs_pred.png").stat().st_size > 0 and not (figures / "umap.png").exists()
    assert "mean_shift" in stdout and "report:" in stdout and "wall time" in stdout
    assert "[celldit demo] train done in" in err
    # the printed `celldit evaluate` command (for the UMAP the demo leaves out) scores the same cells alike
    umap_line = next(line for line in stdout.splitlines() if line.startswith("UMAP of real and predicted cells: "))
    command = shlex.split(umap_line.split(": ", 1)[1])
    assert command[:2] == ["celldit", "evaluate"] and command[-1] == str(out / "report_umap")
    code, _, err = _run([*command[1:], "--no-figures", "--no-cell-eval"], capsys)
    assert code == 0, err
    again = json.loads((out / "report_umap" / "summary.json").read_text())
    assert again["n_conditions"] == 23
    for metric in ("pearson_delta_de20", "mse_de20"):  # gene-level: the same real and predicted cells
        assert again["model"][metric] == pytest.approx(summary["model"][metric], abs=1e-9)
    # (a quick demo fits its PCA space and baselines on a subsample of the training cells, the
    # printed command on all of them: the full demo's E-distance is reproduced exactly, 0.2719)
    code, _, err = _run(["demo", "--quick", "--out", out], capsys)
    assert code == 2 and "not empty" in err
