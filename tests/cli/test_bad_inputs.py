"""Hostile inputs: each gives one line on stderr, exit code 2, naming what to fix, and writes nothing.

Every case changes one thing of a good small screen (or a good command) the way real data or
a typo would: duplicated gene names, a NaN in a covariate or dose column, 0 genes or cells,
options out of range, devices that do not exist. Library bugs are not caught by the CLI,
so a traceback in any of these would fail the test too (``main`` would raise).
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import make_adata

from celldit.cli import main

N_GENES = 12
TINY = ["--max-steps", "2", "--hidden-size", "16", "--depth", "1", "--num-heads", "2", "--batch-size", "16",
        "--threads", "1", "--tokenizer", "latent"]


def _screen() -> ad.AnnData:
    labels = [lab for lab in ("ctrl", "KO1", "KO2") for _ in range(30)]
    return make_adata(labels, N_GENES, effects={"KO1": {0: 1.0}, "KO2": {1: -1.0}}, level=5.0,
                      obs={"rep": ["r1", "r2"] * 45}, gene_prefix="g", seed=0)


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, command: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ")]  # anndata's own warnings may precede ours
    assert code == 2, err
    assert lines and lines[-1].startswith(f"celldit {command}: error:"), err
    assert len([line for line in lines if "error" in line]) == 1, err
    for needle in needles:
        assert re.search(needle, lines[-1]), (needle, lines[-1])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    screen = _screen()
    screen.write_h5ad(d / "screen.h5ad")
    controls = screen[screen.obs["perturbation"] == "ctrl"].copy()
    controls.write_h5ad(d / "ctrl.h5ad")
    assert main(["fit", str(d / "screen.h5ad"), "--perturbation-key", "perturbation", "--control", "ctrl", *TINY,
                 "--out", str(d / "model")]) == 0
    return d


def _dup_genes(a):
    a.var_names = [*a.var_names[:-1], a.var_names[0]]


def _nan_covariate(a):
    a.obs["donor"] = pd.Categorical([None if i % 7 == 0 else "d1" for i in range(a.n_obs)])


def _nan_dose(a):
    a.obs["dose"] = np.where(np.arange(a.n_obs) % 5 == 0, np.nan, 1.0)


def _word_dose(a):
    a.obs["dose"] = "high"


def _nan_pair_key(a):
    a.obs["rep"] = pd.Categorical([None if i == 3 else r for i, r in enumerate(a.obs["rep"])])


def _batch_without_controls(a):
    a.obs["rep"] = ["r3" if p == "KO2" else r for p, r in zip(a.obs["perturbation"], a.obs["rep"])]


def _control_only(a):
    a.obs["perturbation"] = "ctrl"


def _scaled(a):
    a.X = a.X * 0.5  # half counts: neither counts nor log1p


# (how the data are spoilt, extra fit flags, what the message must name)
FIT_CASES = {
    "duplicated gene names": (_dup_genes, [], [r"repeated gene name", "g0", "var_names_make_unique"]),
    "no genes": (lambda a: None, ["--genes", "[]"], [r"genes"]),
    "NaN covariate": (_nan_covariate, ["--covariate-keys", "donor"], [r"obs\['donor'\]", "missing"]),
    "NaN dose of perturbed cells": (_nan_dose, ["--dose-key", "dose"], [r"obs\['dose'\]", "missing"]),
    "dose that is not a number": (_word_dose, ["--dose-key", "dose"], [r"obs\['dose'\]", "'high'"]),
    "NaN pair key": (_nan_pair_key, ["--pair-keys", "rep"], [r"obs\['rep'\]", "pair_keys"]),
    "control-only data": (_control_only, [], ["no perturbed cells"]),
    "a batch without controls": (_batch_without_controls, ["--pair-keys", "rep"], ["'r3'", "no control cells",
                                                                                  "pair_keys"]),
    "scaled counts": (_scaled, [], ["input_space|log1p"]),
    "batch size 0": (lambda a: None, ["--batch-size", "0"], ["batch_size"]),
    "cfg dropout 2": (lambda a: None, ["--cfg-dropout", "2"], ["cfg_dropout"]),
    "negative seed": (lambda a: None, ["--fit-seed", "-1"], ["seed"]),
    "learning rate nan": (lambda a: None, ["--lr", "nan"], ["lr"]),
    "heads that do not divide the width": (lambda a: None, ["--num-heads", "3"], ["num_heads"]),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_refuses_bad_data_and_options(case, tmp_path, capsys):
    spoil, flags, needles = FIT_CASES[case]
    data = _screen()
    spoil(data)
    data.write_h5ad(tmp_path / "d.h5ad")
    args = ["fit", tmp_path / "d.h5ad", "--perturbation-key", "perturbation", "--control", "ctrl", *TINY, *flags,
            "--out", tmp_path / "m"]  # later flags win
    code, err = _run(args, capsys)
    _one_line_error(code, err, "fit", *needles)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".*"))


def _input(model, name, spoil):
    a = ad.read_h5ad(model / "ctrl.h5ad")
    spoilt = spoil(a)
    a = a if spoilt is None else spoilt
    a.write_h5ad(model / name)
    return model / name


def _nan_value(a):
    x = np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, dtype=np.float32)
    x[2, 3] = np.nan
    a.X = x


def _zero_cells(a):
    empty = a[:0].copy()
    del empty.obs["perturbation"]
    return empty


CF_CASES = {
    "a NaN value": (_nan_value, [], ["NaN"]),
    "0 cells, no perturbation key": (_zero_cells, [], ["0 cells"]),
    "duplicated gene names": (_dup_genes, [], ["repeated gene name", "var_names_make_unique"]),
    "3 genes missing": (lambda a: a[:, 3:].copy(), [], ["genes do not match", "'g0'"]),
    "a dose for a model without a dose key": (lambda a: None, ["--dose", "10"], ["dose"]),
    "guidance nan": (lambda a: None, ["--cfg-scale", "nan"], ["--cfg-scale"]),
    "0 steps": (lambda a: None, ["--steps", "0"], ["--steps"]),
    "unknown perturbation": (lambda a: None, ["--perturbation", "NOPE"], ["'NOPE'"]),
}


@pytest.mark.parametrize("case", list(CF_CASES))
def test_counterfactual_refuses_bad_inputs(case, model, capsys):
    spoil, flags, needles = CF_CASES[case]
    path = _input(model, f"in_{abs(hash(case))}.h5ad", spoil)
    out = model / "cf_out.h5ad"
    code, err = _run(["counterfactual", model / "model", "--input", path, "--perturbation", "KO1", *flags,
                      "--out", out], capsys)
    _one_line_error(code, err, "counterfactual", *needles)
    assert not out.exists()


def test_generate_refuses_more_cells_than_the_disk_holds(model, capsys):
    out = model / "huge.h5ad"
    code, err = _run(["generate", model / "model", "--condition", "KO1", "--n", "100000000000", "--out", out], capsys)
    _one_line_error(code, err, "generate", "GiB", "fewer cells")
    assert not out.exists()


def test_devices_that_do_not_exist_are_refused(capsys):
    code, err = _run(["bench", "image", "--preset", "DiT-S/8", "--device", "tpu"], capsys)
    _one_line_error(code, err, "bench image", "--device", "'tpu'")
    code, err = _run(["image", "sample", "nowhere", "--device", "cuda:7", "--out", "x.npz"], capsys)
    _one_line_error(code, err, "image sample", "--device")


def test_counterfactual_paths_that_are_not_what_they_should_be(model, capsys):
    args = ["--input", model / "ctrl.h5ad", "--perturbation", "KO1"]
    code, err = _run(["counterfactual", model / "ctrl.h5ad", *args, "--out", model / "x.h5ad"], capsys)
    _one_line_error(code, err, "counterfactual", "MODEL", "is a file")
    code, err = _run(["counterfactual", model / "model", *args, "--out", model / "x.csv"], capsys)
    _one_line_error(code, err, "counterfactual", r"\.h5ad")
    assert not (model / "x.h5ad").exists() and not (model / "x.csv").exists()
