"""One trained CellDiT's counterfactuals on ``papalexi_rep3`` at several ODE solver settings.

    python benchmarks/solver_steps.py --data ../shared/data --model runs/demo/model \
        --solvers euler:20 euler:10 euler:5 --threads 1 --out steps.json
    python benchmarks/solver_steps.py --data ../shared/data --model NOISE_MODEL \
        --solvers heun:50 heun:20 heun:10 --generate --threads 1   # a noise-source model

A control-source flow starts every cell at ``control + anchor(P)`` and moves it a short way,
so few solver steps may do. This script measures it: the same saved model (e.g. the demo's
``runs/demo/model``, or a folder of ``CellDiT.save``) carries all of rep_3's control cells to
the 23 perturbations with >= 40 rep_3 cells with each ``method:steps``, and each set is
scored by the demo's ``evaluate`` call (same PCA space and scoring draws for every setting).
``--seed`` picks the escapers for every setting alike, so the settings differ in the
integration alone. ``--generate`` also scores ``generate(P, n, controls=rep_3's controls)`` at
each setting (as many cells per perturbation as rep_3 has controls, as ``benchmarks/cells.py
--generate`` does): for a noise source this is the flow from fresh prior draws, with no
inversion before it, so the two can react to the solver differently.

Prints one JSON object: config, machine, and per setting the sampling wall time (s) and the
means over conditions of pd_de20, pd_all, mse_de20 and E-distance (and the same for
``generate`` under ``"generate"``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from celldit.bench import emit_report
from celldit.bench.cell_scoring import generated_in_batch
from celldit.bench.papalexi import held_out_replicate
from celldit.cells import CellDiT
from celldit.cells.demo import MAX_CELLS, MIN_CELLS
from celldit.eval.report import evaluate
from celldit.flow.sampling import FIXED_STEP_SOLVERS
from celldit.train.trainer import set_threads

METRICS = ("pearson_delta_de20", "pearson_delta_all", "mse_de20", "edistance")


def _solver(text: str) -> tuple[str, int]:
    method, _, steps = text.partition(":")
    if method not in FIXED_STEP_SOLVERS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"--solvers {text!r}: write METHOD:STEPS with METHOD one of "
                                         f"{', '.join(FIXED_STEP_SOLVERS)}, e.g. euler:10")
    return method, int(steps)


def _scores(test: ad.AnnData, pred: ad.AnnData, spec, train: ad.AnnData, seed: int) -> dict[str, float]:
    """The demo's ``evaluate`` means of ``METRICS`` for predicted cells ``pred``."""
    summary = evaluate(test, pred, spec, train=train, min_cells=MIN_CELLS, max_cells=MAX_CELLS, seed=seed,
                       figures=False, cell_eval=False).summary["model"]
    return {k: round(float(summary[k]), 4) for k in METRICS}


def _relative(row: dict, first: dict) -> dict:
    """A setting's sampling time as a ratio of the first's, and its metrics minus the first's."""
    out = {"sample_time": round(row["sample_s"] / first["sample_s"], 3),
           **{k: round(row[k] - first[k], 4) for k in METRICS}}
    if "generate" in row:
        out["generate"] = _relative(row["generate"], first["generate"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the shared .h5ad files")
    parser.add_argument("--model", type=Path, required=True, help="a saved CellDiT trained on rep_1 + rep_2")
    parser.add_argument("--solvers", type=_solver, nargs="+", default=[("euler", 20), ("euler", 10), ("euler", 5)],
                        help="METHOD:STEPS settings to compare")
    parser.add_argument("--seed", type=int, default=0, help="sampling and scoring seed (the demo's: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--generate", action="store_true",
                        help="also score generate() in rep_3 (from the model alone and rep_3's control mean)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    set_threads(args.threads)
    split = held_out_replicate(args.data, "rep_3", MIN_CELLS)
    spec, train, test, conditions, controls = split.spec, split.train, split.test, split.conditions, split.controls
    model = CellDiT.load(args.model)
    result = {"config": {"data": str(args.data), "model": str(args.model), "model_seed": model.config.seed,
                         "seed": args.seed, "protocol": "papalexi_rep3", "cells": controls.n_obs * len(conditions),
                         "source": model.config.source, "generate": args.generate},
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "solvers": {}}
    for method, steps in args.solvers:
        start = time.perf_counter()
        pred = model.counterfactual(controls, conditions, seed=args.seed, method=method, steps=steps)
        sample_s = time.perf_counter() - start
        row = {"sample_s": round(sample_s, 1), **_scores(test, pred, spec, train, args.seed)}
        if args.generate:
            start = time.perf_counter()
            generated = generated_in_batch(model, conditions, controls, seed=args.seed, method=method, steps=steps)
            row["generate"] = {"sample_s": round(time.perf_counter() - start, 1),
                               **_scores(test, generated, spec, train, args.seed)}
        result["solvers"][f"{method}:{steps}"] = row
    first = next(iter(result["solvers"].values()))
    result["relative_to_first"] = {name: _relative(row, first) for name, row in result["solvers"].items()}
    emit_report(result, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
