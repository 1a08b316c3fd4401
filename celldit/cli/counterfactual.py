"""``celldit counterfactual``: what the control cells of an AnnData would look like under perturbations.

Example::

    celldit counterfactual runs/model --input controls.h5ad --perturbation STAT1 IRF1 --out cf.h5ad
    celldit counterfactual runs/model --input controls.h5ad --all --out cf.h5ad

Writes one cell per (control cell, perturbation): ``X`` in the model's expression space
over its genes, ``obs`` with the perturbation key (and covariates) and
``obs['celldit_source']``, the name of the control cell it came from. The output file is
written atomically and never overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = [
    "SOLVER_CHOICES",
    "add_parser",
    "add_sampling_arguments",
    "check_labels",
    "check_out",
    "load_model",
    "read_h5ad",
    "run",
    "trained_labels",
]

SOLVER_CHOICES = ("euler", "midpoint", "heun", "rk4", "adaptive", "dopri5", "dopri8", "bosh3", "adaptive_heun")
#: celldit.cells.control_mean.DEFAULT_POOLING, repeated so that parsing the command line does
#: not import torch (tests/cli/test_cells.py checks the two agree)
DEFAULT_POOLING = 0.5


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``counterfactual`` on the ``celldit`` subcommand parsers."""
    p = subparsers.add_parser(
        "counterfactual", help="carry control cells to perturbations with a trained model",
        description="Predict what the control cells of --input would look like under each perturbation "
                    "(one output cell per control cell and perturbation).")
    p.add_argument("model", type=Path, help="model folder written by `celldit fit`")
    p.add_argument("--input", required=True, type=Path,
                   help="cells (.h5ad or .zarr) with the model's genes; when it has the perturbation key only its "
                        "control cells are used")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--perturbation", nargs="+", metavar="P", help="perturbation label(s), e.g. STAT1 or A+B")
    which.add_argument("--all", action="store_true", help="every perturbation the model was trained on")
    p.add_argument("--dose", default=None, help="dose of every perturbation (models with a dose key)")
    p.add_argument("--layer", default=None,
                   help="where the input's values are: a layer name, X or raw (default: layers['counts'] if present, else X)")
    p.add_argument("--size-factor-key", default=None,
                   help="obs column of each input cell's library size (default: the model's normalisation basis)")
    p.add_argument("--input-space", choices=("auto", "counts", "log1p"), default="auto",
                   help="what the input's values are (auto: counts when all are whole numbers, else log1p)")
    p.add_argument("--control-mean", choices=("observed", "pooled"), default="observed",
                   help="the mean control cell each batch's cells are moved with: observed (default: its control "
                        "cells' mean; each cell keeps its own counterfactual) or pooled (that mean pooled with the "
                        "training batches' by their precision: the expected measured population under P, as a real "
                        "sample would show it against these same controls)")
    p.add_argument("--pooling", type=float, default=DEFAULT_POOLING,
                   help="with --control-mean pooled: the fraction of the way from each batch's own control mean to "
                        f"the pooled one that its cells move (default {DEFAULT_POOLING}, chosen on a validation "
                        "replicate; 1: the whole estimate; docs/cells.md)")
    add_sampling_arguments(p, support="discrete")
    p.set_defaults(func=run)
    return p


def add_sampling_arguments(p: argparse.ArgumentParser, support: str) -> None:
    """Solver, guidance, seed and output options shared by ``counterfactual`` and ``generate``."""
    from .parsing import at_least, finite, seed

    p.add_argument("--steps", type=at_least(1), default=None,
                   help="solver steps (default: the model's sampler settings; 10 control source, 50 noise)")
    p.add_argument("--method", choices=SOLVER_CHOICES, default=None, help="ODE solver")
    p.add_argument("--cfg-scale", type=finite, default=None,
                   help="classifier-free guidance scale (default: the model's, 1 = none)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--chunk-size", type=at_least(1), default=None,
                   help="cells integrated and written at once (default: the model's sampler batch size)")
    p.add_argument("--counts", action="store_true",
                   help="add layers['counts']: counts sampled from the prediction with each source cell's library size")
    p.add_argument("--raw-layer", action="store_true",
                   help="keep the flow output in layers['flow'] (X is on log1p's support, see --support)")
    p.add_argument("--support", choices=("discrete", "balance", "rescale", "clip", "none"), default=support,
                   help=f"how X is brought to log1p's support (default {support}): discrete (balance, then values "
                        "between 0 and the source cell's first count level log1p(1e4/library size) to 0 or that level "
                        "at random, each gene's mean kept in expectation; needs source cells), balance (a gene's "
                        "negative values and as many of its smallest positive values as balance them to 0, its mean "
                        "over a condition's cells kept), rescale (negatives to 0, the positive values scaled to keep "
                        "the mean), clip, or none")
    p.add_argument("--out", required=True, type=Path, help="output .h5ad file (or .zarr store), written block by block (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def load_model(path: Path):
    """The CellDiT saved in ``path``; the error names the folder when it does not exist."""
    from ..cells import CellDiT

    if path.is_file():
        raise NotADirectoryError(f"MODEL {str(path)!r} is a file: give the model folder written by celldit fit")
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    return CellDiT.load(path)


def read_h5ad(path: Path, flag: str, backed: bool = False):
    """Read an .h5ad file or .zarr store; errors name the flag and the path."""
    from ..data.files import read_cells

    return read_cells(path, flag, backed=backed)


def check_out(path: Path, overwrite: bool = False) -> Path:
    """Refuse an existing output file unless ``overwrite``; make its folder."""
    path = Path(path)
    if path.suffix not in (".h5ad", ".zarr"):
        raise ValueError(f"--out {str(path)!r}: the cells are written as AnnData; give a name ending in .h5ad "
                         "(or .zarr for a zarr store)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"--out {str(path)!r} already exists: choose another file (or --overwrite)")
    if path.is_dir() and path.suffix != ".zarr":
        raise IsADirectoryError(f"--out {str(path)!r} is a folder: give an .h5ad file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def trained_labels(model) -> list[str]:
    """The perturbation labels the model was trained on (spec delimiter joins combinations),
    control excluded, in training order without repeats."""
    labels: list[str] = []
    for names, _ in model.conditions.keys:
        label = model.spec.delimiter.join(names)
        if names and label not in labels:
            labels.append(label)
    return labels


def check_labels(model, labels: list[str]) -> None:
    """``KeyError`` naming the first perturbation the model cannot embed."""
    for label in labels:
        for name in model.spec.parse(label):
            model.vocab.index(name)


def run(args: argparse.Namespace) -> int:
    """Sample and write the counterfactual cells; returns the exit code (0)."""
    out = check_out(args.out, args.overwrite)
    model = load_model(args.model)
    labels = trained_labels(model) if args.all else list(dict.fromkeys(args.perturbation))
    if not labels:
        raise ValueError("the model has no perturbed condition to predict (--all found none)")
    check_labels(model, labels)
    adata = read_h5ad(args.input, "--input")
    pred = model.counterfactual(adata, labels, dose=args.dose, steps=args.steps, method=args.method,
                                cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.chunk_size,
                                layer=args.layer, size_factor_key=args.size_factor_key, input_space=args.input_space,
                                counts=args.counts, raw_layer=args.raw_layer, out=out, overwrite=args.overwrite,
                                support=args.support, control_mean=args.control_mean,
                                pooling=args.pooling)
    if pred.isbacked:
        pred.file.close()
    n_src = pred.n_obs // len(labels)
    print(f"wrote {pred.n_obs} cells ({n_src} control cells x {len(labels)} perturbation(s)) x "
          f"{pred.n_vars} genes to {out}")
    return 0
