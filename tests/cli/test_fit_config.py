"""``celldit fit``'s options are generated from the settings classes: every setting is
reachable, ``--print-config`` round-trips through ``--config``, and the file-based options
(gene sets, gene lists, prior tables) work end to end."""

from __future__ import annotations

import dataclasses
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CONFIGS, make_adata

from celldit.cells import CellDiT, CellDiTConfig, CellFitConfig
from celldit.cli import main
from celldit.cli.fit import build_parser
from celldit.train import TrainerConfig

TINY = ["--max-steps", "3", "--hidden-size", "16", "--depth", "1", "--num-heads", "2", "--batch-size", "32",
        "--trainer.progress-bar", "false"]


def flags(cls, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name in ("flow", "sampler", "trainer"):
            continue
        name = "fit-seed" if cls is CellFitConfig and f.name == "seed" else f.name.replace("_", "-")
        out.append(f"--{prefix}{name}")
    return out


def test_help_lists_every_setting_of_the_model_and_of_fit(capsys):
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (*flags(CellDiTConfig), *flags(CellFitConfig), *flags(TrainerConfig, "trainer."),
                 "--flow.time-sampling", "--sampler.method", "--config", "--print-config", "--resume", "--run-dir"):
        assert flag in text, flag


def test_print_config_round_trips_through_config(tmp_path):
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["fit", "--config", str(CONFIGS / "kang_celltype.yaml"), "--hidden-size", "96", "--num-heads", "8",
                     "--trainer.accelerator", "cpu", "--print-config"])
    assert code == 0
    printed = yaml.safe_load(buf.getvalue())
    assert printed["hidden_size"] == 96 and printed["max_steps"] == 1000 and printed["trainer"]["accelerator"] == "cpu"
    assert printed["covariate_keys"] == ["cluster_id"] and printed["flow"]["time_sampling"] == "uniform"
    path = tmp_path / "all.yaml"
    path.write_text(buf.getvalue())
    parser = build_parser()
    again = yaml.safe_load(parser.dump(parser.parse_args(["--config", str(path)]), skip_none=False))
    assert again == printed  # the printed file, read back, is the same complete configuration


def test_every_config_file_parses_to_valid_settings():
    from celldit.cli.fit import configs_of

    parser = build_parser()
    for path in CONFIGS.glob("*.yaml"):
        if path.name == "image_digits.yaml":
            continue
        model, fit = configs_of(parser.parse_args(["--config", str(path)]))
        assert isinstance(model, CellDiTConfig) and isinstance(fit, CellFitConfig)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit_config")
    adata = make_adata({"control": 60, "G3": 40, "G7": 40}, 24, effects={"G3": {3: -1.5}, "G7": {7: -1.5}},
                       gene_prefix="G")
    adata.var["pathway"] = np.repeat(["a", "b", "c"], 8)
    adata.var["keep"] = np.arange(24) < 16
    adata.obs["size"] = np.asarray(adata.X.sum(1)).ravel()
    adata.write_h5ad(d / "data.h5ad")
    return d


def fit(data, out, *extra):
    return main(["fit", str(data / "data.h5ad"), "--control", "control", *TINY, *extra, "--out", str(out)])


def test_modules_from_a_gmt_file_and_from_a_var_column(data, tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("SET_A\tdesc\tG0\tG1\tG2\tG3\nSET_B\tdesc\tG10\tG11\tNOT_MEASURED\n")
    assert fit(data, tmp_path / "gmt", "--modules", str(gmt)) == 0
    modules = CellDiT.load(tmp_path / "gmt").tokenizer_kwargs["modules"]
    assert modules[:2] == [[0, 1, 2, 3], [10, 11]] and sorted(g for m in modules for g in m) == list(range(24))
    assert fit(data, tmp_path / "col", "--modules", "var:pathway") == 0
    assert CellDiT.load(tmp_path / "col").tokenizer_kwargs["modules"] == [list(range(i, i + 8)) for i in (0, 8, 16)]
    bad = tmp_path / "bad.gmt"
    bad.write_text("ONLY_A_NAME\n")
    assert fit(data, tmp_path / "bad", "--modules", str(bad)) == 2


def test_genes_from_a_var_column_and_a_prior_table_file(data, tmp_path, capsys):
    table = pd.DataFrame(np.random.default_rng(0).standard_normal((3, 5)), index=["G3", "G7", "G11"])
    table.to_csv(tmp_path / "prior.csv")
    assert fit(data, tmp_path / "m", "--genes", "var:keep", "--perturbation-features", str(tmp_path / "prior.csv"),
               "--size-factor-key", "size") == 0
    model = CellDiT.load(tmp_path / "m")
    assert model.genes == [f"G{i}" for i in range(16)]
    assert model.vocab.perturbations == ["G3", "G7", "G11"] and model.vocab.seen == ["G3", "G7"]
    assert model.normalisation["basis"] == {"kind": "size_factor_key", "key": "size"}
    saved = yaml.safe_load((tmp_path / "m" / "fit_config.yaml").read_text())
    assert saved["genes"] == "var:keep" and saved["max_steps"] == 3
    record = json.loads((tmp_path / "m" / "holdout.json").read_text())
    assert record["n_held_out"] == 0
    capsys.readouterr()
    assert fit(data, tmp_path / "m2", "--size-factor-key", "nope") == 2
    assert "size_factor_key='nope'" in capsys.readouterr().err


def test_option_errors_are_one_line_with_exit_code_2(data, tmp_path, capsys):
    for extra, needle in ((["--cfg-dropout", "2"], "cfg_dropout=2"), (["--lr", "nan"], "lr"),
                          (["--tokenizer", "pixel"], "tokenizer"), (["--trainer.logger", "wandb"], "logger"),
                          (["--hidden-size", "10", "--num-heads", "4"], "not divisible")):
        assert fit(data, tmp_path / "x", *extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("celldit fit: error:") and needle in err, (extra, err)
        assert not (tmp_path / "x").exists()
