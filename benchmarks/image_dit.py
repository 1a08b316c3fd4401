"""Run the image DiT benchmark over a list of configurations and print one JSON list.

Each entry is what ``celldit bench image`` prints for that configuration (the same
function, :func:`celldit.bench.bench_image`), or ``{"config": ..., "error": ...}`` when a
configuration fails (e.g. out of memory), so one failure does not lose the others.

Examples::

    # the issue's GPU table: S/2, B/2, XL/2 at 256 px, bf16, with and without compile
    python benchmarks/image_dit.py --suite gpu --out bench_gpu.json
    # a quick CPU run (DiT-S/2 at 64 px, batch 4)
    python benchmarks/image_dit.py --suite cpu
    # your own list: a JSON list of bench_image keyword dicts
    python benchmarks/image_dit.py --configs '[{"preset": "DiT-B/2", "batch_size": 64}]'
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any

import torch

from celldit.bench import bench_image, emit_report

SUITES: dict[str, list[dict[str, Any]]] = {
    "cpu": [
        {"preset": "DiT-S/2", "image_size": 64, "batch_size": 4, "steps": 3, "warmup": 1, "device": "cpu"},
    ],
    "gpu": [
        {"preset": p, "image_size": 256, "batch_size": bs, "precision": "bf16", "compile": c, "device": "cuda",
         "reference": p == "DiT-XL/2" and c}
        for p, bs in (("DiT-S/2", 256), ("DiT-B/2", 256), ("DiT-XL/2", 64))
        for c in (False, True)
    ],  # fmt: skip
}


def run(configs: list[dict[str, Any]], **common: Any) -> list[dict[str, Any]]:
    """``bench_image(**{**cfg, **common})`` for each config (``common``, from the command
    line, overrides); errors are recorded, not raised."""
    results = []
    for cfg in configs:
        kwargs = {**cfg, **common}
        try:
            results.append(bench_image(**kwargs))
        except (RuntimeError, ValueError) as err:  # CUDA OOM is a RuntimeError subclass
            results.append({"config": kwargs, "error": f"{type(err).__name__}: {err}"[:2000]})
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps(results[-1].get("config", kwargs)), "done", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="a built-in list (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--configs", default=None, help="JSON list of bench_image keyword dicts (overrides --suite)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps for every config")
    parser.add_argument("--device", default=None, help="device for every config (cuda, cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for every config")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps for every config")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU")
    parser.add_argument("--out", default=None, help="also write the JSON list to this file")
    args = parser.parse_args(argv)

    if args.configs is not None:
        configs = json.loads(args.configs)
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            parser.error("--configs must be a JSON list of objects")
    else:
        configs = SUITES[args.suite or ("gpu" if torch.cuda.is_available() else "cpu")]
    common = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup), ("device", args.device),
                                ("threads", args.threads), ("peak_tflops", args.peak_tflops))
              if v is not None}  # fmt: skip
    results = run(configs, **common)
    emit_report(results, args.out)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
