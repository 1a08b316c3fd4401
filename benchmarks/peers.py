"""Peer models (CellFlow, CPA) on the splits of ``benchmarks/cells.py``, scored by celldit.

Each peer runs in its own virtual environment (they are not celldit dependencies and never run
in CI); this script, run in celldit's environment, writes each split as .h5ad files, launches
the peer's runner (``benchmarks/peer_runners/*_runner.py``) as a subprocess with that
environment's Python and scores the predicted cells with :func:`celldit.eval.report.evaluate`
exactly as ``benchmarks/cells.py`` does (same conditions, same ``min_cells``, the same
baselines beside, evaluated with the run's seed). See ``benchmarks/PEERS.md``.

Set the peers up once (pip reads the configured index; versions pinned below)::

    python benchmarks/peers.py --setup --peer cellflow cpa --venv-dir ~/.cache/celldit-peers

which runs, for CellFlow (Python 3.11) and CPA (Python 3.10: cpa-tools 0.8 needs torch < 2,
and torch 1.13 does not import on Python 3.11)::

    python3.11 -m venv DIR/cellflow && DIR/cellflow/bin/pip install <CELLFLOW_PINS>
    python3.10 -m venv DIR/cpa && DIR/cpa/bin/pip install <CPA_PINS> && \
        DIR/cpa/bin/pip install --no-deps cpa-tools==0.8.1

(``PEERS_PYTHON311`` / ``PEERS_PYTHON310`` name other interpreters; ``--installer uv`` installs
with uv, whose resolver settles the CPA pins in seconds where pip backtracks for long). Each peer's Python is
``--python-PEER PATH`` when given, else ``--venv-dir DIR`` + ``/PEER/bin/python``; a peer whose
Python is missing or cannot import the package is reported as ``"status": "not installed"``
(with the reason and the setup command) and the run goes on with the others. Then::

    OMP_NUM_THREADS=1 python benchmarks/peers.py --data ../shared/data --protocol papalexi_rep3 \
        --peer cellflow cpa --tune --seeds 0 1 2 --out benchmarks/results/peers_papalexi.json
    OMP_NUM_THREADS=1 python benchmarks/peers.py --data ../shared/data --protocol kang \
        --peer cellflow cpa --settings-from benchmarks/results/peers_papalexi.json \
        --seeds 0 1 2 --out benchmarks/results/peers_kang.json

Protocols:

* ``papalexi_rep3``: train on bio_rep rep_1 + rep_2, predict the perturbations with >= 40 rep_3
  cells from rep_3's control cells (``bio_rep`` is the pairing covariate). ``--tune`` first
  chooses each peer's settings among a small grid (:data:`GRIDS`) on the validation split
  (train rep_1, predict rep_2 from rep_2's controls), by the mean rank over pearson_delta_de20,
  pearson_delta_all, mse_de20 and E-distance; rep_3 is never looked at for that choice.
* ``kang``: for each cell type in turn its stimulated cells are held out and predicted from
  that type's control cells (cell type is the covariate).

Each peer runs with :data:`BUDGET` (its sizes), then the first entry of its grid (its
documented starting point) or the tuned entry or ``--settings-from``'s, then any
``--settings PEER=JSON`` laid over. Prints (and writes with ``--out``) one JSON object: config,
machine, and per protocol each peer's metrics (mean and sd over seeds, and per seed), the
baselines beside (same seeds, same evaluate call), the settings and how they were chosen, wall
times; ``work`` keeps the split folders, the predictions and each run's log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from celldit.bench import emit_report
from celldit.data.expression import log_normalize
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutCovariateGroup, HeldOutReplicate
from celldit.eval.report import evaluate

PAPALEXI = "papalexi2021_thp1_crispr_ko.h5ad"
KANG = "kang2018_pbmc_ifnb_celltypes.h5ad"
METRICS = ("pearson_delta_de20", "pearson_delta_all", "mse_de20", "r2_mean", "edistance")
RANKED = {"pearson_delta_de20": -1, "pearson_delta_all": -1, "mse_de20": 1, "edistance": 1}  # sign: lower rank wins
# as benchmarks/cells.py: papalexi_rep3 (min_cells 40) and kang (min_cells 1)
PAPALEXI_BASELINES = ["no_change", "train_mean", "mean_shift", "linear"]
KANG_BASELINES = ["no_change", "mean_shift", "linear"]
PEERS = ("cellflow", "cpa")
# peers whose predicted cells are the means of a count likelihood (no sampling noise): each is
# also scored with counts drawn from those means (see counts_drawn)
COUNT_MODELS = ("cpa",)
RUNNERS = Path(__file__).resolve().parent / "peer_runners"
DEFAULT_VENV_DIR = Path.home() / ".cache" / "celldit-peers"
CELLFLOW_PINS = ["cellflow-tools==0.0.9", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "ott-jax==0.6.0",
                 "optax==0.2.8", "anndata==0.12.19", "scanpy==1.11.5", "requests"]
# cpa-tools 0.8.1 lists its development tools (jupyter, black, flake8, pytest...) as requirements,
# on which pip's resolver backtracks for a long time: its runtime requirements are installed
# first (pinned to the torch < 2 era), then cpa-tools itself with --no-deps.
CPA_PINS = ["torch==1.13.1", "setuptools<70", "scvi-tools==0.20.3", "pytorch-lightning<2", "rdkit-pypi", "adjustText",
            "seaborn", "numpy<2", "pandas<2", "anndata<0.10", "scanpy<1.10", "jax<0.4.24", "jaxlib<0.4.24", "flax<0.8",
            "chex<0.1.86", "optax<0.1.8", "ml-dtypes<0.3", "scipy<1.12", "pyro-ppl<1.9", "torchmetrics<1.3",
            "orbax-checkpoint<0.5", "requests"]
PYTHONS = {"cellflow": "3.11", "cpa": "3.10"}
DISTRIBUTIONS = {"cellflow": "cellflow-tools", "cpa": "cpa-tools"}
PINS = {"cellflow": CELLFLOW_PINS, "cpa": CPA_PINS}
NO_DEPS = {"cellflow": [], "cpa": ["cpa-tools==0.8.1"]}
# Each peer's grid: the first entry is its documented starting point; the others vary what the
# peer's own documentation names as its regularisers (CellFlow: path noise, dropout) or its
# other documented configuration (CPA: the Norman tutorial's).
GRIDS = {
    "cellflow": {
        "defaults": {},
        "noise0.5_drop0.1": {"noise": 0.5, "hidden_dropout": 0.1, "decoder_dropout": 0.1},
        "noise1_drop0.1": {"noise": 1.0, "hidden_dropout": 0.1, "decoder_dropout": 0.1},
    },
    "cpa": {"kang_tutorial": {"preset": "kang_tutorial"}, "norman_tutorial": {"preset": "norman_tutorial"}},
}
# The sizes every run uses (CPU budget); grid entries and --settings JSON are laid over them.
BUDGET = {
    "cellflow": {"iterations": 12000, "batch_size": 256, "hidden_dims": [512, 512, 512],
                 "decoder_dims": [1024, 1024, 1024], "time_encoder_dims": [512, 512, 512],
                 "condition_embedding_dim": 64, "time_freqs": 128, "lr": 1e-4, "multi_steps": 1, "ode_steps": 10},
    "cpa": {"max_epochs": 200},
}
ENV = {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}


def runner_env(threads: int) -> dict[str, str]:
    """The runners' environment: ``threads`` for OpenMP / BLAS / torch, and XLA on one thread
    (its Eigen pool) when ``threads`` is 1."""
    env = {**os.environ, **ENV}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


# ---------------------------------------------------------------------------------------------
# Peer environments


def peer_python(args: argparse.Namespace, peer: str) -> str:
    """``--python-PEER`` when given, else ``--venv-dir``/PEER/bin/python."""
    given = getattr(args, f"python_{peer}")
    return str(given) if given else str(Path(args.venv_dir).expanduser() / peer / "bin" / "python")


def check_peer(python: str, peer: str, env: dict[str, str]) -> tuple[bool, str]:
    """Whether ``python`` imports ``peer``: ``(True, version)`` or ``(False, reason)``."""
    if not Path(python).exists():
        return False, f"no Python at {python}"
    code = f"import importlib.metadata, {peer}; print(importlib.metadata.version({DISTRIBUTIONS[peer]!r}))"
    try:
        proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False, f"{python} -c 'import {peer}' did not finish in 600 s"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return False, f"{python} cannot import {peer}: {lines[-1] if lines else f'exit {proc.returncode}'}"
    return True, proc.stdout.strip().splitlines()[-1]


def not_installed(peer: str, python: str, reason: str) -> dict:
    return {"status": "not installed", "python": python, "reason": reason,
            "setup": f"python benchmarks/peers.py --setup --peer {peer} --venv-dir DIR (then --venv-dir DIR), "
                     f"or --python-{peer} PATH to a Python that imports {peer}"}


def setup(venv_dir: Path, peers: list[str], env: dict[str, str], installer: str = "pip") -> dict[str, dict]:
    """Create (or re-create) each peer's virtual environment under ``venv_dir``; return, per
    peer, its Python and whether it imports (a failed install is reported, not raised).
    ``installer``: ``pip`` (the environment's own) or ``uv`` (``uv pip install --python``, whose
    resolver settles CPA's pins in seconds where pip backtracks for long)."""
    out = {}
    for peer in peers:
        folder = venv_dir / peer
        python = os.environ.get(f"PEERS_PYTHON{PYTHONS[peer].replace('.', '')}", f"python{PYTHONS[peer]}")
        pip = ([installer, "pip", "install", "--python", str(folder / "bin" / "python")] if installer != "pip"
               else [str(folder / "bin" / "pip"), "install", "-q"])
        print(f"[peers] setup {peer}: {python} -m venv {folder}; {' '.join(pip)} {' '.join(PINS[peer])}"
              + (f"; {' '.join(pip)} --no-deps {' '.join(NO_DEPS[peer])}" if NO_DEPS[peer] else ""),
              file=sys.stderr, flush=True)
        try:
            subprocess.run([python, "-m", "venv", "--clear", str(folder)], check=True)
            subprocess.run([*pip, *PINS[peer]], check=True)
            if NO_DEPS[peer]:
                subprocess.run([*pip, "--no-deps", *NO_DEPS[peer]], check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            out[peer] = {"python": str(folder / "bin" / "python"), "installed": False, "reason": str(err)}
            continue
        ok, message = check_peer(str(folder / "bin" / "python"), peer, env)
        out[peer] = {"python": str(folder / "bin" / "python"), "installed": ok,
                     ("version" if ok else "reason"): message}
    return out


# ---------------------------------------------------------------------------------------------
# Splits


class Split:
    """A split written to ``folder`` (layout in ``benchmarks/peer_runners/common.py``) with the
    cells the scores read: ``train`` and ``held`` (the held-out real cells, controls included)."""

    def __init__(self, folder: Path, train: ad.AnnData, held: ad.AnnData, spec: PerturbationSpec,
                 min_cells: int, baselines: list[str]):
        self.folder, self.train, self.held, self.spec = folder, train, held, spec
        self.min_cells, self.baselines = min_cells, baselines


def write_split(folder: Path, train: ad.AnnData, controls: ad.AnnData, held: ad.AnnData, conditions: pd.DataFrame,
                spec: dict) -> Path:
    """Write a split folder: log1p values in ``X``, counts in ``layers['counts']``;
    ``held.h5ad`` keeps the held-out real cells (counts), which the runners never read."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = [spec["perturbation_key"], *spec["covariate_keys"], *spec["pair_keys"]]
    for name, cells in (("train", train), ("controls", controls)):
        obs = cells.obs[keep].copy()
        out = log_normalize(ad.AnnData(cells.X.copy(), obs=obs, var=pd.DataFrame(index=cells.var_names)))
        out.write_h5ad(folder / f"{name}.h5ad")
    held.write_h5ad(folder / "held.h5ad")
    conditions.to_csv(folder / "conditions.csv", index=False)
    (folder / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def papalexi_split(raw: ad.AnnData, train_reps: list[str], held_rep: str, folder: Path, min_cells: int = 40) -> Split:
    """Train on ``train_reps``, predict ``held_rep``'s perturbations with >= ``min_cells`` cells
    from its controls (``benchmarks/cells.py``'s papalexi_rep3 with rep_1 + rep_2 / rep_3)."""
    spec = PerturbationSpec("perturbation", control="control")
    cells = raw[raw.obs["bio_rep"].isin([*train_reps, held_rep]).to_numpy()].copy()
    masks = HeldOutReplicate(spec, key="bio_rep", values=[held_rep]).masks(cells)
    train, held = cells[masks.train].copy(), cells[masks.test].copy()
    labels = held.obs["perturbation"].astype(str)
    keep = sorted(lab for lab, n in labels.value_counts().items() if n >= min_cells and lab != "control")
    conditions = pd.DataFrame({"condition": keep, "perturbation": keep, "bio_rep": held_rep})
    meta = {"perturbation_key": "perturbation", "control": "control", "covariate_keys": [], "pair_keys": ["bio_rep"]}
    write_split(folder, train, held[(labels == "control").to_numpy()].copy(), held, conditions, meta)
    return Split(folder, train, held, spec, min_cells, PAPALEXI_BASELINES)


def kang_split(raw: ad.AnnData, cell_type: str, folder: Path) -> Split:
    """Hold out ``cell_type``'s stimulated cells, predicted from its control cells."""
    spec = PerturbationSpec("group_id", control="ctrl", covariate_keys=("cluster_id",))
    masks = HeldOutCovariateGroup(spec, key="cluster_id", values=[cell_type]).masks(raw)
    train, held = raw[masks.train].copy(), raw[masks.test].copy()
    conditions = pd.DataFrame({"condition": ["stim"], "group_id": ["stim"], "cluster_id": [cell_type]})
    meta = {"perturbation_key": "group_id", "control": "ctrl", "covariate_keys": ["cluster_id"], "pair_keys": []}
    controls = held[(held.obs["group_id"].astype(str) == "ctrl").to_numpy()].copy()
    write_split(folder, train, controls, held, conditions, meta)
    return Split(folder, train, held, spec, 1, KANG_BASELINES)


# ---------------------------------------------------------------------------------------------
# Running and scoring


class PeerFailed(RuntimeError):
    """A runner exited with an error (its log's tail in the message)."""


def run_peer(python: str, peer: str, folder: Path, seed: int, settings: dict, tag: str,
             env: dict[str, str], reuse: bool = False) -> tuple[Path, dict]:
    """Run ``peer``'s runner on a split folder; return the prediction's path and the run's info.
    ``reuse``: a prediction of the same run already in the folder is taken as it is (re-scoring)."""
    out = folder / f"pred_{peer}_{tag}_seed{seed}.h5ad"
    if reuse and out.exists() and out.with_suffix(".json").exists():
        info = json.loads(out.with_suffix(".json").read_text())
        if info.get("seed") == seed:
            print(f"[peers] {peer} {tag} seed {seed}: reusing {out}", file=sys.stderr, flush=True)
            info.setdefault("wall_s", None)
            return out, info
    cmd = [python, str(RUNNERS / f"{peer}_runner.py"), "--split", str(folder), "--seed", str(seed),
           "--settings", json.dumps(settings), "--out", str(out)]
    print(f"[peers] {peer} {tag} seed {seed}: {folder.name}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    if proc.returncode != 0:
        tail = out.with_suffix(".log").read_text()[-3000:]
        raise PeerFailed(f"{peer} runner failed ({proc.returncode}); log {out.with_suffix('.log')}\n{tail}")
    info = json.loads(out.with_suffix(".json").read_text())
    info["wall_s"] = round(time.perf_counter() - t0, 2)
    return out, info


def score(split: Split, pred: ad.AnnData | None, seed: int) -> dict:
    """celldit's scores of ``pred`` (as ``model``) and the split's baselines in one evaluate call:
    method -> metric -> mean over conditions (rounded as ``benchmarks/cells.py`` does)."""
    res = evaluate(split.held, pred, split.spec, train=split.train, min_cells=split.min_cells,
                   baselines=split.baselines, seed=seed, figures=False, cell_eval=False)
    methods = (["model"] if pred is not None else []) + list(split.baselines)
    out = {m: {k: (None if res.summary[m][k] is None else round(float(res.summary[m][k]), 4))
               for k in METRICS if k in res.summary[m]} for m in methods}
    out["n_conditions"] = res.summary["n_conditions"]
    return out


def counts_drawn(pred: ad.AnnData, controls: ad.AnnData, seed: int) -> ad.AnnData:
    """Cells with counts drawn from a count model's predicted means.

    ``pred.X`` holds log1p(normalize_total(mean counts, 1e4)) of one copy of ``controls`` per
    condition, in the controls' order (the CPA runner's output: its tutorial's normalised
    negative-binomial means). The means are brought back to each source cell's library size
    (``controls.layers['counts']``), counts are drawn from a Poisson of those means (the least
    dispersed count law: the model's own dispersion is not saved) and normalised like the data.
    Means alone have no zeros and no sampling noise, which a distribution metric (E-distance)
    penalises and a mean metric does not; scoring both shows which is which.
    """
    n = controls.n_obs
    if n == 0 or pred.n_obs % n:
        raise ValueError(f"pred has {pred.n_obs} cells, not a multiple of the {n} control cells")
    library = np.asarray(controls.layers["counts"].sum(1), dtype=np.float64).ravel()
    x = np.asarray(pred.X.toarray() if hasattr(pred.X, "toarray") else pred.X, dtype=np.float64)
    means = np.expm1(x) * np.tile(library, pred.n_obs // n)[:, None] / 1e4
    counts = np.random.default_rng(seed).poisson(np.clip(means, 0.0, None)).astype(np.float32)
    out = ad.AnnData(counts, obs=pred.obs.copy(), var=pred.var.copy())
    return log_normalize(out)


def mean_sd(runs: list[dict]) -> dict:
    """``{"mean": {metric: ..}, "sd": {metric: ..}}`` over runs (sd with ddof=1; None for one run)."""
    keys = [k for k in METRICS if runs and all(r.get(k) is not None for r in runs)]
    vals = {k: np.array([r[k] for r in runs], dtype=float) for k in keys}
    return {"mean": {k: round(float(v.mean()), 4) for k, v in vals.items()},
            "sd": {k: (round(float(v.std(ddof=1)), 4) if len(v) > 1 else None) for k, v in vals.items()}}


def choose(scores: dict[str, dict]) -> tuple[str, dict]:
    """The grid entry with the best mean rank over :data:`RANKED` (a missing value ranks last;
    ties: first listed)."""
    names = list(scores)
    ranks = {n: 0.0 for n in names}
    for metric, sign in RANKED.items():
        values = {n: (np.inf if scores[n].get(metric) is None else sign * scores[n][metric]) for n in names}
        order = pd.Series(values).rank(method="average")
        for n in names:
            ranks[n] += order[n] / len(RANKED)
    best = min(names, key=lambda n: ranks[n])
    return best, {n: round(float(r), 3) for n, r in ranks.items()}


def run_seeds(python: str, peer: str, split: Split, seeds: list[int], settings: dict, tag: str,
              env: dict[str, str], reuse: bool = False) -> dict:
    """Run and score one peer over seeds on one split: per seed and mean/sd, baselines beside
    (and, for a count model, the scores of counts drawn from its means)."""
    per_seed, base, info = {}, {b: [] for b in split.baselines}, {}
    controls = ad.read_h5ad(split.folder / "controls.h5ad") if peer in COUNT_MODELS else None
    for seed in seeds:
        path, info = run_peer(python, peer, split.folder, seed, settings, tag, env, reuse)
        pred = ad.read_h5ad(path)
        scores = score(split, pred, seed)
        drawn = {}
        if controls is not None:
            drawn = {"metrics_counts_drawn": score(split, counts_drawn(pred, controls, seed), seed)["model"]}
        per_seed[str(seed)] = {"metrics": scores["model"], **drawn, "n_conditions": scores["n_conditions"],
                               **{k: info.get(k) for k in ("wall_s", "setup_s", "train_s", "predict_s", "final_loss",
                                                           "epochs")
                                  if k in info}}
        for b in split.baselines:
            base[b].append(scores[b])
        print(f"[peers] {peer} {tag} seed {seed}: {json.dumps(scores['model'])}", file=sys.stderr, flush=True)
    drawn = ({"metrics_counts_drawn": mean_sd([r["metrics_counts_drawn"] for r in per_seed.values()])}
             if peer in COUNT_MODELS else {})
    walls = [r["wall_s"] for r in per_seed.values() if r.get("wall_s") is not None]
    return {"status": "ok", "settings": settings, "runner_settings": info.get("settings"), "version": info.get("version"),
            "metrics": mean_sd([r["metrics"] for r in per_seed.values()]), **drawn, "per_seed": per_seed,
            "wall_s_total": round(sum(walls), 1) if walls else None,
            "baselines": {b: mean_sd(v) for b, v in base.items()}}


def baselines_only(split: Split, seeds: list[int]) -> dict:
    """The baselines alone (``evaluate`` without a prediction), for a protocol no peer ran on."""
    runs = [score(split, None, seed) for seed in seeds]
    return {b: mean_sd([r[b] for r in runs]) for b in split.baselines}


# ---------------------------------------------------------------------------------------------
# Settings


def base_settings(peer: str, args: argparse.Namespace) -> tuple[dict, str]:
    """The settings before tuning: budget, then ``--settings-from``'s (else the grid's first
    entry), then ``--settings PEER=JSON``; with how they were chosen."""
    settings = dict(BUDGET[peer])
    how = f"grid entry {next(iter(GRIDS[peer]))!r} (documented defaults)"
    if args.settings_from is not None:
        earlier = json.loads(Path(args.settings_from).read_text())
        found = [v["peers"][peer]["settings"] for v in earlier.values()
                 if isinstance(v, dict) and v.get("peers", {}).get(peer, {}).get("settings")]
        if found:
            settings.update(found[0])
            how = f"settings of {args.settings_from}"
        else:
            settings.update(next(iter(GRIDS[peer].values())))
    else:
        settings.update(next(iter(GRIDS[peer].values())))
    if peer in args.settings:
        settings.update(args.settings[peer])
        how += f" + --settings {json.dumps(args.settings[peer])}"
    return settings, how


def tune(python: str, peer: str, valid: Split, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """Each grid entry over the budget (and ``--settings``), scored on the validation split with
    the first seed; the chosen entry by :func:`choose`."""
    seed, scores, infos = args.seeds[0], {}, {}
    for name, entry in GRIDS[peer].items():
        settings = {**BUDGET[peer], **entry, **args.settings.get(peer, {})}
        path, info = run_peer(python, peer, valid.folder, seed, settings, f"tune_{name}", env, args.reuse)
        scores[name] = score(valid, ad.read_h5ad(path), seed)["model"]
        infos[name] = {"settings": info["settings"], "wall_s": info["wall_s"]}
        print(f"[peers] tune {peer} {name}: {json.dumps(scores[name])}", file=sys.stderr, flush=True)
    best, ranks = choose(scores)
    return {"chosen": best, "settings": {**BUDGET[peer], **GRIDS[peer][best], **args.settings.get(peer, {})},
            "mean_rank": ranks, "scores": scores, "runs": infos, "split": "train rep_1, predict rep_2", "seed": seed}


def run_protocol_peer(peer: str, pythons: dict, split: Split, settings: dict, tag: str, args, env) -> dict:
    """One peer on one split; a runner failure (or unreadable / unscorable output) becomes
    ``{"status": "failed", "error": ...}``."""
    try:
        return run_seeds(pythons[peer], peer, split, args.seeds, settings, tag, env, args.reuse)
    except (PeerFailed, OSError, ValueError, KeyError) as err:
        print(f"[peers] {peer} failed: {err!r}", file=sys.stderr, flush=True)
        return {"status": "failed", "error": f"{type(err).__name__}: {err}"[-2000:]}


# ---------------------------------------------------------------------------------------------
# Protocols


def papalexi_rep3(data: Path, args, pythons: dict, skipped: dict, work: Path, env) -> dict:
    raw = ad.read_h5ad(data / PAPALEXI)
    split = papalexi_split(raw, ["rep_1", "rep_2"], "rep_3", work / "papalexi_rep3", args.min_cells)
    out = {"split": "train rep_1 + rep_2, predict rep_3 from rep_3 controls", "min_cells": args.min_cells,
           "n_conditions": int(pd.read_csv(split.folder / "conditions.csv").shape[0]), "peers": {}}
    valid = None
    for peer in args.peer:
        if peer in skipped:
            out["peers"][peer] = skipped[peer]
            continue
        settings, how = base_settings(peer, args)
        tuning = None
        if args.tune:
            valid = valid or papalexi_split(raw, ["rep_1"], "rep_2", work / "papalexi_valid", args.min_cells)
            try:
                tuning = tune(pythons[peer], peer, valid, args, env)
            except PeerFailed as err:
                out["peers"][peer] = {"status": "failed", "stage": "tuning", "error": str(err)[-2000:]}
                continue
            settings, how = tuning["settings"], f"tuned: grid entry {tuning['chosen']!r} on train rep_1 / rep_2"
        res = run_protocol_peer(peer, pythons, split, settings, "rep3", args, env)
        out["peers"][peer] = {**res, "chosen_by": how, **({"tuning": tuning} if tuning else {})}
    if not any(v.get("status") == "ok" for v in out["peers"].values()):
        out["baselines"] = baselines_only(split, args.seeds)
    return out


def kang(data: Path, args, pythons: dict, skipped: dict, work: Path, env) -> dict:
    raw = ad.read_h5ad(data / KANG)
    out = {"split": "per cell type: its stimulated cells held out, predicted from its control cells",
           "cell_types": {}}
    settings = {peer: base_settings(peer, args) for peer in args.peer if peer not in skipped}
    types = args.cell_types or sorted(raw.obs["cluster_id"].astype(str).unique())
    for cell_type in types:
        split = kang_split(raw, cell_type, work / f"kang_{cell_type.replace(' ', '_')}")
        entry = {}
        for peer in args.peer:
            if peer in skipped:
                entry[peer] = skipped[peer]
                continue
            res = run_protocol_peer(peer, pythons, split, settings[peer][0], "kang", args, env)
            entry[peer] = {**res, "chosen_by": settings[peer][1]}
            if res["status"] == "ok":
                m, b = res["metrics"]["mean"], res["baselines"]["mean_shift"]["mean"]
                entry[peer]["beats_mean_shift_r2_and_pd_de20"] = bool(
                    m["r2_mean"] > b["r2_mean"] and m["pearson_delta_de20"] > b["pearson_delta_de20"])
        if not any(v.get("status") == "ok" for v in entry.values()):
            entry["baselines"] = baselines_only(split, args.seeds)
        out["cell_types"][cell_type] = entry
    summary = {}
    for peer in args.peer:
        done = [out["cell_types"][t][peer] for t in types if out["cell_types"][t][peer].get("status") == "ok"]
        if done:
            summary[peer] = {"cell_types": len(done),
                             "cell_types_beating_mean_shift": sum(d["beats_mean_shift_r2_and_pd_de20"] for d in done),
                             "metrics": mean_sd([d["metrics"]["mean"] for d in done])["mean"],
                             **({"metrics_counts_drawn": mean_sd([d["metrics_counts_drawn"]["mean"] for d in done])["mean"]}
                                if all("metrics_counts_drawn" in d for d in done) else {}),
                             "baselines": {b: mean_sd([d["baselines"][b]["mean"] for d in done])["mean"]
                                           for b in KANG_BASELINES}}
    out["mean_over_cell_types"] = summary
    return out


PROTOCOLS = {"papalexi_rep3": papalexi_rep3, "kang": kang}


def _settings_arg(text: str) -> tuple[str, dict]:
    peer, _, value = text.partition("=")
    if peer not in PEERS or not value:
        raise argparse.ArgumentTypeError(f"expected PEER=JSON with PEER in {PEERS}, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--settings {peer}: not JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"--settings {peer}: expected a JSON object")
    return peer, parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with the shared .h5ad files")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), action="append")
    parser.add_argument("--peer", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--venv-dir", type=Path, default=DEFAULT_VENV_DIR,
                        help="folder of the peers' virtual environments (DIR/PEER/bin/python; default %(default)s)")
    for peer in PEERS:
        parser.add_argument(f"--python-{peer}", type=Path, default=None,
                            help=f"the Python of {peer}'s environment (overrides --venv-dir), "
                                 f"e.g. /path/to/{peer}-venv/bin/python")
    parser.add_argument("--setup", action="store_true", help="create the --peer environments under --venv-dir")
    parser.add_argument("--installer", default="pip",
                        help="--setup: 'pip' (each environment's own) or a uv executable ('uv' or a path), "
                             "run as 'UV pip install --python ENV/bin/python'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tune", action="store_true",
                        help="papalexi_rep3: choose each peer's grid entry on train rep_1 / predict rep_2 first")
    parser.add_argument("--settings", action="append", type=_settings_arg, default=[], metavar="PEER=JSON",
                        help="settings laid over the budget and grid entry, e.g. cellflow='{\"iterations\": 300}'")
    parser.add_argument("--settings-from", type=Path, default=None,
                        help="an earlier --out JSON: each peer's chosen settings (e.g. tuned on papalexi)")
    parser.add_argument("--min-cells", type=int, default=40, help="papalexi_rep3: conditions with >= this many cells")
    parser.add_argument("--cell-types", nargs="+", default=None, help="kang: hold out only these cell types")
    parser.add_argument("--threads", type=int, default=1, help="threads of each runner (OpenMP, BLAS, XLA)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the splits, predictions and logs (default: a new temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="take predictions already in --work as they are (re-score without re-running)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.settings = dict(args.settings)
    env = runner_env(args.threads)
    if args.setup:
        print(json.dumps(setup(args.venv_dir.expanduser(), args.peer, env, args.installer), indent=2))
        return 0
    if args.data is None or not args.protocol:
        parser.error("--data and --protocol are needed (or --setup)")
    pythons = {peer: peer_python(args, peer) for peer in args.peer}
    skipped, versions = {}, {}
    for peer in args.peer:
        ok, message = check_peer(pythons[peer], peer, env)
        if ok:
            versions[peer] = message
        else:
            skipped[peer] = not_installed(peer, pythons[peer], message)
            print(f"[peers] {peer} not installed: {message}", file=sys.stderr, flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="celldit-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("out", "setup", "installer")}
    result = {"config": {**config, "work": str(work), "pythons": pythons},
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "runner_threads": args.threads, "peer_versions": versions}}
    for name in args.protocol:
        t0 = time.perf_counter()
        result[name] = PROTOCOLS[name](args.data, args, pythons, skipped, work, env)
        result[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    emit_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
