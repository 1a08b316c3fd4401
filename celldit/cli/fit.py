"""``celldit fit``: register an AnnData, train a :class:`~celldit.cells.model.CellDiT`, save it.

Example::

    celldit fit data.h5ad --perturbation-key perturbation --control control \\
        --pair-keys bio_rep --holdout bio_rep=rep_3 --max-steps 1000 --out runs/model
    celldit fit data.h5ad --config configs/papalexi_rep3.yaml --out runs/model
    celldit fit --config configs/papalexi_rep3.yaml --print-config     # every setting, as YAML

Every option is generated from :class:`~celldit.cells.config.CellDiTConfig` (the model),
:class:`~celldit.cells.config.CellFitConfig` (the training, with a nested ``trainer``
section) and the run options below; ``--config`` reads the same names from YAML and
flags given after it override it. ``--holdout KEY=VALUE`` removes the cells with
``obs[KEY] == VALUE`` from training (several rules add up; ``K1=V1&K2=V2`` removes the
cells matching both); the model folder records it in ``holdout.json`` and the full
settings in ``fit_config.yaml`` (which ``--config`` accepts back). Logs and resumable
checkpoints go to ``--run-dir`` (default ``OUT.run``); ``--resume`` continues from one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from jsonargparse.typing import PositiveInt

__all__ = ["build_parser", "run"]

PROG = "celldit fit"
#: fit settings whose name is taken by a model setting, and their flag
FIT_RENAMES = {"seed": "fit_seed"}


def build_parser():
    """The ``celldit fit`` parser (jsonargparse), generated from the settings classes."""
    from ..cells.config import CellDiTConfig, CellFitConfig
    from .config_args import add_dataclass_options, config_parser

    parser = config_parser(PROG, "Register an AnnData (keys, control labels, genes), train a CellDiT with "
                                 "rectified flow and save it (model.safetensors + JSON) to --out.")
    run = parser.add_argument_group("run")
    run.add_argument("--data", type=str | None, default=None,
                     help="training cells (.h5ad; counts or log-normalised); also the first free argument: "
                          "celldit fit DATA ...")
    run.add_argument("--out", type=str | None, default=None, help="model folder to create (must not exist)")
    run.add_argument("--holdout", type=str | list[str] | dict[str, str | list[str]], default=[],
                     help="remove cells with obs[KEY] == VALUE from training (several rules add up; "
                          "K1=V1&K2=V2 removes the cells matching both)")
    run.add_argument("--backed", type=bool, default=False, help="leave DATA's matrices on disk (.h5ad backed='r', or a .zarr store), read in chunks")
    run.add_argument("--threads", type=PositiveInt | None, default=None, help="torch and BLAS CPU threads (null: unchanged)")
    run.add_argument("--run-dir", type=str | None, default=None,
                     help="folder of Lightning logs and resumable checkpoints (default: OUT.run)")
    run.add_argument("--resume", type=str | None, default=None,
                     help="a checkpoint (RUN_DIR/checkpoints/last.ckpt) of an interrupted fit with the same "
                          "settings: continue it")
    lists = {"--holdout", "--backed?"}
    add_dataclass_options(parser, CellDiTConfig, title="model (CellDiTConfig)", lists=lists)
    add_dataclass_options(parser, CellFitConfig, title="training (CellFitConfig)", rename=FIT_RENAMES, lists=lists)
    parser.list_flags, parser.positional = lists, "--data"
    return parser


def _genes(value: Any) -> str | list[str]:
    """all | hvg | var:COLUMN | a list | a text file of gene names (one per line)."""
    if isinstance(value, (list, tuple)):
        return [str(g) for g in value]
    if value in ("all", "hvg") or str(value).startswith("var:"):
        return value
    path = Path(str(value))
    if not path.is_file():
        raise FileNotFoundError(f"--genes {str(value)!r}: use all, hvg, var:COLUMN or a text file of gene names "
                                "(not found)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _read(path: str | Path, backed: bool):
    from ..data.files import read_cells

    return read_cells(path, "DATA", backed=backed)


def configs_of(cfg) -> tuple[Any, Any]:
    """The :class:`CellDiTConfig` and :class:`CellFitConfig` of parsed options."""
    from ..cells.config import CellDiTConfig, CellFitConfig
    from .config_args import section

    model_names = [f.name for f in dataclasses.fields(CellDiTConfig)]
    fit_names = [f.name for f in dataclasses.fields(CellFitConfig)]
    model = section(cfg, model_names)
    model["genes"] = _genes(model["genes"])
    return CellDiTConfig(**model), CellFitConfig(**section(cfg, fit_names, FIT_RENAMES))


def run(cfg, parser) -> int:
    """Train and save; returns the exit code (0)."""
    from ..cells.effects import evidence_summary
    from ..cells.model import CellDiT
    from ..data.splits import holdout_mask, holdout_record, parse_holdout
    from ..options import to_dict
    from ..train.trainer import set_threads

    missing = [flag for flag, value in (("DATA", cfg.data), ("--out", cfg.out)) if not value]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (give them as arguments or in --config)")
    model_config, fit_config = configs_of(cfg)
    out = Path(cfg.out)
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists: choose a new model folder")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else out.with_name(out.name + ".run")
    set_threads(cfg.threads)
    start = time.perf_counter()
    adata = _read(cfg.data, bool(cfg.backed))
    holdout = parse_holdout(cfg.holdout)
    held = holdout_mask(adata.obs, holdout)
    train = adata[~held] if held.any() else adata
    if train.n_obs == 0:
        raise ValueError("--holdout removes every cell: nothing left to train on")
    model = CellDiT(train, model_config).fit(fit_config, run_dir=run_dir, resume=cfg.resume)
    record = holdout_record(adata.obs, {**to_dict(model_config), "data": cfg.data}, holdout, held)
    record["model_perturbations_seen"] = list(model.vocab.seen)
    settings = parser.dump(cfg, skip_none=False, format="yaml")
    model.save(out, extra_files={"holdout": record}, extra_text={"fit_config.yaml": settings})
    wall = time.perf_counter() - start
    n_cond = sum(1 for names, _ in model.conditions.keys if names)
    print(f"trained on {train.n_obs} cells x {len(model.genes)} genes ({int(held.sum())} held out), "
          f"{n_cond} perturbed conditions + control, {model.history['steps']} steps, "
          f"final loss {model.history['final_loss']:.4f}, {wall:.1f} s")
    print(f"evidence of an effect per condition: {evidence_summary(model.effects())} ({out / 'effects.csv'})")
    print(f"model: {out}  (logs and checkpoints: {run_dir})")
    return 0
