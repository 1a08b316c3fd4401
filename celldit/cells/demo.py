"""The single-cell demo (``celldit demo``): the bundled Papalexi 2021 screen, end to end.

Stages (progress and timings on stderr):

1. load the Papalexi 2021 THP-1 CRISPR knockout screen bundled with the package
   (:func:`celldit.data.bundled.bundled_papalexi`, sha256-checked);
2. split it with :class:`~celldit.data.splits.HeldOutReplicate`: train on ``bio_rep``
   rep_1 + rep_2, test on rep_3 (``DIR/split.json``);
3. train a :class:`~celldit.cells.model.CellDiT` with :data:`DEMO_SETTINGS` (mirrored in
   ``configs/papalexi_rep3.yaml``; everything else is the defaults of
   :class:`~celldit.cells.config.CellDiTConfig` and :class:`~celldit.cells.config.CellFitConfig`),
   control/target pairs within a replicate;
4. save it to ``DIR/model``;
5. carry rep_3's control cells (all of them, :data:`N_CONTROLS`) to every perturbation with at
   least 40 rep_3 cells (``DIR/counterfactuals.h5ad``);
6. score them beside the baselines (``DIR/report``, see :func:`celldit.eval.report.evaluate`;
   every figure but the UMAP, whose numba compilation alone takes about 15 s:
   ``celldit evaluate`` on the written files draws it).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = [
    "BASELINES",
    "DEMO_SETTINGS",
    "MIN_CELLS",
    "N_CONTROLS",
    "QUICK_SETTINGS",
    "TABLE_METRICS",
    "DemoResult",
    "format_table",
    "run_demo",
]

#: the demo's ``celldit fit`` options beyond the defaults (``configs/papalexi_rep3.yaml``
#: holds the same values; a test checks that they agree)
DEMO_SETTINGS: dict[str, Any] = {
    "perturbation_key": "perturbation",
    "control": ["control"],
    "pair_keys": ["bio_rep"],
    "holdout": ["bio_rep=rep_3"],
}
#: ``--quick``: a tiny run that still goes through every stage (for tests)
QUICK_SETTINGS: dict[str, Any] = {"max_steps": 20, "batch_size": 64, "hidden_size": 32, "depth": 1}
QUICK_CELLS_PER_GROUP = 40  # training cells per (replicate, label) in a quick run
QUICK_CONTROLS = 150  # rep_3 control cells carried in a quick run
BASELINES = ("no_change", "train_mean", "mean_shift", "linear")
MIN_CELLS = 40  # score the perturbations with at least this many rep_3 cells (the DESIGN protocol)
#: rep_3 control cells carried to each perturbation (None: all 666, the DESIGN protocol).
#: The evaluation draws 300 predicted cells with replacement, so a smaller source set is not
#: free: with 300 sources an earlier default model scored E-distance 0.316 instead of 0.297.
N_CONTROLS: int | None = None
MAX_CELLS = 300  # cells a side in the distribution metrics (the DESIGN protocol)
TABLE_METRICS = ("pearson_delta_de20", "pearson_delta_all", "mse_de20", "edistance")


@dataclass
class DemoResult:
    """What :func:`run_demo` did: the report summary, stage wall times (s) and written files."""

    out_dir: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    conditions: list[str] = field(default_factory=list)


@contextmanager
def _stage(key: str, message: str, timings: dict[str, float], log: TextIO):
    print(f"[celldit demo] {message} ...", file=log, flush=True)
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 2)
    print(f"[celldit demo] {key} done in {timings[key]:.1f} s", file=log, flush=True)


def _subsample(obs, keys: list[str], per_group: int, seed: int) -> np.ndarray:
    """Sorted row indices: at most ``per_group`` random rows of each combination of ``keys``."""
    rng = np.random.default_rng(seed)
    groups = obs.groupby(keys, observed=True).indices.values()
    return np.sort(np.concatenate([rng.permutation(rows)[:per_group] for rows in groups]))


def format_table(summary: dict[str, Any], metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """Plain-text table of the mean of each metric per method (model first)."""
    methods = [m for m in ("model", *BASELINES) if isinstance(summary.get(m), dict)]
    width = max(len(m) for m in metrics)
    lines = ["method      " + "  ".join(f"{m:>{width}}" for m in metrics)]
    for method in methods:
        values = [summary[method].get(m) for m in metrics]
        cells = ["nan" if v is None or not np.isfinite(v) else f"{v:.4f}" for v in values]
        lines.append(f"{method:<12}" + "  ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def run_demo(out_dir: str | Path, max_steps: int | None = None, quick: bool = False, threads: int | None = 1,
             progress_bar: bool | None = None, log: TextIO | None = None) -> DemoResult:
    """Run the demo into ``out_dir`` (created; an existing non-empty folder is an error).

    Parameters
    ----------
    out_dir
        Output folder: ``split.json``, ``model/``, ``counterfactuals.h5ad``, ``report/``,
        ``demo.json`` (settings, timings, summary, data provenance).
    max_steps
        Training steps (default: :data:`DEMO_SETTINGS`, or :data:`QUICK_SETTINGS` with ``quick``).
    quick
        A tiny run: a small model, a few steps, at most 40 training cells per replicate and
        label, and 150 rep_3 control cells as sources.
    threads
        torch and BLAS CPU threads (None: leave unchanged). One is as fast as two for these
        small models and does not stall when another process holds a core.
    progress_bar
        Show Lightning's progress bar while training (None: when stderr is a terminal; else a
        loss line every few steps, readable in a log file).
    log
        Stream of the progress messages (default stderr).
    """
    from ..data.bundled import bundled_papalexi
    from ..data.spec import PerturbationSpec
    from ..data.splits import HeldOutReplicate, holdout_record, parse_holdout
    from ..eval.report import evaluate
    from ..io import write_h5ad_atomic
    from ..options import to_dict
    from ..train.trainer import set_threads
    from .config import CellDiTConfig, CellFitConfig
    from .effects import evidence_summary
    from .model import CellDiT

    log = sys.stderr if log is None else log
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {str(out)!r} already exists and is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    set_threads(threads)
    settings = dict(DEMO_SETTINGS)
    if quick:
        settings.update(QUICK_SETTINGS)
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {max_steps}")
        settings["max_steps"] = max_steps
    model_settings = {k: v for k, v in settings.items() if k in CellDiTConfig.__dataclass_fields__}
    fit_settings = {k: v for k, v in settings.items() if k in CellFitConfig.__dataclass_fields__}
    config = CellDiTConfig(**model_settings)
    fit_config = CellFitConfig(**fit_settings, trainer={"progress_bar": progress_bar, "logger": None})
    key = config.perturbation_key
    rules = parse_holdout(settings["holdout"])
    split_key = next(iter(rules[0]))
    split_values = [rule[split_key] for rule in rules]
    timings: dict[str, float] = {}
    files: dict[str, Path] = {}
    start = time.perf_counter()

    with _stage("load", "load the bundled Papalexi 2021 screen", timings, log):
        adata, provenance = bundled_papalexi()
        print(f"  {adata.n_obs} cells x {adata.n_vars} genes; {provenance['study'].split(',')[0]} "
              f"({provenance['accession']}); provenance: celldit/data/bundled/PROVENANCE.md", file=log)

    with _stage("split", f"split: hold out {split_key}={','.join(split_values)}", timings, log):
        spec = PerturbationSpec(key, config.control)
        split = HeldOutReplicate(spec, key=split_key, values=list(split_values))
        masks = split.masks(adata)
        files["split"] = split.save(out / "split.json")
        train, test = adata[masks.train].copy(), adata[masks.test].copy()
        if quick:
            train = train[_subsample(train.obs, [split_key, key], QUICK_CELLS_PER_GROUP, config.seed)].copy()
        print(f"  train {train.n_obs} cells, test {test.n_obs} cells", file=log)

    with _stage("train", f"train CellDiT ({fit_config.max_steps} steps)", timings, log):
        model = CellDiT(train, config).fit(fit_config)
        print(f"  final loss {model.history['final_loss']:.4f}", file=log)

    with _stage("save", "save the model", timings, log):
        record = holdout_record(adata.obs, {**to_dict(config), "data": provenance["path"]}, rules, ~masks.train)
        files["model"] = model.save(out / "model", extra_files={"holdout": record})
        print(f"  evidence of an effect per perturbation: {evidence_summary(model.effects())} "
              f"(model/effects.csv)", file=log)

    with _stage("sample", "sample counterfactual cells", timings, log):
        labels = test.obs[key].astype(str)
        counts = labels[~np.isin(labels, spec.control_labels)].value_counts()
        conditions = sorted(str(p) for p, n in counts.items() if n >= MIN_CELLS)
        controls = test[np.isin(labels, spec.control_labels)]
        n_controls = QUICK_CONTROLS if quick else N_CONTROLS
        rng = np.random.default_rng(config.seed)
        if n_controls is not None:
            controls = controls[np.sort(rng.permutation(controls.n_obs)[:n_controls])]
        pred = model.counterfactual(controls.copy(), conditions, seed=config.seed)
        files["counterfactuals"] = write_h5ad_atomic(pred, out / "counterfactuals.h5ad")
        print(f"  {controls.n_obs} {split_values[0]} control cells x {len(conditions)} perturbations "
              f"= {pred.n_obs} cells", file=log)

    with _stage("evaluate", "evaluate beside the baselines", timings, log):
        result = evaluate(test, pred, spec, train=train, baselines=list(BASELINES), min_cells=MIN_CELLS,
                          max_cells=MAX_CELLS, out_dir=out / "report", split=split.to_dict(), seed=config.seed,
                          umap=False, loss_curve=(model.history["loss_steps"], model.history["losses"]))
        files.update({f"report_{k}": v for k, v in result.files.items()})

    timings["total"] = round(time.perf_counter() - start, 2)
    record = {"settings": settings, "model": to_dict(config), "fit": to_dict(fit_config), "quick": quick, "timings_s": timings, "conditions": conditions,
              "summary": {m: {k: result.summary[m].get(k) for k in TABLE_METRICS}
                          for m in ("model", *BASELINES) if m in result.summary},
              "n_conditions": result.summary["n_conditions"], "data": provenance}
    files["demo"] = out / "demo.json"
    files["demo"].write_text(json.dumps(record, indent=2, default=str) + "\n")
    return DemoResult(out, result.summary, timings, files, conditions)
