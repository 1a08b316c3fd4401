"""``celldit image train|sample``: the original DiT's train.py / sample.py, with rectified flow.

``train`` (:mod:`celldit.cli.image_train`) fits an :class:`~celldit.ImageDiT` on precomputed
latents and exports the EMA weights to ``OUT/model``. ``sample`` loads such a folder (no
pickle) and writes class-conditional samples, decoded through a VAE from a local folder
when one is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..flow.sampling import SOLVERS
from .image_train import MODEL_KIND
from .parsing import at_least, device, finite, seed


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="train ImageDiT on latents, or sample from it")
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    # listed here; parsed by celldit.cli.image_train (options generated from the settings classes)
    sub.add_parser("train", help="train a class-conditional ImageDiT with rectified flow", add_help=False)

    s = sub.add_parser("sample", help="sample class-conditional latents (and images) from an exported model")
    s.add_argument("model", help="folder written by `celldit image train` (OUT/model)")
    s.add_argument("--n", type=at_least(1), default=16, help="number of samples")
    s.add_argument("--class-labels", type=int, nargs="*", default=None, help="classes to cycle through (default: all)")
    s.add_argument("--cfg-scale", type=finite, default=1.0)
    s.add_argument("--steps", type=at_least(1), default=50)
    s.add_argument("--method", default="heun", choices=list(SOLVERS), help="ODE solver (default heun)")
    s.add_argument("--seed", type=seed, default=0)
    s.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder to decode latents to images")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device,
                   help="cpu, cuda or cuda:N")
    s.add_argument("--out", required=True, help="output .npz (latents, labels[, images])")
    s.set_defaults(func=run_sample)


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
