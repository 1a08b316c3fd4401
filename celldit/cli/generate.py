"""``celldit generate``: new cells under a condition, from a trained model alone.

Example::

    celldit generate runs/model --condition perturbation=STAT1 --n 500 --out stat1.h5ad
    celldit generate runs/kang --condition group_id=stim cluster_id="CD14+ Monocytes" --n 200 --out gen.h5ad

The condition names the perturbation key and every registered covariate (and the dose key
when registered). Control-source models start from control cells saved with the model
(of the asked covariate group); noise-source models start from Gaussian noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .counterfactual import add_sampling_arguments, check_labels, check_out, load_model

__all__ = ["add_parser", "parse_condition_items", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``celldit`` subcommand parsers."""
    from .parsing import at_least

    p = subparsers.add_parser(
        "generate", help="sample new cells under a condition from a trained model",
        description="Sample --n new cells under --condition (KEY=VALUE for the perturbation key and each "
                    "registered covariate).")
    p.add_argument("model", type=Path, help="model folder written by `celldit fit`")
    p.add_argument("--condition", required=True, nargs="+", metavar="KEY=VALUE",
                   help="the condition, e.g. perturbation=STAT1 (a bare LABEL means perturbation key=LABEL)")
    p.add_argument("--n", type=at_least(1), required=True, help="number of cells")
    add_sampling_arguments(p, support="balance")
    p.set_defaults(func=run)
    return p


def parse_condition_items(items: list[str], perturbation_key: str) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{K: V}``; a bare ``LABEL`` stands for ``perturbation_key=LABEL``."""
    cond: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            key, value = perturbation_key, item
        key, value = key.strip(), value.strip()
        if not key or not value:
            raise ValueError(f"--condition {item!r}: expected KEY=VALUE, e.g. {perturbation_key}=STAT1")
        if key in cond:
            raise ValueError(f"--condition gives {key!r} twice")
        cond[key] = value
    return cond


def run(args: argparse.Namespace) -> int:
    """Sample and write the cells; returns the exit code (0)."""
    out = check_out(args.out, args.overwrite)
    model = load_model(args.model)
    spec = model.spec
    cond = parse_condition_items(args.condition, spec.perturbation_key)
    known = {spec.perturbation_key, *spec.covariate_keys, *([spec.dose_key] if spec.dose_key else [])}
    unknown = sorted(set(cond) - known)
    if unknown:
        raise ValueError(f"--condition: key(s) {unknown} are not registered with the model (it knows {sorted(known)})")
    if spec.perturbation_key in cond:
        check_labels(model, [cond[spec.perturbation_key]])
    if args.chunk_size:
        model.config.sampler.batch_size = args.chunk_size
    cells = model.generate(cond, n=args.n, steps=args.steps, method=args.method, cfg_scale=args.cfg_scale,
                           seed=args.seed, counts=args.counts, raw_layer=args.raw_layer, out=out,
                           overwrite=args.overwrite, support=args.support)
    cells.file.close()
    shown = ", ".join(f"{k}={v}" for k, v in cond.items())
    print(f"wrote {cells.n_obs} cells x {cells.n_vars} genes under {shown} to {out}")
    return 0
