"""``celldit simulate``: write a synthetic Perturb-seq screen (with its ground truth) to .h5ad.

Example::

    celldit simulate --cells 100000 --genes 2000 --perturbations 500 --combinations 50 \\
        --cell-types 3 --batches 2 --out screen.h5ad

The counts are written chunk by chunk (bounded memory, :func:`celldit.data.synthetic.simulate_h5ad`);
the true effects, penetrances and targets go to ``OUT.truth.npz`` beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``simulate`` on the ``celldit`` subcommand parsers."""
    from .parsing import at_least, finite, seed

    p = subparsers.add_parser(
        "simulate", help="write a synthetic Perturb-seq screen with known effects (.h5ad)",
        description="Negative-binomial counts with log-normal library sizes, low-rank gene programs, perturbation "
                    "effects with partial penetrance, combinations with interactions, cell types and batches.")
    p.add_argument("--cells", type=at_least(1), required=True, help="number of cells")
    p.add_argument("--genes", type=at_least(2), default=2000, help="number of genes (default 2000)")
    p.add_argument("--perturbations", type=at_least(0), default=100, help="single perturbations (default 100)")
    p.add_argument("--combinations", type=at_least(0), default=0, help="pairs A+B with interactions (default 0)")
    p.add_argument("--cell-types", type=at_least(1), default=1, help="cell types (default 1)")
    p.add_argument("--batches", type=at_least(1), default=1, help="batches (default 1)")
    p.add_argument("--programs", type=at_least(1), default=8, help="low-rank gene programs (default 8)")
    p.add_argument("--control-fraction", type=finite, default=0.25, help="fraction of control cells (default 0.25)")
    p.add_argument("--library-size", type=finite, default=4000.0, help="median counts per cell (default 4000)")
    p.add_argument("--chunk-size", type=at_least(1), default=20_000, help="cells written at once (default 20000)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", type=Path, required=True, help="output .h5ad (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..data.synthetic import simulate_h5ad

    if not 0 < args.control_fraction < 1:
        raise ValueError(f"--control-fraction {args.control_fraction}: must be between 0 and 1")
    if args.library_size <= 0:
        raise ValueError(f"--library-size {args.library_size}: must be positive")
    truth = simulate_h5ad(args.out, args.cells, args.genes, args.perturbations, n_combinations=args.combinations,
                          n_cell_types=args.cell_types, n_batches=args.batches, n_programs=args.programs,
                          control_fraction=args.control_fraction, library_size=args.library_size,
                          chunk_size=args.chunk_size, overwrite=args.overwrite, seed=args.seed)
    truth_path = args.out.with_name(args.out.name + ".truth.npz")
    np.savez(truth_path, effects=truth.effects, penetrance=truth.penetrance, targets=truth.targets,
             type_response=truth.type_response, batch_offsets=truth.batch_offsets, base=truth.base,
             programs=truth.programs, perturbations=np.array(truth.perturbations), genes=np.array(truth.genes))
    print(f"wrote {args.cells} cells x {args.genes} genes ({args.perturbations} perturbations, "
          f"{args.combinations} combinations) to {args.out}; truth: {truth_path}")
    return 0
