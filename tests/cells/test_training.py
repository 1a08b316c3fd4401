"""Training a CellDiT you can watch and resume: the loss curve, logs, resume, validation, divergence."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_adata

from celldit.cells import CellDiT
from celldit.train import trainer as trainer_module
from celldit.train.callbacks import NonFiniteLossError

TINY = {"hidden_size": 16, "depth": 1, "num_heads": 2, "perturbation_features": None}
QUIET = {"progress_bar": False, "logger": None}


@pytest.fixture(scope="module")
def screen():
    return make_adata({"control": 120, "P": 80, "Q": 80}, 16, effects={"P": {0: 1.0, 1: 1.0}, "Q": {2: -1.0}})


def fit_args(**trainer):
    return {"max_steps": 30, "batch_size": 64, "block_size": 32, "warmup_steps": 5,
            "trainer": {**QUIET, "checkpoint_every_n_steps": 10, **trainer}}


class Kill(L.Callback):
    """Stop the run before step ``at`` + 1, as a crash would (after its checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def test_resume_continues_the_same_run(screen, tmp_path, monkeypatch):
    whole = CellDiT(screen, **TINY).fit(**fit_args(), run_dir=tmp_path / "whole")
    build = trainer_module.build_trainer
    monkeypatch.setattr(trainer_module, "build_trainer",
                        lambda *a, callbacks=(), **k: build(*a, callbacks=[*callbacks, Kill(20)], **k))
    with pytest.raises(RuntimeError, match="killed"):
        CellDiT(screen, **TINY).fit(**fit_args(), run_dir=tmp_path / "broken")
    monkeypatch.setattr(trainer_module, "build_trainer", build)
    last = tmp_path / "broken" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 20
    resumed = CellDiT(screen, **TINY).fit(**fit_args(), run_dir=tmp_path / "resumed", resume=last)
    # the same data stream and training noise: the same weights as the uninterrupted run
    a, b = whole.network.state_dict(), resumed.network.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert resumed.history["steps"] == 30 and resumed.history["loss_steps"] == list(range(1, 31))
    np.testing.assert_array_equal(resumed.history["losses"], whole.history["losses"])
    # a resume of a run whose settings differ is not the same run: the error says what is missing
    with pytest.raises(FileNotFoundError, match="not found"):
        CellDiT(screen, **TINY).fit(**fit_args(), resume=tmp_path / "nope.ckpt")


def test_the_same_seed_gives_the_same_weights(screen, tmp_path):
    def weights(seed):
        args = {**fit_args(), "max_steps": 8, "seed": seed}
        return CellDiT(screen, **TINY).fit(**args, run_dir=tmp_path / f"s{seed}_{len(list(tmp_path.iterdir()))}") \
            .network.state_dict()

    a, b, c = weights(1), weights(1), weights(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_from_the_command_line(tmp_path, capsys):
    from celldit.cli import main

    data = make_adata({"control": 60, "P": 40}, 8, effects={"P": {0: 1.0}})
    data.write_h5ad(tmp_path / "d.h5ad")
    common = ["fit", str(tmp_path / "d.h5ad"), "--perturbation-key", "perturbation", "--control", "control",
              "--hidden-size", "16", "--depth", "1", "--num-heads", "2", "--batch-size", "32", "--threads", "1",
              "--trainer.checkpoint_every_n_steps", "5", "--trainer.progress_bar", "false"]
    assert main([*common, "--max-steps", "10", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--max-steps", "5", "--out", str(tmp_path / "first")]) == 0
    last = tmp_path / "first.run" / "checkpoints" / "last.ckpt"
    assert main([*common, "--max-steps", "10", "--resume", str(last), "--out", str(tmp_path / "resumed")]) == 0
    whole, resumed = CellDiT.load(tmp_path / "whole"), CellDiT.load(tmp_path / "resumed")
    assert resumed.history["steps"] == 10
    for key, value in whole.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # the checkpoint is what the second run continues from: a changed one gives other weights
    state = torch.load(last, map_location="cpu", weights_only=False)
    state["state_dict"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, tmp_path / "changed.ckpt")
    assert main([*common, "--max-steps", "10", "--resume", str(tmp_path / "changed.ckpt"),
                 "--out", str(tmp_path / "changed")]) == 0
    changed = CellDiT.load(tmp_path / "changed").network.state_dict()
    assert any(not torch.equal(changed[k], v) for k, v in whole.network.state_dict().items())
    capsys.readouterr()
    assert main([*common, "--max-steps", "10", "--resume", str(tmp_path / "none.ckpt"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "none.ckpt" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_loss_curve_logs_and_batch_job_lines(screen, tmp_path, capsys):
    model = CellDiT(screen, **TINY).fit(**{**fit_args(logger="csv", log_every_n_steps=10)}, run_dir=tmp_path / "run")
    err = capsys.readouterr().err
    assert "step 10/30  loss" in err and "step 30/30  loss" in err  # stderr is not a terminal here
    metrics = list((tmp_path / "run" / "logs").glob("version_*/metrics.csv"))
    assert metrics and "train_loss" in metrics[0].read_text()
    folder = model.save(tmp_path / "model")
    lines = (folder / "losses.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 31
    assert abs(float(lines[-1].split(",")[1]) - model.history["losses"][-1]) < 1e-4
    assert (folder / "loss.png").stat().st_size > 1000
    loaded = CellDiT.load(folder)  # the curve comes back with the model
    np.testing.assert_allclose(loaded.history["losses"], model.history["losses"], rtol=1e-4)


def test_validation_score_and_early_stopping(screen):
    model = CellDiT(screen, **TINY)
    model.fit(max_steps=400, batch_size=64, lr=3e-3, validation_fraction=0.2, validation_every_n_steps=10,
              early_stopping_patience=2, trainer=QUIET)
    val = model.history["val_losses"]
    steps = [s for s, _ in val]
    assert steps[:3] == [10, 20, 30] and all(np.isfinite(v) for _, v in val)
    # stopped once the score had not improved for two validations, long before 400 steps
    best = int(np.argmin([v for _, v in val]))
    assert model.history["steps"] < 400 and len(val) == best + 3
    # the same held-out batches each time: a model that does not change scores the same
    again = CellDiT(screen, **TINY)
    again.fit(max_steps=20, batch_size=64, lr=1e-12, warmup_steps=0, validation_fraction=0.2,
              validation_every_n_steps=10, trainer=QUIET)
    (_, first), (_, second) = again.history["val_losses"]
    assert abs(first - second) < 1e-4


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing(screen, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
            # deep enough that lr=10 without clipping overflows within a few steps on any CPU
            # (a 1-block model's loss can peak at 1e13 and come back, finite, on some)
            deep = {**TINY, "hidden_size": 64, "depth": 4}
            CellDiT(screen, **deep).fit(max_steps=200, batch_size=64, lr=10.0, warmup_steps=0,
                                        trainer={**QUIET, "gradient_clip_val": None})
