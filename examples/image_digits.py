"""Class-conditional rectified flow on real handwriting: scikit-learn's bundled 8x8 digits.

Trains a small :class:`celldit.ImageDiT` (one 8x8 channel, 2x2 patches) with
:class:`celldit.train.FlowTrainingPlan` (AdamW, EMA) through Lightning on CPU in a few
minutes, samples with classifier-free guidance from the EMA weights, and writes

* ``OUT/samples.npz``: ``images`` (N, 1, 8, 8) on the 0..16 scale of
  ``sklearn.datasets.load_digits`` and ``labels`` (N,), the class each sample was asked to be;
* ``OUT/samples.png``: a grid, one row per class;
* ``OUT/metrics.json``: wall times, final loss, and the accuracy of a logistic regression
  fitted on the real digits when it classifies the samples against their asked labels.

Usage::

    python examples/image_digits.py --out runs/digits
    python examples/image_digits.py --out /tmp/d --steps 200 --n-samples 100   # quick look

Hyperparameters live in ``configs/image_digits.yaml``; the flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

try:
    import celldit  # noqa: F401
except ImportError:  # running from a source checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from celldit import ImageDiT
from celldit.data.images import LatentDataModule, LatentDataset
from celldit.flow import RectifiedFlow
from celldit.train import FitConfig, FlowTrainingPlan, LossHistory, fit
from celldit.train.trainer import resolve_accelerator

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "image_digits.yaml"


def digits_to_unit(images: np.ndarray) -> np.ndarray:
    """0..16 pixel values -> [-1, 1]."""
    return images.astype(np.float32) / 8.0 - 1.0


def unit_to_digits(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> the 0..16 scale of ``load_digits`` (clipped)."""
    return np.clip((x + 1.0) * 8.0, 0.0, 16.0)


def load_config(path: str | Path, args: argparse.Namespace) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    config.setdefault("trainer", {})
    overrides = {
        ("max_steps",): args.steps,
        ("seed",): args.seed,
        ("sampling", "n_samples"): args.n_samples,
        ("sampling", "cfg_scale"): args.cfg_scale,
        ("sampling", "steps"): args.sample_steps,
        ("batch_size",): args.batch_size,
        ("lr",): args.lr,
        ("ema_decay",): args.ema_decay,
        ("trainer", "accelerator"): args.accelerator,
        ("threads",): args.threads,
    }
    for keys, value in overrides.items():
        if value is None:
            continue
        node = config
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    if args.progress:
        config["trainer"]["progress_bar"] = True
    return config


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], FitConfig, RectifiedFlow]:
    """The config's ImageDiT arguments, training settings and flow (the `celldit image train` schema)."""
    model_args = [name for name in inspect.signature(ImageDiT.__init__).parameters if name != "self"]
    fit_fields = {f.name for f in dataclasses.fields(FitConfig)}
    model = {k: v for k, v in config.items() if k in model_args}
    fit_config = FitConfig(**{k: v for k, v in config.items() if k in fit_fields})
    return model, fit_config, RectifiedFlow(**config.get("flow", {}))


def classifier_accuracy(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Logistic regression fitted on all real digits, scored on generated images vs asked labels.

    Also returns the same classifier family's held-out accuracy on real digits (fit on 75%,
    scored on 25%) as the reference a perfect generator would approach.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny problem: BLAS threads only add contention
        return _classifier_accuracy(images, labels, seed)


def _classifier_accuracy(images: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    d = load_digits()
    data = d.data / 16.0  # pixels on [0, 1]: same classifier, faster convergence
    xtr, xte, ytr, yte = train_test_split(data, d.target, test_size=0.25, random_state=seed, stratify=d.target)
    real_heldout = float(LogisticRegression(max_iter=2000).fit(xtr, ytr).score(xte, yte))
    clf = LogisticRegression(max_iter=2000).fit(data, d.target)
    pred = clf.predict(images.reshape(len(images), -1) / 16.0)
    per_class = {str(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    # memorisation check: distance (0..16 pixel units) from each sample to its nearest real
    # digit, next to the same for real digits (leave-one-out); copies would sit near 0
    gen, real = images.reshape(len(images), -1).astype(np.float64), d.data.astype(np.float64)
    nn_gen = np.sqrt(np.maximum(_sq_dists(gen, real), 0).min(1))
    rr = _sq_dists(real, real)
    np.fill_diagonal(rr, np.inf)
    return {
        "accuracy": float((pred == labels).mean()), "real_heldout_accuracy": real_heldout, "per_class": per_class,
        "nn_dist_generated_to_real": float(nn_gen.mean()), "nn_dist_real_to_real": float(np.sqrt(np.maximum(rr, 0).min(1)).mean()),
        "near_copies": int((nn_gen < 1.0).sum()),
    }  # fmt: skip


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_row: int = 12) -> None:
    """One row per class, ``per_row`` samples each, grey-scale like the original scans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.unique(labels)
    fig, axes = plt.subplots(len(classes), per_row, figsize=(per_row * 0.6, len(classes) * 0.6), squeeze=False)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:per_row]
        for j in range(per_row):
            ax = axes[r, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(idx):
                ax.imshow(images[idx[j], 0], cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
            if j == 0:
                ax.set_ylabel(str(c), rotation=0, labelpad=8, va="center")
    fig.suptitle("celldit ImageDiT + rectified flow: generated 8x8 digits (row = asked class)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train, sample and evaluate; returns the metrics written to ``out/metrics.json``."""
    threads = torch.get_num_threads()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    try:
        return _run(config, out)
    finally:
        torch.set_num_threads(threads)


def _run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    mcfg, fcfg, flow = split_config(config)
    scfg = config["sampling"]
    seed = int(fcfg.seed or 0)
    torch.manual_seed(seed)
    digits = load_digits()
    x = digits_to_unit(digits.images[:, None])  # (1797, 1, 8, 8)
    network = ImageDiT(**mcfg)
    dataset = LatentDataset(x, digits.target, expected_shape=(mcfg["in_channels"], mcfg["input_size"], mcfg["input_size"]),
                            num_classes=mcfg["num_classes"])  # fmt: skip
    datamodule = LatentDataModule(dataset, batch_size=fcfg.batch_size)
    plan = FlowTrainingPlan(network, flow, lr=fcfg.lr, weight_decay=fcfg.weight_decay, betas=fcfg.betas,
                            warmup_steps=fcfg.warmup_steps, lr_schedule=fcfg.lr_schedule,
                            min_lr_ratio=fcfg.min_lr_ratio, ema_decay=fcfg.ema_decay)
    history = LossHistory(print_every=None if fcfg.trainer.progress_bar else fcfg.trainer.log_every_n_steps)
    t0 = time.perf_counter()
    fit(plan, datamodule, fcfg.trainer, max_steps=fcfg.max_steps, seed=seed, callbacks=[history])
    train_s = time.perf_counter() - t0

    # sample from the EMA weights, n/10 per class, CFG against the null class
    t0 = time.perf_counter()
    n_classes = mcfg["num_classes"]
    per_class = -(-int(scfg["n_samples"]) // n_classes)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    device = torch.device(resolve_accelerator(fcfg.trainer.accelerator))
    plan.to(device)  # Lightning hands the module back on the CPU after fit
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn((len(labels), *x.shape[1:]), generator=gen).to(device)
    y = labels.to(device)
    samples = plan.sample(
        x0, cond={"y": y}, uncond={"y": torch.full_like(y, n_classes)}, cfg_scale=float(scfg["cfg_scale"]),
        steps=int(scfg["steps"]), method=scfg.get("method", "euler"), batch_size=scfg.get("batch_size"),
    )  # fmt: skip
    sample_s = time.perf_counter() - t0
    images = unit_to_digits(samples.float().cpu().numpy())
    labels_np = labels.numpy()
    np.savez(out / "samples.npz", images=images.astype(np.float32), labels=labels_np.astype(np.int64))
    save_grid(images, labels_np, out / "samples.png")
    acc = classifier_accuracy(images, labels_np, seed=seed)
    metrics = {
        "train_steps": int(plan.global_step),
        "train_wall_s": round(train_s, 2),
        "sample_wall_s": round(sample_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "final_loss": history.smoothed(50),
        "final_loss_last_step": history.losses[-1] if history.losses else float("nan"),
        "n_samples": int(len(labels_np)),
        "classifier_accuracy": acc["accuracy"],
        "classifier_accuracy_per_class": acc["per_class"],
        "real_digits_heldout_accuracy": acc["real_heldout_accuracy"],
        "nn_dist_generated_to_real": acc["nn_dist_generated_to_real"],
        "nn_dist_real_to_real": acc["nn_dist_real_to_real"],
        "near_copies": acc["near_copies"],
        "n_parameters": int(sum(p.numel() for p in network.parameters())),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "config": config,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/image_digits.yaml)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-samples", type=int, help="samples to generate (split evenly over classes)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    p.add_argument("--sample-steps", type=int, help="ODE solver steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--ema-decay", type=float, help="EMA decay (lower it for short runs)")
    p.add_argument("--accelerator", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (config default: 1)")
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    args = p.parse_args(argv)
    config = load_config(args.config, args)
    metrics = run(config, args.out)
    summary = {k: metrics[k] for k in ("train_steps", "wall_s", "final_loss", "classifier_accuracy", "n_samples")}
    print(json.dumps(summary))
    return metrics


if __name__ == "__main__":
    main()
