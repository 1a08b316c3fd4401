"""``celldit demo``: train on the bundled Papalexi 2021 screen, sample counterfactuals, score them.

Example::

    celldit demo --out runs/demo              # the default protocol (configs/papalexi_rep3.yaml)
    celldit demo --out runs/demo_quick --quick   # a tiny run through every stage

Writes ``split.json``, ``model/``, ``counterfactuals.h5ad``, ``report/`` and ``demo.json``
into ``--out`` and prints the model beside the baselines (see :mod:`celldit.cells.demo`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .parsing import at_least

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``celldit`` subcommand parsers."""
    p = subparsers.add_parser(
        "demo", help="train on the bundled Papalexi 2021 CRISPR screen and score counterfactual cells",
        description="Hold out replicate rep_3 of the bundled Papalexi 2021 THP-1 CRISPR knockout screen, "
                    "train a CellDiT on rep_1 + rep_2, carry rep_3's control cells to each perturbation "
                    "and score them beside the baselines.")
    p.add_argument("--out", required=True, type=Path, help="output folder (new, or empty)")
    p.add_argument("--max-steps", type=at_least(1), default=None, help="training steps (default: the demo settings)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (small model, 20 steps, 150 control cells) that exercises every stage")
    p.add_argument("--threads", type=at_least(0), default=1,
                   help="torch and BLAS CPU threads (default 1; 0 leaves the libraries' defaults)")
    p.add_argument("--no-progress-bar", action="store_true", help="hide the training progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the table; returns the exit code (0)."""
    from ..cells.demo import MIN_CELLS, format_table, run_demo
    from ..data.bundled import bundled_path

    result = run_demo(args.out, max_steps=args.max_steps, quick=args.quick, threads=args.threads or None,
                      progress_bar=False if args.no_progress_bar else None, log=sys.stderr)
    n = result.summary["n_conditions"]
    print(f"Papalexi 2021, held-out replicate rep_3: {n} perturbations, mean over perturbations "
          "(pearson: higher is better; mse, edistance: lower is better)")
    print(format_table(result.summary))
    print("wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    print(f"report: {result.files.get('report_markdown', result.out_dir / 'report')}")
    print(f"model: {result.files['model']}  counterfactuals: {result.files['counterfactuals']}")
    # the UMAP is left out of the demo's report (about 20 s, mostly numba compiling)
    print("UMAP of real and predicted cells: " + shlex.join([
        "celldit", "evaluate", "--real", str(bundled_path()), "--pred", str(result.files["counterfactuals"]),
        "--split", str(result.files["split"]), "--perturbation-key", "perturbation", "--control", "control",
        "--min-cells", str(MIN_CELLS), "--model", str(result.files["model"]), "--out", str(result.out_dir / "report_umap")]))
    return 0
