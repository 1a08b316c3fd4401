"""`celldit evaluate`: files, formats and the errors that name the problem."""

from __future__ import annotations

import argparse
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from conftest import make_adata

from celldit.cli import evaluate as evaluate_cli
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutReplicate
from celldit.eval.scoring import CORE_METRICS

N_GENES = 30
SHIFTS = {"ctrl": 0, "KO1": 3, "KO2": -2}


def _counts(seed: int, n: int = 40, reps=("r1", "r2")) -> AnnData:
    """Raw counts (rate 4): each knockout moves genes 0-4 (KO1 to rate 7, KO2 to rate 2); replicates."""
    effects = {label: dict.fromkeys(range(5), np.log(max(4.0 + shift, 0.5) / 4.0)) for label, shift in SHIFTS.items()}
    labels = [label for label in SHIFTS for _ in range(n * len(reps))]
    rep = [r for r in reps for _ in range(n)]
    return make_adata(labels, N_GENES, effects=effects, obs={"rep": rep}, gene_prefix="gene", seed=seed)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    full = _counts(0)
    real = full[full.obs["rep"] == "r2"].copy()
    train = full[full.obs["rep"] == "r1"].copy()
    pred = _counts(1, n=25, reps=("r2",))
    pred = pred[pred.obs["perturbation"] != "ctrl"].copy()
    paths = {k: d / f"{k}.h5ad" for k in ("full", "real", "train", "pred")}
    for k, a in (("full", full), ("real", real), ("train", train), ("pred", pred)):
        a.write_h5ad(paths[k])
    split = HeldOutReplicate(PerturbationSpec("perturbation", "ctrl"), key="rep", values=["r2"])
    paths["split"] = split.save(d / "split.json")
    paths["dir"] = d
    return paths


def _run(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    evaluate_cli.add_parser(sub)
    args = parser.parse_args(["evaluate", *map(str, argv)])
    return args.func(args)


def _base(files, out, **kw):
    argv = ["--real", kw.get("real", files["real"]), "--pred", kw.get("pred", files["pred"]),
            "--perturbation-key", kw.get("key", "perturbation"),
            "--control", kw.get("control", "ctrl"), "--out", out]
    return argv + kw.get("extra", ["--train", files["train"]])


def test_evaluate_writes_every_file(files, tmp_path, capsys):
    out = tmp_path / "report"
    assert _run(_base(files, out)) == 0
    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns[:9]) == ["condition", "method", *CORE_METRICS]
    assert set(table["method"]) == {"model", "no_change", "train_mean", "mean_shift", "linear"}
    assert sorted(set(table["condition"])) == ["KO1", "KO2"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_conditions"] == 2
    for method in ("model", "mean_shift"):
        assert set(CORE_METRICS) <= set(summary[method])
        assert summary[method]["pearson_delta_de20"] == pytest.approx(
            table[table["method"] == method]["pearson_delta_de20"].mean())
    # the model's cells come from the same generative process: strong agreement
    assert summary["model"]["pearson_delta_all"] > 0.8
    assert summary["no_change"]["pearson_delta_all"] is None  # undefined for a zero delta
    for name in ("report.md", "settings.json", "figures/metrics_by_condition.png",
                 "figures/pca_real_vs_pred.png", "figures/delta_scatter.png", "figures/umap.png", "cell_eval/real.h5ad",
                 "cell_eval/pred_model.h5ad", "cell_eval/README.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "figures/pca_real_vs_pred.png").read_bytes()[:4] == b"\x89PNG"
    exported = ad.read_h5ad(out / "cell_eval/pred_model.h5ad")
    assert {"KO1", "KO2", "non-targeting"} == set(exported.obs["target_gene"])
    assert "mean_shift" in (out / "report.md").read_text()
    assert '"n_conditions": 2' in capsys.readouterr().out


def test_no_umap_skips_only_the_umap(files, tmp_path):
    out = tmp_path / "report"
    assert _run(_base(files, out, extra=["--train", files["train"], "--no-umap", "--no-cell-eval"])) == 0
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["delta_scatter.png", "metrics_by_condition.png", "pca_real_vs_pred.png"]


def test_evaluate_refuses_an_existing_out(files, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        _run(_base(files, out, extra=["--no-figures", "--no-cell-eval", "--baselines", "none"]))
    assert (out / "keep.txt").read_text() == "mine" and not (out / "metrics.csv").exists()
    assert _run(_base(files, out, extra=["--no-figures", "--no-cell-eval", "--baselines", "none", "--overwrite"])) == 0


def test_cell_eval_export_keeps_the_covariate_and_runs_when_installed(files, tmp_path, monkeypatch):
    """The covariate is its own column (cell-eval's --celltype-col); --cell-eval runs the
    package per cell type when it is installed (here a stand-in module records the calls)
    and says how to install it when it is not."""
    import sys
    import types

    from celldit.data.spec import PerturbationSpec
    from celldit.eval.cell_eval import export_cell_eval, run_cell_eval

    real = ad.read_h5ad(files["real"])
    real.obs["cell_type"] = np.where(np.arange(real.n_obs) % 2, "T", "B")
    spec = PerturbationSpec("perturbation", "ctrl", covariate_keys=["cell_type"])
    exported = export_cell_eval(real, {"model": real}, spec, tmp_path / "ce")
    pred = ad.read_h5ad(exported["pred_model"])
    assert set(pred.obs["target_gene"]) == {"KO1", "KO2", "non-targeting"} and set(pred.obs["celltype"]) == {"T", "B"}
    assert "--celltype-col celltype" in exported["readme"].read_text()
    calls = []

    class Evaluator:
        def __init__(self, adata_pred, adata_real, control_pert, pert_col, num_threads, outdir):
            calls.append((set(adata_pred.obs["celltype"]), control_pert, pert_col))

        def compute(self, profile, write_csv):  # cell-eval returns polars frames; .to_pandas() is what we use
            frame = pd.DataFrame({"statistic": ["count", "mean"], "overlap_at_N": [2.0, 0.5 + len(calls)]})
            return None, types.SimpleNamespace(to_pandas=lambda: frame)

    monkeypatch.setitem(sys.modules, "cell_eval", types.SimpleNamespace(MetricsEvaluator=Evaluator))
    scores = run_cell_eval(exported, tmp_path / "ce")
    assert calls == [({"B"}, "non-targeting", "target_gene"), ({"T"}, "non-targeting", "target_gene")]
    assert scores == {"model": {"overlap_at_N": pytest.approx(2.0)}}  # mean over the two cell types
    monkeypatch.setitem(sys.modules, "cell_eval", None)
    with pytest.raises(ValueError, match="pip install cell-eval"):
        run_cell_eval(exported, tmp_path / "ce")


def test_evaluate_with_split_and_no_baselines(files, tmp_path):
    out = tmp_path / "split"
    extra = ["--split", files["split"], "--baselines", "mean_shift", "--no-figures",
             "--no-cell-eval"]
    assert _run(_base(files, out, real=files["full"], extra=extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"model", "mean_shift", "n_conditions"}
    settings = json.loads((out / "settings.json").read_text())
    assert settings["split"]["kind"] == "held_out_replicate"
    assert not (out / "figures").exists()
    out2 = tmp_path / "none"
    assert _run(_base(files, out2, extra=["--baselines", "none", "--no-cell-eval"])) == 0
    assert set(pd.read_csv(out2 / "metrics.csv")["method"]) == {"model"}


def _write(adata, path):
    adata.write_h5ad(path)
    return path


def test_wrong_key(files, tmp_path):
    with pytest.raises(ValueError, match="obs key 'condition'.*not in adata.obs"):
        _run(_base(files, tmp_path / "o", key="condition"))
    pred = ad.read_h5ad(files["pred"])
    pred.obs = pred.obs.rename(columns={"perturbation": "target"})
    path = _write(pred, tmp_path / "renamed.h5ad")
    with pytest.raises(ValueError, match="pred: obs key 'perturbation' is missing"):
        _run(_base(files, tmp_path / "o", pred=path))


def test_wrong_control_label(files, tmp_path):
    with pytest.raises(ValueError, match="control label\\(s\\) 'control' not found"):
        _run(_base(files, tmp_path / "o", control="control"))


def test_condition_absent_from_real(files, tmp_path):
    pred = ad.read_h5ad(files["pred"])
    pred.obs["perturbation"] = pred.obs["perturbation"].astype(str).replace("KO2", "KO9")
    path = _write(pred, tmp_path / "absent.h5ad")
    with pytest.raises(ValueError, match="condition 'KO9' of pred is absent from the real"):
        _run(_base(files, tmp_path / "o", pred=path, extra=["--baselines", "none"]))


def test_mismatched_genes(files, tmp_path):
    pred = ad.read_h5ad(files["pred"])
    pred.var_names = [f"other{i}" if i < 3 else n for i, n in enumerate(pred.var_names)]
    path = _write(pred, tmp_path / "genes.h5ad")
    with pytest.raises(ValueError, match="pred has 3 genes that are not in real"):
        _run(_base(files, tmp_path / "o", pred=path, extra=["--baselines", "none"]))
    # a prediction on a subset of the real genes (a model's genes) is scored on those genes, the
    # real cells being normalised over all of theirs (the training basis)
    subset = _write(ad.read_h5ad(files["pred"])[:, 5:].copy(), tmp_path / "subset.h5ad")
    assert _run(_base(files, tmp_path / "sub", pred=subset, extra=["--baselines", "none", "--no-figures",
                                                                   "--no-cell-eval"])) == 0
    assert json.loads((tmp_path / "sub" / "settings.json").read_text())["genes"] == N_GENES - 5


def test_nan_values(files, tmp_path):
    pred = ad.read_h5ad(files["pred"])
    x = pred.X.toarray()
    x[0, 0] = np.nan
    pred.X = x
    path = _write(pred, tmp_path / "nan.h5ad")
    with pytest.raises(ValueError, match="pred X contains 1 NaN values"):
        _run(_base(files, tmp_path / "o", pred=path, extra=["--baselines", "none"]))


def test_missing_file_and_bad_options(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="--pred .* does not exist"):
        _run(_base(files, tmp_path / "o", pred=tmp_path / "nope.h5ad"))
    with pytest.raises(ValueError, match="needs training cells"):
        _run(_base(files, tmp_path / "o", extra=["--baselines", "all"]))
    with pytest.raises(ValueError, match="unknown name"):
        _run(_base(files, tmp_path / "o", extra=["--train", files["train"],
                                                 "--baselines", "magic"]))
    with pytest.raises(ValueError, match="not both"):
        _run(_base(files, tmp_path / "o", extra=["--train", files["train"],
                                                 "--split", files["split"]]))


def test_without_training_cells_only_the_model_is_scored(files, tmp_path, capsys):
    out = tmp_path / "model_only"
    assert _run(_base(files, out, extra=["--no-figures", "--no-cell-eval"])) == 0
    assert "no baselines are run" in capsys.readouterr().err
    assert set(pd.read_csv(out / "metrics.csv")["method"]) == {"model"}
    settings = json.loads((out / "settings.json").read_text())
    assert settings["pca_fitted_on"] == "real"


def test_main_prints_error_and_exits_2(files, tmp_path, capsys):
    from celldit.cli import main

    code = main(["evaluate", *map(str, _base(files, tmp_path / "o", key="condition"))])
    assert code == 2
    assert "celldit evaluate: error: obs key 'condition'" in capsys.readouterr().err


def test_min_cells_drops_small_conditions_from_real_and_pred(files, tmp_path):
    real = ad.read_h5ad(files["real"])
    ko2 = np.flatnonzero(real.obs["perturbation"] == "KO2")
    small = _write(real[~np.isin(np.arange(real.n_obs), ko2[10:])].copy(), tmp_path / "small.h5ad")
    out = tmp_path / "min"
    extra = ["--train", files["train"], "--min-cells", "20", "--no-figures", "--no-cell-eval"]
    assert _run(_base(files, out, real=small, extra=extra)) == 0
    assert set(pd.read_csv(out / "metrics.csv")["condition"]) == {"KO1"}
    assert json.loads((out / "settings.json").read_text())["dropped_conditions"] == ["KO2"]
    with pytest.raises(SystemExit):  # a usage error: one line, exit code 2
        _run(_base(files, tmp_path / "zero", extra=["--train", files["train"], "--min-cells", "0"]))
