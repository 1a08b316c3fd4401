"""``celldit evaluate``: score predicted cells against real cells, beside the baselines.

Example::

    celldit evaluate --real real.h5ad --pred pred.h5ad --perturbation-key perturbation \\
        --control control --train train.h5ad --baselines all --out report/

Writes ``metrics.csv``, ``summary.json``, ``report.md``, ``settings.json``, ``figures/*.png``
and ``cell_eval/`` into ``--out`` (formats in ``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from celldit.eval.baselines import BASELINES

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``celldit`` subcommand parsers."""
    from .parsing import at_least, seed

    p = subparsers.add_parser(
        "evaluate",
        help="score predicted cells against real cells, beside the baselines",
        description="Score predicted cells against real cells, beside the baselines "
        "(metrics.csv, summary.json, report.md, figures, cell-eval export).",
    )
    p.add_argument("--real", required=True, type=Path,
                   help="real cells (.h5ad; raw counts or log1p-normalised)")
    p.add_argument("--pred", type=Path, help="predicted cells (.h5ad), same genes as --real")
    p.add_argument("--perturbation-key", required=True,
                   help="obs column with the perturbation label (in --real and --pred)")
    p.add_argument("--control", required=True, nargs="+", metavar="LABEL",
                   help="control label(s) in --perturbation-key")
    p.add_argument("--covariate-keys", nargs="*", default=[], metavar="KEY",
                   help="obs columns matching controls to perturbed cells (e.g. cell type)")
    p.add_argument("--delimiter", default="+", help="combination delimiter (default '+')")
    p.add_argument("--train", type=Path,
                   help="training cells (.h5ad): fit the baselines and the PCA space")
    p.add_argument("--split", type=Path,
                   help="split JSON (celldit.data.splits) applied to --real instead of --train")
    p.add_argument("--baselines", default="auto",
                   help="'all', 'none' or a comma list of " + ", ".join(BASELINES)
                   + "; they need --train or --split (default auto: all when training "
                   "cells are given, else none)")
    p.add_argument("--n-pcs", type=at_least(1), default=30, help="PCs of the distribution metrics")
    p.add_argument("--max-cells", type=at_least(2), default=300, help="cells a side (default 300)")
    p.add_argument("--min-cells", type=at_least(1), default=1,
                   help="score only conditions with at least this many real cells (DESIGN protocols: 40)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--rank-test", action="store_true",
                   help="also report metrics on rank-test (Wilcoxon) DE genes")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-umap", action="store_true",
                   help="skip the UMAP figure only (about 20 s on a 2-core CPU, mostly numba compiling)")
    p.add_argument("--no-cell-eval", action="store_true", help="skip the cell-eval export")
    p.add_argument("--cell-eval", action="store_true",
                   help="also run the cell-eval package (pip install cell-eval) and put its scores in summary.json")
    p.add_argument("--model", type=Path, default=None,
                   help="the model folder that made --pred: its loss curve joins the figures")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing --out")
    p.set_defaults(func=run)
    return p


def _read(path: Path, flag: str):
    """Cells left on disk (backed .h5ad or .zarr): evaluation reads at most ``max_cells`` a side."""
    from ..data.files import read_cells

    return read_cells(path, flag, backed=True)


def _baselines(value: str, have_train: bool) -> list[str]:
    value = value.strip()
    if value == "auto":
        if not have_train:
            print("celldit evaluate: no --train/--split given, so no baselines are run",
                  file=sys.stderr)
        return ["all"] if have_train else []
    if value in ("none", ""):
        return []
    if value == "all":
        if not have_train:
            raise ValueError("--baselines all needs training cells: pass --train or --split "
                             "(or --baselines none)")
        return ["all"]
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown name(s) {unknown}; "
                         f"choose from {', '.join(BASELINES)}, all or none")
    if names and not have_train:
        raise ValueError("--baselines needs training cells: pass --train or --split")
    return names


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; returns the exit code (0)."""
    from celldit.data.spec import PerturbationSpec
    from celldit.data.splits import load_split
    from celldit.eval.report import evaluate

    if args.train is not None and args.split is not None:
        raise ValueError("give either --train or --split, not both")
    if args.out.exists() and not args.overwrite and (not args.out.is_dir() or any(args.out.iterdir())):
        raise FileExistsError(f"--out {str(args.out)!r} already exists: choose a new folder (or --overwrite)")
    loss_curve = None
    if args.model is not None:
        curve = args.model / "losses.csv"
        if not curve.is_file():
            raise FileNotFoundError(f"--model {str(args.model)!r} has no losses.csv (not a trained celldit model?)")
        import numpy as np

        values = np.loadtxt(curve, delimiter=",", skiprows=1, ndmin=2)
        loss_curve = (values[:, 0].astype(int).tolist(), values[:, 1].tolist())
    spec = PerturbationSpec(args.perturbation_key, control=list(args.control),
                            delimiter=args.delimiter, covariate_keys=tuple(args.covariate_keys))
    baselines = _baselines(args.baselines, args.train is not None or args.split is not None)
    real = _read(args.real, "--real")
    spec.validate(real)
    pred = _read(args.pred, "--pred") if args.pred is not None else None
    if pred is None and not baselines:
        raise ValueError("nothing to evaluate: give --pred and/or --baselines with --train")
    train, split_dict = None, None
    if args.train is not None:
        train = _read(args.train, "--train")
    elif args.split is not None:
        split = load_split(args.split)
        masks = split.masks(real)
        train, real = real[masks.train], real[masks.test]  # views: rows read on demand
        split_dict = split.to_dict()
    result = evaluate(real, pred, spec, train=train, baselines=baselines, out_dir=args.out,
                      n_pcs=args.n_pcs, max_cells=args.max_cells, seed=args.seed,
                      rank_test=args.rank_test, figures=not args.no_figures, umap=not args.no_umap,
                      cell_eval=not args.no_cell_eval, split=split_dict,
                      min_cells=args.min_cells, run_cell_eval=args.cell_eval, loss_curve=loss_curve)
    means = {m: {k: v for k, v in e.items() if not k.endswith("_median")}
             for m, e in result.summary.items() if isinstance(e, dict)}
    print(json.dumps({"n_conditions": result.summary["n_conditions"], "mean": means},
                     indent=2))
    for key, path in result.files.items():
        print(f"{key}: {path}")
    return 0
