"""``celldit fit``: register an AnnData, train a :class:`~celldit.api.CellDiT`, save it.

Example::

    celldit fit data.h5ad --perturbation-key perturbation --control control \\
        --pair-keys bio_rep --holdout bio_rep=rep_3 --max-steps 1000 --out runs/model
    celldit fit data.h5ad --config configs/papalexi_rep3.yaml --out runs/model

``--config`` reads a YAML file whose keys are the option names in snake_case
(``perturbation_key``, ``max_steps`` ...); flags given on the command line override it.
``--holdout KEY=VALUE`` removes the cells with ``obs[KEY] == VALUE`` from training
(repeatable; ``K1=V1&K2=V2`` removes the cells matching both, e.g. one cell type's
stimulated cells); what was held out is written to ``holdout.json`` in the model folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FIT_OPTIONS",
    "MODEL_OPTIONS",
    "OPTIONS",
    "add_parser",
    "holdout_mask",
    "load_config",
    "parse_holdout",
    "run",
    "set_threads",
]

#: every option of ``celldit fit`` (the YAML keys of ``--config``) and its default
OPTIONS: dict[str, Any] = {
    "data": None, "out": None, "perturbation_key": None, "control": None, "covariate_keys": [],
    "pair_keys": [], "dose_key": None, "delimiter": "+", "holdout": [], "tokenizer": "module",
    "source": "control", "genes": "all", "n_top_genes": 2000, "max_steps": 1500, "batch_size": 256,
    "lr": 3e-4, "hidden_size": 64, "depth": 2, "cfg_dropout": 0.2, "covariate_dropout": 0.2, "seed": 0,
    "backed": False, "threads": None,
}
#: options passed to the :class:`~celldit.api.CellDiT` constructor, and to ``fit``
MODEL_OPTIONS = ("covariate_keys", "pair_keys", "dose_key", "delimiter", "tokenizer", "source", "genes",
                 "n_top_genes", "hidden_size", "depth", "cfg_dropout", "covariate_dropout", "seed")
FIT_OPTIONS = ("max_steps", "batch_size", "lr")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fit`` on the ``celldit`` subcommand parsers."""
    p = subparsers.add_parser(
        "fit", help="train a CellDiT on an AnnData and save the model folder",
        description="Register an AnnData (keys, control labels, genes), train a CellDiT with rectified "
                    "flow and save it (model.safetensors + JSON) to --out. Options can come from "
                    "--config FILE.yaml (same names, snake_case); flags override the file.")
    p.add_argument("data", nargs="?", default=None, help="training cells (.h5ad; counts or log-normalised)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of options (keys as below, snake_case)")
    p.add_argument("--perturbation-key", default=None, help="obs column of perturbation labels")
    p.add_argument("--control", nargs="+", default=None, metavar="LABEL", help="control label(s)")
    p.add_argument("--covariate-keys", nargs="*", default=None, metavar="KEY",
                   help="obs columns given to the model as context (cell type, donor ...)")
    p.add_argument("--pair-keys", nargs="*", default=None, metavar="KEY",
                   help="obs columns control/target pairs must share (e.g. a replicate); not model inputs")
    p.add_argument("--dose-key", default=None, help="obs column of doses")
    p.add_argument("--delimiter", default=None, help="combination delimiter (default '+')")
    p.add_argument("--holdout", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                   help="remove cells with obs[KEY] == VALUE from training (repeatable; K1=V1&K2=V2 "
                        "removes the cells matching both)")
    p.add_argument("--tokenizer", choices=["gene", "module", "latent"], default=None,
                   help="token per gene, per gene module (default) or per latent chunk")
    p.add_argument("--source", choices=["control", "noise"], default=None,
                   help="flow source: matched control cells (default) or Gaussian noise")
    p.add_argument("--genes", default=None, metavar="all|hvg|FILE.txt",
                   help="gene set: all (default), hvg, or a text file with one gene per line")
    p.add_argument("--n-top-genes", type=int, default=None, help="highly variable genes with --genes hvg")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 1500)")
    p.add_argument("--batch-size", type=int, default=None, help="cells per batch (default 256)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-4)")
    p.add_argument("--hidden-size", type=int, default=None, help="transformer width (default 64)")
    p.add_argument("--depth", type=int, default=None, help="transformer blocks (default 2)")
    p.add_argument("--cfg-dropout", type=float, default=None,
                   help="probability of hiding a training cell's perturbation tokens (default 0.2)")
    p.add_argument("--covariate-dropout", type=float, default=None,
                   help="probability of hiding a training block's covariates, so that a cell type never "
                        "trained with a perturbation is predicted from the cell's state (default 0.2)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backed", action="store_true", default=None,
                   help="open DATA on disk (anndata backed='r') instead of loading it")
    p.add_argument("--threads", type=int, default=None, help="torch and BLAS CPU threads (default: unchanged)")
    p.add_argument("--out", default=None, help="model folder to create (must not exist)")
    p.set_defaults(func=run)
    return p


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Options from a YAML file; ``ValueError`` naming unknown keys."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of option: value")  # noqa: TRY004 - a user error (exit 2)
    unknown = sorted(set(data) - set(OPTIONS))
    if unknown:
        raise ValueError(f"--config {str(path)!r}: unknown key(s) {unknown}; known: {sorted(OPTIONS)}")
    return dict(data)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, int, float)) else [str(v) for v in value]


def merge_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the ``--config`` file, then the flags given on the command line."""
    options = {**OPTIONS, **load_config(args.config)}
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    for name in ("control", "covariate_keys", "pair_keys"):
        options[name] = _as_list(options[name])
    missing = [f"--{n.replace('_', '-')}" for n in ("data", "perturbation_key", "control", "out")
               if options[n] in (None, [])]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (give them as flags or in --config)")
    return options


def parse_holdout(items: Any) -> list[dict[str, str]]:
    """Hold-out rules: ``["KEY=VALUE", "K1=V1&K2=V2", ...]`` (or a ``{KEY: VALUE or [VALUES]}``
    mapping) -> a list of ``{KEY: VALUE}`` rules. A cell is held out when it matches every
    pair of some rule, so rules on one key add values and ``&`` narrows a rule."""
    rules: list[dict[str, str]] = []
    if isinstance(items, Mapping):
        items = [f"{key}={value}" for key, values in items.items() for value in _as_list(values)]
    for item in _as_list(items):
        rule: dict[str, str] = {}
        for part in item.split("&"):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ValueError(f"--holdout {item!r}: expected KEY=VALUE (or KEY=VALUE&KEY=VALUE), "
                                 "e.g. bio_rep=rep_3")
            if key in rule and rule[key] != value:
                raise ValueError(f"--holdout {item!r} asks {key} to equal two values; give two rules instead")
            rule[key] = value
        if rule not in rules:
            rules.append(rule)
    return rules


def holdout_mask(obs, rules: list[dict[str, str]]) -> np.ndarray:
    """Boolean mask of the cells held out: those matching every pair of some rule."""
    held = np.zeros(len(obs), dtype=bool)
    columns: dict[str, np.ndarray] = {}
    for rule in rules:
        match = np.ones(len(obs), dtype=bool)
        for key, value in rule.items():
            if key not in obs.columns:
                raise ValueError(f"--holdout: obs key {key!r} is not in the data (columns: {list(obs.columns)[:20]})")
            column = columns.setdefault(key, obs[key].astype(str).to_numpy())
            if not (column == value).any():
                raise ValueError(f"--holdout: value {value!r} not found in obs[{key!r}]")
            match &= column == value
        held |= match
    return held


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads and limit BLAS to as many (None: leave both unchanged)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def _genes(value: Any) -> str | list[str]:
    if isinstance(value, (list, tuple)):
        return [str(g) for g in value]
    if value in ("all", "hvg"):
        return value
    path = Path(str(value))
    if not path.is_file():
        raise FileNotFoundError(f"--genes {str(value)!r}: use all, hvg or a text file of gene names (not found)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _read(path: str | Path, backed: bool):
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DATA {str(path)!r} does not exist")
    try:
        return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        raise ValueError(f"DATA {str(path)!r} is not a readable .h5ad file: {err}") from None


def holdout_record(obs, options: Mapping[str, Any], rules: list[dict[str, str]], held: np.ndarray) -> dict:
    """What ``holdout.json`` records: the rules, cell counts, and the perturbation labels left
    without training cells; ``split`` is the same rule as a :mod:`celldit.data.splits` dict
    when the rules hold out values of one key."""
    from celldit.data.spec import PerturbationSpec
    from celldit.data.splits import HeldOutPerturbations, HeldOutReplicate

    key = options["perturbation_key"]
    labels = obs[key].astype(str).to_numpy()
    absent = sorted(set(labels[held]) - set(labels[~held]))
    split = None
    keys = {k for rule in rules for k in rule}
    if len(keys) == 1 and all(len(rule) == 1 for rule in rules):
        spec = PerturbationSpec(key, options["control"], options["delimiter"], options["dose_key"],
                                tuple(options["covariate_keys"]))
        hkey, values = keys.pop(), [rule_value for rule in rules for rule_value in rule.values()]
        split = (HeldOutPerturbations(spec, perturbations=values, controls_in_test=False) if hkey == key
                 else HeldOutReplicate(spec, key=hkey, values=values)).to_dict()
    return {"holdout": [dict(rule) for rule in rules], "data": str(options["data"]),
            "n_cells": len(obs), "n_held_out": int(held.sum()), "n_train": int((~held).sum()),
            "labels_not_trained": absent, "split": split}


def run(args: argparse.Namespace) -> int:
    """Train and save; returns the exit code (0)."""
    from celldit.api import CellDiT

    options = merge_options(args)
    out = Path(options["out"])
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists: choose a new model folder")
    set_threads(options["threads"])
    start = time.perf_counter()
    adata = _read(options["data"], bool(options["backed"]))
    holdout = parse_holdout(options["holdout"])
    held = holdout_mask(adata.obs, holdout)
    train = adata[~held] if held.any() else adata
    if train.n_obs == 0:
        raise ValueError("--holdout removes every cell: nothing left to train on")
    model_kwargs = {name: options[name] for name in MODEL_OPTIONS}
    model_kwargs["genes"] = _genes(options["genes"])
    model = CellDiT(train, options["perturbation_key"], options["control"], **model_kwargs)
    model.fit(**{name: options[name] for name in FIT_OPTIONS}, progress_bar=sys.stderr.isatty())
    model.save(out)
    record = holdout_record(adata.obs, options, holdout, held)
    record["model_perturbations_seen"] = list(model.vocab.seen)
    (out / "holdout.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "fit_options.json").write_text(json.dumps(dict(options), indent=2, default=str) + "\n")
    wall = time.perf_counter() - start
    n_cond = sum(1 for names, _ in model.conditions.keys if names)
    print(f"trained on {train.n_obs} cells x {len(model.genes)} genes ({int(held.sum())} held out), "
          f"{n_cond} perturbed conditions + control, {model.history['steps']} steps, "
          f"final loss {model.history['final_loss']:.4f}, {wall:.1f} s")
    print(f"model: {out}")
    return 0
