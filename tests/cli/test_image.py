"""Exported model folders (atomic, no pickle) and the ``celldit image`` train/sample CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from celldit.cli import main
from celldit.cli.image import load_image_model
from celldit.io import load_model_folder, save_model_folder


def test_save_is_atomic_and_never_overwrites(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    folder = save_model_folder(tmp_path / "m", sd, {"a": 1}, extra_json={"genes": ["A", "B"]})
    state, config = load_model_folder(folder)
    assert torch.equal(state["w"], sd["w"]) and config == {"a": 1}
    assert json.loads((folder / "genes.json").read_text()) == ["A", "B"]
    with pytest.raises(FileExistsError, match="already exists"):
        save_model_folder(folder, {"w": torch.zeros(1)}, {"a": 2})
    assert load_model_folder(folder)[1] == {"a": 1}  # untouched
    # a failing save (config not JSON-serialisable) leaves the old folder and no debris
    with pytest.raises(TypeError):
        save_model_folder(folder, {"w": torch.zeros(1)}, {"a": object()}, overwrite=True)
    assert load_model_folder(folder)[1] == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    save_model_folder(folder, {"w": torch.zeros(1)}, {"a": 3}, overwrite=True)
    assert load_model_folder(folder)[1] == {"a": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_loading_names_the_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model_folder(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_cli")
    d = load_digits()
    np.savez(root / "digits.npz", latents=(d.images[:, None] / 8 - 1).astype("float32"), labels=d.target)
    (root / "tiny.yaml").write_text(
        "hidden_size: 32\ndepth: 2\nnum_heads: 2\npatch_size: 2\n"
        "lr: 0.002\nema_decay: 0.9\nbatch_size: 64\nmax_steps: 40\n"
        "trainer: {progress_bar: false, logger: null}\n"
    )
    rc = main(["image", "train", "--latents", str(root / "digits.npz"), "--config", str(root / "tiny.yaml"),
               "--out", str(root / "run")])  # fmt: skip
    assert rc == 0
    return root


def test_train_exports_a_loadable_model_and_resumable_checkpoint(trained):
    model, flow = load_image_model(trained / "run" / "model")
    assert model.config["input_size"] == 8 and model.config["in_channels"] == 1 and model.config["num_classes"] == 10
    assert (trained / "run" / "checkpoints" / "last.ckpt").is_file()
    # training moved the weights off adaLN-Zero: the model no longer predicts zero
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([0.0, 500.0]), torch.tensor([1, 2]))
    assert out.abs().max() > 0
    # an existing output folder is refused
    assert main(["image", "train", "--latents", str(trained / "digits.npz"), "--config", str(trained / "tiny.yaml"),
                 "--out", str(trained / "run")]) == 2  # fmt: skip


def test_sample_is_seeded_and_checks_its_arguments(trained, capsys):
    model_dir = str(trained / "run" / "model")
    args = ["image", "sample", model_dir, "--n", "6", "--class-labels", "3", "7", "--steps", "4", "--cfg-scale", "2"]
    assert main(args + ["--out", str(trained / "a.npz")]) == 0
    assert main(args + ["--out", str(trained / "b.npz")]) == 0
    a, b = np.load(trained / "a.npz"), np.load(trained / "b.npz")
    assert a["latents"].shape == (6, 1, 8, 8) and a["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    np.testing.assert_array_equal(a["latents"], b["latents"])
    assert main(args + ["--out", str(trained / "a.npz")]) == 2  # never overwrites
    assert main(["image", "sample", model_dir, "--class-labels", "10", "--out", str(trained / "c.npz")]) == 2
    assert "outside the model's 0..9" in capsys.readouterr().err
    assert main(["image", "sample", str(trained), "--out", str(trained / "d.npz")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_train_rejects_latents_that_do_not_fit_the_config(trained, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(
        "hidden_size: 32\ndepth: 1\nnum_heads: 2\npatch_size: 2\ninput_size: 16\nmax_steps: 1\n"
    )
    rc = main(["image", "train", "--latents", str(trained / "digits.npz"), "--config", str(tmp_path / "bad.yaml"),
               "--out", str(tmp_path / "run")])  # fmt: skip
    assert rc == 2 and "(1, 16, 16)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spoil, match", [
    (lambda x, y: (x, y - 1), r"labels must be class ids .* -1"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype("float32"), y), "NaN"),
])
def test_train_refuses_bad_latents_and_leaves_no_folder(trained, tmp_path, capsys, spoil, match):
    data = np.load(trained / "digits.npz")
    x, y = spoil(data["latents"][:100], data["labels"][:100])
    np.savez(tmp_path / "bad.npz", latents=x, labels=y)
    rc = main(["image", "train", "--latents", str(tmp_path / "bad.npz"), "--config", str(trained / "tiny.yaml"),
               "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_training_with_the_same_seed_gives_the_same_weights(trained, tmp_path):
    def weights(out, seed):
        assert main(["image", "train", "--latents", str(trained / "digits.npz"), "--config", str(trained / "tiny.yaml"),
                     "--max-steps", "6", "--seed", str(seed), "--out", str(out)]) == 0  # fmt: skip
        return load_model_folder(out / "model")[0]

    a, b, c = weights(tmp_path / "a", 1), weights(tmp_path / "b", 1), weights(tmp_path / "c", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
