"""One GPU check, one JSON object: the image DiT's speed with and without the fast path, the
cell models' training rates, and the time of a million counterfactual cells.

    python benchmarks/gpu_check.py --out gpu_check.json         # on a GPU machine, < 8 minutes
    python benchmarks/gpu_check.py --smoke                      # tiny sizes, on CPU (the test suite runs this)

Measured in the same run:

* ``image``: DiT-XL/2 at 256 px (32x32x4 latents), a full training step (flow loss, backward,
  AdamW) in bf16 autocast + ``torch.compile`` + SDPA (flash kernels), and the same step in
  fp32 eager (the original DiT's setting, ``reference``): images/s, achieved TFLOP/s and MFU
  (analytic multiply-adds of :mod:`celldit.models.flops`), peak GPU memory;
* ``cells``: CellDiT training cells/s at 2,000 genes (synthetic screen in memory) for the
  module, latent and gene (Perceiver read-in) tokenizers, bf16;
* ``counterfactual``: seconds to write 1M counterfactual cells to ``.h5ad`` with the module model
  (20,000 control cells, drawn again from the screen's controls, under each of 50 perturbations);
* ``parity``: the official DiT fixture (``tests/fixtures/official_dit_tiny.pt``) on this device:
  largest absolute difference from the official fp32 output in fp32 (TF32 off) and relative
  error under bf16 autocast and under ``torch.compile``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def cell_rates(device: str, genes: int, cells: int, steps: int, batch_size: int, precision: str | None) -> dict:
    import torch

    from celldit.cells import CellDiT
    from celldit.data.synthetic import simulate

    adata, _ = simulate(cells, genes, 50, n_programs=8, library_size=1.5 * genes, seed=0)
    out = {}
    for tokenizer in ("module", "latent", "gene"):
        model = CellDiT(adata, tokenizer=tokenizer, perturbation_features=None, seed=0)
        trainer = {"accelerator": "gpu" if device == "cuda" else "cpu", "precision": precision, "progress_bar": False,
                   "logger": None}
        model.fit(max_steps=5, batch_size=batch_size, trainer=trainer)  # warm-up (kernels, compile caches)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.fit(max_steps=steps, batch_size=batch_size, trainer=trainer)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        out[tokenizer] = {"cells_per_s": round(steps * batch_size / wall, 1), "tokens": model.network.tokenizer.num_tokens,
                          "parameters": sum(p.numel() for p in model.network.parameters())}
    return out


def counterfactual_time(device: str, genes: int, cells: int, cf_cells: int, workdir: Path) -> dict:
    import numpy as np

    from celldit.cells import CellDiT
    from celldit.data.synthetic import simulate

    adata, _ = simulate(cells, genes, 50, n_programs=8, library_size=1.5 * genes, seed=1)
    model = CellDiT(adata, perturbation_features=None, seed=0).to(device)
    labels = [f"pert{p:04d}" for p in range(50)]
    pool = np.flatnonzero((adata.obs["perturbation"] == "control").to_numpy())
    controls = adata[np.resize(pool, max(1, cf_cells // len(labels)))].copy()  # repeated to the size asked
    controls.obs_names_make_unique()
    t0 = time.perf_counter()
    pred = model.counterfactual(controls, labels, out=workdir / "cf.h5ad", overwrite=True, batch_size=16384)
    wall = time.perf_counter() - t0
    n = pred.n_obs
    pred.file.close()
    (workdir / "cf.h5ad").unlink()
    return {"cells": int(n), "seconds": round(wall, 2), "cells_per_s": round(n / wall, 1),
            }


def fixture_parity(device: str) -> dict:
    import torch

    from celldit.bench.image import _tf32
    from celldit.models import load_official_checkpoint

    path = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official_dit_tiny.pt"
    fixture = torch.load(path, map_location="cpu", weights_only=True)
    model = load_official_checkpoint(str(path)).to(device).eval()
    inputs = [fixture[k].to(device) for k in ("x", "t", "y")]
    expected = fixture["out"].to(device)
    with _tf32(False), torch.no_grad():  # true fp32, the fixture's precision
        fp32 = model(*inputs)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = model(*inputs).float()
        compiled = torch.compile(model)(*inputs) if device == "cuda" else fp32

    def rel(a):
        return float((a - expected).norm() / expected.norm())

    return {"fp32_max_abs_diff": float((fp32 - expected).abs().max()), "bf16_relative_error": rel(bf16),
            "compiled_fp32_relative_error": rel(compiled)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device is there (CPU in tests)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/celldit_gpu_check"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --smoke)")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from celldit.bench.image import bench_image, machine_info

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = a.threads or (1 if a.smoke else None)
    if threads:
        torch.set_num_threads(threads)  # small CPU models: extra threads only spin
    a.work.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        preset, size, batch, steps, genes, cells, cell_steps, cf = "DiT-S/8", 64, 2, 2, 64, 600, 3, 2000
    else:
        preset, size, batch, steps, genes, cells, cell_steps, cf = "DiT-XL/2", 256, 32, 20, 2000, 20000, 50, 1_000_000
    t0 = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    precision = "bf16-mixed" if device == "cuda" else None
    sections = {  # cheapest first; each is printed to stderr when done, so a run cut short keeps them
        "parity": lambda: fixture_parity(device),
        "image": lambda: bench_image(preset=preset, image_size=size, batch_size=batch, steps=steps,
                                     warmup=2 if a.smoke else 5, device=device, compile=device == "cuda",
                                     precision="bf16" if device == "cuda" else "fp32", reference=True, seed=0),
        "cells": lambda: cell_rates(device, genes, cells, cell_steps, 256 if not a.smoke else 32, precision),
        "counterfactual": lambda: counterfactual_time(device, genes, cells, cf, a.work),
    }
    result = {
        "config": {"smoke": a.smoke, "image_preset": preset, "image_size": size, "image_batch": batch,
                   "cell_genes": genes, "cell_steps": cell_steps, "counterfactual_cells": cf},
        "machine": {**machine_info(torch.device(device)), "platform": platform.platform(), "cpus": os.cpu_count()},
    }
    for name, run in sections.items():
        result[name] = run()
        print(json.dumps({name: result[name]}, default=str), file=sys.stderr, flush=True)
    result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    from celldit.bench import emit_report

    emit_report(result, a.out, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
