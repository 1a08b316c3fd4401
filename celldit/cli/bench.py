"""``celldit bench TARGET ...``: benchmarks that print one JSON object.

Targets are sub-subcommands; each is one ``_add_<target>(sub)`` function in
:data:`TARGETS` that registers its parser and sets ``func``. Adding a target (e.g.
``cells``) is one such function and one entry in :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .parsing import at_least, device, positive, seed


def _print_json(result: dict[str, Any]) -> int:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _add_image(sub: argparse._SubParsersAction) -> None:
    from ..models.dit import DIT_PRESETS

    p = sub.add_parser(
        "image",
        help="training/sampling throughput, memory and MFU of an image DiT preset",
        description=(
            "Time full training steps (rectified-flow loss, backward, AdamW) and sampling "
            "forwards (no grad, CFG off) of a DiT preset on synthetic latents (image_size/8, "
            "4 channels) and print one JSON object with images/s, peak memory, analytic "
            "forward multiply-adds per image, achieved TFLOP/s and MFU."
        ),
    )
    p.add_argument("--preset", default="DiT-XL/2", choices=list(DIT_PRESETS), metavar="PRESET",
                   help="DiT-{S,B,L,XL}/{2,4,8} (default DiT-XL/2)")
    p.add_argument("--image-size", type=at_least(8), default=256, help="image side in px; latents are image_size/8 (default 256)")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="images per step (default 32)")
    p.add_argument("--steps", type=at_least(1), default=20, help="timed steps per phase (default 20)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed warm-up steps per phase, at least 1 runs (default 3)")
    p.add_argument("--device", default=None, type=device, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores for fp32 matmuls on CUDA")
    p.add_argument("--peak-tflops", type=positive, default=None,
                   help="device peak TFLOP/s for this precision (overrides the built-in table) for MFU")
    p.add_argument("--reference", action="store_true",
                   help="also time an fp32, uncompiled training step and report the speed-up")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads for the run (default: torch's)")
    p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=_run_image)


def _run_image(args: argparse.Namespace) -> int:
    from ..bench.image import bench_image

    result = bench_image(
        preset=args.preset, image_size=args.image_size, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, device=args.device, compile=args.compile, precision=args.precision,
        peak_tflops=args.peak_tflops, reference=args.reference, tf32=args.tf32,
        compile_mode=args.compile_mode, gradient_checkpointing=args.grad_checkpointing, seed=args.seed,
        threads=args.threads,
    )  # fmt: skip
    return _print_json(result)


#: bench target -> function registering its parser
TARGETS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "image": _add_image,
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``celldit bench`` and its targets."""
    parser = subparsers.add_parser(
        "bench", help="benchmarks (print one JSON object)",
        description="Benchmarks; each target prints one JSON object on stdout.",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="bench_target", metavar="TARGET", required=True)
    for add in TARGETS.values():
        add(sub)
