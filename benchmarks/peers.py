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

    python3.11 -m venv DIR/cellflow && DIR/cellflow/bin/pip install <CELLFLOW_PINS>   # in peer_envs.py
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
  chooses each peer's settings among a small grid (:data:`peer_settings.GRIDS`) on the validation split
  (train rep_1, predict rep_2 from rep_2's controls), by the mean rank over pearson_delta_de20,
  pearson_delta_all, mse_de20 and E-distance; rep_3 is never looked at for that choice.
* ``kang``: for each cell type in turn its stimulated cells are held out and predicted from
  that type's control cells (cell type is the covariate).

Each peer runs with :data:`peer_settings.BUDGET` (its sizes), then the first entry of its grid (its
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, also when imported by tests

from peer_envs import DEFAULT_VENV_DIR, check_peer, not_installed, peer_python, runner_env, setup
from peer_settings import BUDGET, GRIDS, base_settings, choose
from peer_splits import KANG_BASELINES, Split, kang_split, papalexi_split

from celldit.bench import emit_report
from celldit.bench.cell_scoring import METRICS, method_summary
from celldit.data.expression import log_normalize
from celldit.eval.report import evaluate

PAPALEXI = "papalexi2021_thp1_crispr_ko.h5ad"
KANG = "kang2018_pbmc_ifnb_celltypes.h5ad"
PEERS = ("cellflow", "cpa")
# peers whose predicted cells are the means of a count likelihood (no sampling noise): each is
# also scored with counts drawn from those means (see counts_drawn)
COUNT_MODELS = ("cpa",)
RUNNERS = Path(__file__).resolve().parent / "peer_runners"



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
    out = method_summary(res, (["model"] if pred is not None else []) + list(split.baselines))
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
