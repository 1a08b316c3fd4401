"""Lightning training on image latents: loss, EMA, checkpoint/resume, latent files, VAE, digits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_diffusers

from celldit import ImageDiT
from celldit.data.images import (
    SD_VAE_SCALE,
    LatentDataModule,
    LatentDataset,
    decode_latents,
    encode_images,
    expected_latent_shape,
    load_latent_arrays,
    load_vae,
    save_latents,
)
from celldit.flow import RectifiedFlow, integrate, velocity_fn
from celldit.train import FitConfig, FlowTrainingPlan, LossHistory, TrainerConfig, build_trainer, default_precision, fit

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(progress_bar=False, accelerator="cpu", devices=1, log_every_n_steps=1, logger=None)


def tiny_model(num_classes: int = 3, dropout: float = 0.1) -> ImageDiT:
    return ImageDiT(
        input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
        class_dropout_prob=dropout, num_classes=num_classes, learn_sigma=False,
    )  # fmt: skip


def toy_latents(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a fixed random pattern plus a little noise: easy to learn."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    labels = np.arange(n) % 3
    return protos[labels] + 0.1 * rng.normal(size=(n, 2, 4, 4)).astype(np.float32), labels


def tiny_datamodule(batch_size: int = 32) -> LatentDataModule:
    x, y = toy_latents()
    return LatentDataModule(LatentDataset(x, y, expected_shape=(2, 4, 4), num_classes=3), batch_size=batch_size)


def test_loss_goes_down():
    torch.manual_seed(0)
    plan = FlowTrainingPlan(tiny_model(), RectifiedFlow(), lr=3e-3, warmup_steps=5, ema_decay=0.9)
    history = LossHistory()
    fit(plan, tiny_datamodule(), QUIET, max_steps=60, callbacks=[history])
    assert plan.global_step == 60 and len(history.losses) == 60
    first, last = np.mean(history.losses[:10]), np.mean(history.losses[-10:])
    # an untrained adaLN-Zero model predicts 0: loss = E|x1 - x0|^2 = 1 + E x1^2 ~ 2
    assert first > 1.5
    assert last < 0.7 * first, (first, last)


def test_ema_differs_and_is_used_for_sampling():
    torch.manual_seed(0)
    plan = FlowTrainingPlan(tiny_model(), lr=3e-3, ema_decay=0.9)
    fit(plan, tiny_datamodule(), QUIET, max_steps=8)
    assert int(plan.ema.n_averaged) == 8  # one EMA update per optimizer step
    online = dict(plan.network.named_parameters())
    ema = dict(plan.ema.module.named_parameters())
    assert online.keys() == ema.keys()
    assert any(not torch.allclose(online[k], ema[k]) for k in online)
    assert all(not p.requires_grad for p in plan.ema.parameters())
    # the EMA never enters the optimizer
    opt_params = {id(p) for g in plan.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in plan.ema.parameters()}

    x0 = torch.randn(6, 2, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cond, uncond = {"y": y}, {"y": torch.full_like(y, 3)}
    got = plan.sample(x0, cond, uncond, cfg_scale=2.0, steps=5, batch_size=4)
    ema_net = plan.ema.module.eval()
    want = integrate(velocity_fn(ema_net, plan.flow, cond, uncond, cfg_scale=2.0), x0, steps=5)
    torch.testing.assert_close(got, want)
    online_sample = plan.sample(x0, cond, uncond, cfg_scale=2.0, steps=5, use_ema=False)
    assert not torch.allclose(got, online_sample)
    assert plan.sampling_network() is plan.ema.module
    assert plan.network.training  # sampling restores the train/eval mode it found


def test_checkpoint_and_resume(tmp_path):
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    plan = FlowTrainingPlan(tiny_model(), lr=3e-3, ema_decay=0.9)
    fit(plan, tiny_datamodule(), dict(QUIET, checkpoint_every_n_steps=3), max_steps=6, run_dir=run_dir)
    last = ckpt_dir / "last.ckpt"
    assert last.is_file() and (ckpt_dir / "step0000006.ckpt").is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])

    # a fresh plan resumed at the saved step restores the weights and the EMA exactly
    torch.manual_seed(1)
    resumed = FlowTrainingPlan(tiny_model(), lr=3e-3, ema_decay=0.9)
    fit(resumed, tiny_datamodule(), QUIET, max_steps=6, ckpt_path=last)
    assert resumed.global_step == 6
    for (k, a), b in zip(plan.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)

    # ... and training continues from there up to max_steps in total
    history = LossHistory()
    resumed = FlowTrainingPlan(tiny_model(), lr=3e-3, ema_decay=0.9)
    fit(resumed, tiny_datamodule(), QUIET, max_steps=10, ckpt_path=last, callbacks=[history])
    assert resumed.global_step == 10
    assert history.steps == [7, 8, 9, 10]
    assert int(resumed.ema.n_averaged) == 10
    with pytest.raises(FileNotFoundError, match="not found"):
        fit(resumed, tiny_datamodule(), QUIET, max_steps=12, ckpt_path=tmp_path / "nope.ckpt")


def test_latent_files_roundtrip_and_errors(tmp_path):
    x, y = toy_latents(12)
    for suffix in (".npz", ".safetensors"):
        path = save_latents(tmp_path / f"lat{suffix}", x, y)
        ds = LatentDataset.from_file(path, expected_shape=(2, 4, 4), num_classes=3)
        assert len(ds) == 12
        xi, yi = ds[5]
        torch.testing.assert_close(xi, torch.from_numpy(x[5]))
        assert yi.dtype == torch.int64 and int(yi) == y[5]
    np.save(tmp_path / "lat.npy", x)
    np.save(tmp_path / "lab.npy", y)
    assert len(LatentDataset.from_file(tmp_path / "lat.npy", tmp_path / "lab.npy")) == 12

    with pytest.raises(ValueError, match="labels"):
        load_latent_arrays(tmp_path / "lat.npy")  # .npy needs a labels file
    np.savez(tmp_path / "nolabels.npz", latents=x)
    with pytest.raises(KeyError, match="'labels'"):
        load_latent_arrays(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "wrongname.npz", x=x, labels=y)
    with pytest.raises(KeyError, match="'latents'"):
        load_latent_arrays(tmp_path / "wrongname.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_latent_arrays(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="unsupported"):
        load_latent_arrays(save_latents(tmp_path / "a.npz", x, y).rename(tmp_path / "a.pt"))
    with pytest.raises(ValueError, match="length mismatch: 12 latents but 11 labels"):
        LatentDataset(x, y[:11])
    model = ImageDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*expects \(4, 8, 8\)"):
        LatentDataset(x, y, expected_shape=expected_latent_shape(model))
    with pytest.raises(ValueError, match="num_classes=2"):
        LatentDataset(x, y, num_classes=2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        LatentDataset(x[:, 0], y)
    with pytest.raises(ValueError, match="lower batch_size"):
        LatentDataModule(LatentDataset(x, y), batch_size=64)


def test_plan_and_trainer_settings_errors():
    plan = FlowTrainingPlan(tiny_model(), ema_decay=None)
    assert plan.ema is None and plan.sampling_network() is plan.network
    with pytest.raises(TypeError, match="batch_to_loss expects"):
        plan.batch_to_loss(torch.zeros(2, 2, 4, 4))
    with pytest.raises(KeyError, match="'x1'"):
        plan.batch_to_loss({"y": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="lr_schedule"):
        FlowTrainingPlan(tiny_model(), lr_schedule="linear")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_step'\]"):
        build_trainer({"max_step": 3}, max_steps=3)
    with pytest.raises(ValueError, match="log_every_n_steps=0: must be >= 1"):
        TrainerConfig(log_every_n_steps=0)
    with pytest.raises(ValueError, match="lr=nan: must be a finite number"):
        FitConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="logger='wandb'"):
        TrainerConfig(logger="wandb")
    assert default_precision("cpu") == "32-true"
    trainer = build_trainer(dict(QUIET, gradient_clip_val=0.5), max_steps=3)
    assert trainer.max_steps == 3 and trainer.gradient_clip_val == 0.5
    assert trainer.precision == "32-true"
    # a mapping batch with a fixed source and times is deterministic
    x, y = toy_latents(4)
    batch = {"x1": torch.from_numpy(x), "x0": torch.zeros(4, 2, 4, 4), "t": torch.full((4,), 0.5), "y": torch.from_numpy(y)}
    plan.eval()
    assert plan.batch_to_loss(batch) == plan.batch_to_loss(batch)


def test_vae_from_local_folder(tmp_path):
    diffusers = require_diffusers()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = encode_images(loaded, images)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(z, vae.encode(images).latent_dist.mean * SD_VAE_SCALE)
    out = decode_latents(loaded, z)
    assert out.shape == images.shape and out.abs().max() <= 1
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_vae(tmp_path / "stabilityai" / "sd-vae-ft-ema")


def test_digits_example_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("image_digits", ROOT / "examples" / "image_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "digits"
    mod.main(["--out", str(out), "--steps", "20", "--n-samples", "20", "--sample-steps", "3", "--accelerator", "cpu"])
    with np.load(out / "samples.npz") as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (20, 1, 8, 8) and labels.shape == (20,)
    assert images.min() >= 0 and images.max() <= 16
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 20 and np.isfinite(metrics["final_loss"])
    assert 0 <= metrics["classifier_accuracy"] <= 1
    assert (out / "samples.png").stat().st_size > 1000


def test_bf16_autocast_and_cosine_schedule():
    torch.manual_seed(0)
    plan = FlowTrainingPlan(tiny_model(), lr=1e-3, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1, ema_decay=0.9)
    assert [round(plan._lr_factor(s), 6) for s in (0, 1)] == [0.5, 1.0]  # linear warmup
    trainer = fit(plan, tiny_datamodule(), dict(QUIET, precision="bf16-mixed"), max_steps=10)
    assert trainer.precision == "bf16-mixed" and plan.global_step == 10
    # the scheduler reached the end of the cosine: lr = min_lr_ratio * lr
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-6)
    # autocast leaves the weights and the EMA in fp32
    assert all(p.dtype == torch.float32 for p in plan.parameters())
