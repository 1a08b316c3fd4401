"""Model folders: the format-1 fixture still loads and predicts the same, and damaged or
edited folders are refused before anything is built, naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import make_adata

from celldit.cells import CellDiT
from celldit.cells.outputs import to_support

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_format_1_models_load_and_predict_as_they_did():
    """``cell_model_v1`` was saved by celldit 0.1 (format 1) with its counterfactuals of 20
    rep_3 controls (Euler 20 steps, the default then; 10 since); this version reads it and
    predicts the same values."""
    model = CellDiT.load(FIXTURES / "cell_model_v1")
    assert model.config.pair_keys == ["bio_rep"] and model.config.tokenizer == "module" and model.is_trained
    controls = ad.read_h5ad(FIXTURES / "cell_model_v1_controls.h5ad")
    pred = model.counterfactual(controls, ["STAT1", "IRF1"], raw_layer=True, support="balance", method="euler",
                                steps=20)
    np.testing.assert_allclose(pred.layers["flow"], np.load(FIXTURES / "cell_model_v1_expected.npy"), rtol=0, atol=1e-6)
    flow, n = pred.layers["flow"], controls.n_obs  # X: the flow output on log1p's support, label by label
    for block in (slice(0, n), slice(n, 2 * n)):
        np.testing.assert_array_equal(pred.X[block], to_support(flow[block], "balance"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    adata = make_adata({"control": 60, "P": 40}, 10, effects={"P": {0: 1.0}})
    model = CellDiT(adata, hidden_size=16, depth=1, num_heads=2, perturbation_features=None)
    return model.save(tmp_path_factory.mktemp("ckpt") / "model")


def edited(saved: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    edit(folder)
    return folder


def set_config(key, value):
    def edit(folder):
        raw = json.loads((folder / "config.json").read_text())
        if key in raw:
            raw[key] = value
        else:
            raw["config"][key] = value
        (folder / "config.json").write_text(json.dumps(raw))
    return edit


@pytest.mark.parametrize("edit, file, match", [
    (set_config("format_version", 99), "config.json", "format_version 99"),
    (set_config("kind", "banana"), "config.json", "'banana'"),
    (set_config("hidden_size", 1_000_000_000), "config.json", "hidden_size"),
    (set_config("hidden_size", 32), "model.safetensors", r"shape .*\(16, 16\).* imply \(32, 32\)"),
    (set_config("depth", 1_000_000), "config.json", "depth"),
    (set_config("depth", 3), "model.safetensors", "1 transformer blocks but depth=3"),
    (set_config("num_heads", 0), "config.json", "num_heads=0"),
    (set_config("seed", "x"), "config.json", "seed='x'"),
    (lambda f: (f / "genes.json").write_text(json.dumps(json.loads((f / "genes.json").read_text())[:-1])),
     "model.safetensors", r"\(9,\)"),
    (lambda f: (f / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
     "model.safetensors", "truncated or corrupted"),
    (lambda f: (f / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4000)),
     "model.safetensors", "truncated or corrupted"),
])
def test_damaged_folders_are_refused_naming_the_file(saved, tmp_path, edit, file, match):
    folder = edited(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=match) as err:
        CellDiT.load(folder)
    assert file in str(err.value)


def test_a_folder_without_config_is_not_a_model(saved, tmp_path):
    folder = edited(saved, tmp_path, lambda f: (f / "config.json").unlink())
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        CellDiT.load(folder)
