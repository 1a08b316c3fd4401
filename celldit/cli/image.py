"""``celldit image train|sample``: the original DiT's train.py / sample.py, with rectified flow.

``train`` fits an :class:`~celldit.ImageDiT` on precomputed latents (``.npz``,
``.safetensors`` or ``.npy`` + labels) through Lightning, keeps resumable ``.ckpt`` files
under ``OUT/checkpoints`` and exports the EMA weights to ``OUT/model`` (``model.safetensors``
+ ``config.json``). ``sample`` loads such a folder (no pickle) and writes class-conditional
samples, decoded through a VAE from a local folder when one is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

MODEL_KIND = "celldit.ImageDiT"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="train ImageDiT on latents, or sample from it")
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a class-conditional ImageDiT with rectified flow")
    p.add_argument("--latents", required=True, help="latents file: .npz/.safetensors (latents, labels) or .npy")
    p.add_argument("--labels", default=None, help="labels .npy when --latents is a .npy")
    p.add_argument("--preset", default=None, help="DiT-{S,B,L,XL}/{2,4,8}; the latent shape sets input_size/in_channels")
    p.add_argument("--config", default=None, help="YAML with model/flow/plan/data/trainer sections (see configs/)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --resume)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-mixed, 32-true")
    p.add_argument("--strategy", default=None, help="Lightning strategy: auto, ddp, fsdp ...")
    p.add_argument("--devices", default=None, help="Lightning devices (count or list)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA)")
    p.add_argument("--resume", default=None, help="a .ckpt to resume from")
    p.set_defaults(func=run_train)

    s = sub.add_parser("sample", help="sample class-conditional latents (and images) from an exported model")
    s.add_argument("model", help="folder written by `celldit image train` (OUT/model)")
    s.add_argument("--n", type=int, default=16, help="number of samples")
    s.add_argument("--class-labels", type=int, nargs="*", default=None, help="classes to cycle through (default: all)")
    s.add_argument("--cfg-scale", type=float, default=1.0)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--method", default="heun", help="euler, midpoint, heun, rk4 or adaptive")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder to decode latents to images")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--out", required=True, help="output .npz (latents, labels[, images])")
    s.set_defaults(func=run_sample)


def _train_config(args: argparse.Namespace, latent_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    for section in ("model", "flow", "plan", "data", "trainer"):
        config.setdefault(section, {})
    channels, size = latent_shape[0], latent_shape[1]
    model = config["model"]
    if args.preset:
        from ..models import DIT_PRESETS

        if args.preset not in DIT_PRESETS:
            raise ValueError(f"unknown --preset {args.preset!r}; choose one of {list(DIT_PRESETS)}")
        model.update(DIT_PRESETS[args.preset])
    if not {"hidden_size", "depth", "num_heads"} <= set(model):
        raise ValueError("give --preset or a --config whose model section sets hidden_size, depth and num_heads")
    model.setdefault("input_size", size)
    model.setdefault("in_channels", channels)
    model.setdefault("num_classes", num_classes)
    model.setdefault("learn_sigma", False)
    overrides = {
        ("trainer", "max_steps"): args.max_steps, ("data", "batch_size"): args.batch_size,
        ("plan", "lr"): args.lr, ("trainer", "precision"): args.precision,
        ("trainer", "strategy"): args.strategy, ("trainer", "devices"): args.devices,
    }  # fmt: skip
    for (section, key), value in overrides.items():
        if value is not None:
            config[section][key] = value
    if args.compile:
        config["trainer"]["compile"] = True
    return config


def run_train(args: argparse.Namespace) -> int:
    from ..data.images import LatentDataModule, LatentDataset, expected_latent_shape
    from ..flow import RectifiedFlow
    from ..io import save_model_folder
    from ..models import ImageDiT
    from ..train import FlowTrainingPlan, fit

    out = Path(args.out)
    if out.exists() and not args.resume:
        raise FileExistsError(f"--out {out} already exists: choose a new folder, or pass --resume CKPT")
    dataset = LatentDataset.from_file(args.latents, args.labels)
    latent_shape = tuple(dataset.latents.shape[1:])
    num_classes = int(dataset.labels.max()) + 1
    config = _train_config(args, latent_shape, num_classes)
    network = ImageDiT(**config["model"])
    expected = expected_latent_shape(network)
    if latent_shape != expected:
        raise ValueError(f"latents in {args.latents} have shape {latent_shape}, the model expects {expected}")
    if num_classes > network.config["num_classes"]:
        raise ValueError(f"labels reach {num_classes - 1} but the model has num_classes={network.config['num_classes']}")
    datamodule = LatentDataModule(dataset, batch_size=int(config["data"].get("batch_size", 256)))
    plan_cfg = dict(config["plan"])
    if "betas" in plan_cfg:
        plan_cfg["betas"] = tuple(plan_cfg["betas"])
    flow = RectifiedFlow(**config["flow"])
    plan = FlowTrainingPlan(network, flow, **plan_cfg)
    trainer_cfg = {"progress_bar": True, **config["trainer"], "checkpoint_dir": str(out / "checkpoints")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    fit(plan, datamodule, settings=trainer_cfg, ckpt_path=args.resume)
    export = {"kind": MODEL_KIND, "model": network.config, "flow": config["flow"]}
    save_model_folder(out / "model", plan.sampling_network().state_dict(), export, overwrite=True)
    print(f"exported EMA weights to {out / 'model'}")
    return 0


def load_image_model(folder: str | Path) -> tuple[Any, Any]:
    """Rebuild ``(ImageDiT, RectifiedFlow)`` from an exported folder (no pickle)."""
    from ..flow import RectifiedFlow
    from ..io import load_model_folder
    from ..models import ImageDiT

    state, config = load_model_folder(folder)
    if config.get("kind") != MODEL_KIND:
        raise ValueError(f"{folder} holds a {config.get('kind')!r} model, not an ImageDiT")
    model = ImageDiT(**config["model"])
    model.load_state_dict(state, strict=True)
    return model.eval(), RectifiedFlow(**config.get("flow", {}))


def run_sample(args: argparse.Namespace) -> int:
    from ..flow import integrate, velocity_fn

    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"--out {out} already exists: choose another file")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, flow = load_image_model(args.model)
    model.to(args.device)
    num_classes = model.config["num_classes"]
    classes = args.class_labels if args.class_labels else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--class-labels {bad} are outside the model's 0..{num_classes - 1}")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    y = torch.tensor([classes[i % len(classes)] for i in range(args.n)], device=args.device)
    c, s = model.config["in_channels"], model.config["input_size"]
    x0 = torch.randn(args.n, c, s, s, generator=g).to(args.device)
    v = velocity_fn(model, flow, {"y": y}, {"y": torch.full_like(y, num_classes)}, cfg_scale=args.cfg_scale)
    with torch.no_grad():
        latents = integrate(v, x0, steps=args.steps, method=args.method)
    arrays = {"latents": latents.float().cpu().numpy(), "labels": y.cpu().numpy()}
    if args.vae:
        from ..data.images import decode_latents, load_vae

        vae = load_vae(args.vae, device=args.device)
        arrays["images"] = decode_latents(vae, latents).float().cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    print(f"wrote {args.n} samples to {out}")
    return 0
