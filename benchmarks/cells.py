"""CellDiT on the shared real data: metrics beside the baselines, and CPU throughput.

    python benchmarks/cells.py --data ../shared/data --protocol papalexi_rep3 \
        --tokenizer module --source control --out out/cells_papalexi.json
    python benchmarks/cells.py --data ../shared/data --protocol kang --out out/cells_kang.json
    python benchmarks/cells.py --data ../shared/data --protocol norman_unseen_combo --out out/norman.json
    python benchmarks/cells.py --data ../shared/data --protocol papalexi_rep3 \
        --tokenizer gene module latent --source control noise --out out/cells_grid.json

Protocols (the DESIGN.md ones, as in ``benchmarks/baselines.py``):

* ``papalexi_rep3``: train on bio_rep rep_1 + rep_2 (control/target pairs within a
  replicate); counterfactuals from every rep_3 control cell for each perturbation with
  >= 40 rep_3 cells; scored against rep_3's cells, baselines beside.
* ``papalexi_rep2``: the same with rep_2 held out (train rep_1 + rep_3): the validation
  replicate, where settings are chosen without rep_3's scores.
* ``kang``: for each cell type in turn, its stimulated cells are held out; counterfactuals
  from that type's control cells under ``stim``.
* ``norman_unseen_combo``: the Norman toy without one combination (and its cells); the
  combination is generated from control cells end to end.

Prints one JSON object: config, machine, per-protocol metrics (model and baselines: means
over conditions) and throughput (training cells/s = batch size x steps / training wall
time; sampling cells/s = counterfactual cells / sampling wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

if "--threads" in sys.argv[:-1]:  # before torch starts OpenMP: workers left at the core count spin
    os.environ.setdefault("OMP_NUM_THREADS", sys.argv[sys.argv.index("--threads") + 1])

import anndata as ad
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from celldit.bench import cell_scoring as scoring
from celldit.bench import emit_report
from celldit.bench.shift_axis import split_along_shift
from celldit.cells import CellDiT
from celldit.cells.control_mean import DEFAULT_POOLING
from celldit.cells.outputs import SUPPORTS
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutCovariateGroup, HeldOutReplicate
from celldit.eval.report import evaluate, summarize
from celldit.train.trainer import set_threads

PAPALEXI = "papalexi2021_thp1_crispr_ko.h5ad"
KANG = "kang2018_pbmc_ifnb_celltypes.h5ad"
NORMAN = "norman2019_toy_combos.h5ad"


def _train(train: ad.AnnData, args, **registration) -> tuple[CellDiT, dict]:
    registration.setdefault("perturbation_features", "expression")
    t0 = time.perf_counter()
    shrinkage = None if args.anchor_shrinkage == "none" else args.anchor_shrinkage
    model = CellDiT(train, **registration, tokenizer=args.tokenizer, source=args.source, anchor=not args.no_anchor,
                    anchor_shrinkage=shrinkage, batch_anchors=not args.no_batch_anchors,
                    gate_velocity=not args.no_gate_velocity, on_target=not args.no_on_target,
                    escapers=not args.no_escapers,
                    hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
                    cfg_dropout=args.cfg_dropout, covariate_dropout=args.covariate_dropout,
                    group_bandwidth=args.group_bandwidth, seed=args.seed)
    t1 = time.perf_counter()
    ema = {} if args.ema_decay is None else {"ema_decay": None if args.ema_decay == "none" else float(args.ema_decay)}
    model.fit(max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, **ema,
              trainer={"progress_bar": False, "accelerator": "cpu", "logger": None})
    t2 = time.perf_counter()
    return model, {"setup_s": round(t1 - t0, 2), "train_s": round(t2 - t1, 2),
                   "train_cells_per_s": round(args.batch_size * args.max_steps / (t2 - t1), 1),
                   "final_loss": round(float(model.history["final_loss"]), 4),
                   "parameters": sum(p.numel() for p in model.network.parameters())}


def _sample(model: CellDiT, controls: ad.AnnData, labels: list[str], args) -> tuple[ad.AnnData, dict]:
    if args.n_controls and controls.n_obs > args.n_controls:
        keep = np.sort(np.random.default_rng(args.seed).permutation(controls.n_obs)[: args.n_controls])
        controls = controls[keep].copy()
    t0 = time.perf_counter()
    pred = model.counterfactual(controls, labels, steps=args.sample_steps, cfg_scale=args.cfg_scale, seed=args.seed,
                                raw_layer=True, support=args.support)  # the flow output in layers['flow']
    dt = time.perf_counter() - t0
    return pred, {"sample_s": round(dt, 2), "sample_cells_per_s": round(pred.n_obs / dt, 1), "cells": pred.n_obs}


def papalexi_rep3(data: Path, args) -> dict:
    return papalexi_replicate(ad.read_h5ad(data / PAPALEXI), args, held_out="rep_3")


def papalexi_rep2(data: Path, args) -> dict:
    """The validation replicate: train on rep_1 + rep_3, score rep_2, the same way. Settings are
    chosen here, so that rep_3's scores play no part in the choice."""
    return papalexi_replicate(ad.read_h5ad(data / PAPALEXI), args, held_out="rep_2")


def papalexi_replicate(raw: ad.AnnData, args, held_out: str) -> dict:
    """Train on every ``bio_rep`` but ``held_out`` (pairs within a replicate); carry all of the
    held-out replicate's control cells to each perturbation with >= 40 of its cells; score there."""
    spec = PerturbationSpec("perturbation", control="control")
    masks = HeldOutReplicate(spec, key="bio_rep", values=[held_out]).masks(raw)
    train, test = raw[masks.train].copy(), raw[masks.test].copy()
    pair_keys = [] if args.no_pair_keys else ["bio_rep"]
    model, timing = _train(train, args, perturbation_key="perturbation", control="control", pair_keys=pair_keys)
    labels = test.obs["perturbation"].astype(str)
    counts = labels.value_counts()
    keep = sorted(lab for lab, n in counts.items() if n >= 40 and lab != "control")
    controls = test[labels == "control"].copy()
    pred, sampling = _sample(model, controls, keep, args)
    res = evaluate(test, pred, spec, train=train, min_cells=40, baselines=["no_change", "train_mean", "mean_shift",
                   "linear"], seed=args.seed, figures=False, cell_eval=False)
    per_condition = res.table.pivot_table(index="perturbation", columns="method", values="edistance")
    # the same cells before the outputs are put on log1p's support (X >= 0), as the baselines are scored
    flow = ad.AnnData(pred.layers["flow"], obs=pred.obs, var=pred.var)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # negative values are the point here
        res_flow = evaluate(test, flow, spec, train=train, min_cells=40, baselines=[], seed=args.seed, figures=False,
                            cell_eval=False)
    out = {"held_out": held_out, "n_conditions": res.summary["n_conditions"], "pair_keys": pair_keys,
           **timing, **sampling,
           "metrics": scoring.method_summary(res, ["model", "mean_shift", "train_mean", "linear", "no_change"]),
           "model_before_support": scoring.method_summary(res_flow, ["model"])["model"],
           # perturbations where the mean shift is worse than doing nothing: the model must stay near no change
           "weak": scoring.weak_knockouts(per_condition["model"], per_condition),
           "model_by_support": scoring.score_by_support(test, pred, spec, train, args.seed,
                                                        scoring.first_levels(model, controls, pred)),
           "edistance_per_condition": per_condition.round(4).to_dict(),
           # the spread along each knockout's shift (escapers and edited cells), beside mean shift's
           "split_along_shift": split_along_shift(test, pred, spec, train, keep, seed=args.seed),
           "control_mean_pooled": scoring.pooled_reference(model, test, controls, train, spec, keep, per_condition,
                                                           seed=args.seed, steps=args.sample_steps,
                                                           cfg_scale=args.cfg_scale, support=args.support,
                                                           pooling=args.pooling)}
    if args.generate:  # cells from the model alone (the noise prior, or the bank of training controls)
        # in the held-out replicate, as many as the counterfactuals and baselines start from (its controls): the
        # scorer draws a prediction's cells with replacement, and repeats from a smaller pool
        # lower its within-sample distance, which inflates E-distance (noise source, seed 0: 0.502
        # with as many cells as rep_3 has of P, 0.401 with 666)
        support = _generate_support(args)
        gen = scoring.generated_in_batch(model, keep, controls, seed=args.seed, steps=args.sample_steps,
                                         cfg_scale=args.cfg_scale, support=support, raw_layer=True)
        res_g = evaluate(test, gen, spec, train=train, min_cells=40, baselines=[], seed=args.seed, figures=False,
                         cell_eval=False)
        per_condition_g = scoring.per_condition_edistance(res_g)
        refs = scoring.generated_references(model, test, controls, train, spec, keep, seed=args.seed,
                                            steps=args.sample_steps, support=support)
        out["generate_metrics"] = scoring.method_summary(res_g, ["model"])["model"]
        out["generate_by_support"] = scoring.score_by_support(test, gen, spec, train, args.seed)
        out["generate_split_along_shift"] = split_along_shift(test, gen, spec, train, keep, seed=args.seed)
        out["generated_controls_mean_shift"] = refs["mean_shift"]
        out["generated_controls_no_change"] = refs["no_change"]
        # the weak-perturbation rule against the held-out replicate's real controls, and on the same footing
        # (generated controls as they are: where they beat themselves moved by the mean shift)
        out["generate_weak"] = scoring.weak_knockouts(per_condition_g, per_condition)
        out["generate_weak_same_footing"] = scoring.weak_knockouts(per_condition_g, refs["per_condition"])
        out["generate_edistance_per_condition"] = pd.DataFrame(
            {"model": per_condition_g, **{f"generated_controls_{k}": v for k, v in refs["per_condition"].items()}}
        ).round(4).to_dict()
    return out


def _generate_support(args) -> str:
    """``--support`` for generated cells: ``"discrete"`` (counterfactuals' default) needs source
    cells, so generated cells take ``generate``'s default, ``"balance"``."""
    return "balance" if args.support == "discrete" else args.support


def kang(data: Path, args) -> dict:
    raw = ad.read_h5ad(data / KANG)
    spec = PerturbationSpec("group_id", control="ctrl", covariate_keys=("cluster_id",))
    out = {}
    for cell_type in args.cell_types or sorted(raw.obs["cluster_id"].astype(str).unique()):
        masks = HeldOutCovariateGroup(spec, key="cluster_id", values=[cell_type]).masks(raw)
        train, test = raw[masks.train].copy(), raw[masks.test].copy()
        model, timing = _train(train, args, perturbation_key="group_id", control="ctrl", covariate_keys=["cluster_id"])
        ctrl = test[test.obs["group_id"].astype(str) == "ctrl"].copy()
        pred, sampling = _sample(model, ctrl, ["stim"], args)
        res = evaluate(test, pred, spec, train=train, baselines=["no_change", "mean_shift", "linear"], seed=args.seed,
                       figures=False, cell_eval=False)
        out[cell_type] = {**timing, **sampling,
                          "metrics": scoring.method_summary(res, ["model", "mean_shift", "linear", "no_change"]),
                          "model_by_support": scoring.score_by_support(test, pred, spec, train, args.seed,
                                                                       scoring.first_levels(model, ctrl, pred),
                                                                       min_cells=1)}
        m, b = out[cell_type]["metrics"]["model"], out[cell_type]["metrics"]["mean_shift"]
        out[cell_type]["beats_mean_shift_r2_and_pd_de20"] = bool(
            m["r2_mean"] > b["r2_mean"] and m["pearson_delta_de20"] > b["pearson_delta_de20"])
        print(f"kang {cell_type}: {json.dumps(out[cell_type]['metrics'])}", file=sys.stderr, flush=True)
    out["cell_types_beating_mean_shift"] = sum(v["beats_mean_shift_r2_and_pd_de20"] for v in out.values())
    return out


def norman_unseen_combo(data: Path, args, combo: str = "MAP2K6+ELMSAN1") -> dict:
    raw = ad.read_h5ad(data / NORMAN)
    spec = PerturbationSpec("condition", control="ctrl")
    labels = raw.obs["condition"].astype(str)
    parsed = {lab: sorted(spec.parse(lab)) for lab in labels.unique()}
    train = raw[labels != combo].copy()
    model, timing = _train(train, args, perturbation_key="condition", control="ctrl")
    pred, sampling = _sample(model, raw[labels == "ctrl"].copy(), [combo], args)
    singles = [f"{g}+ctrl" if f"{g}+ctrl" in parsed else f"ctrl+{g}" for g in parsed[combo]]
    return {**timing, **sampling, "held_out": combo, "combo_seen_in_training": combo in set(train.obs["condition"]),
            "singles_in_training": {s: s in set(train.obs["condition"]) for s in singles},
            "n_labels": len(parsed), "n_combinations": sum(len(v) > 1 for v in parsed.values()),
            "generated_finite": bool(np.isfinite(pred.X).all()), "generated_cells": pred.n_obs}


def kang_donor(data: Path, args) -> dict:
    """Kang 2018, one donor's stimulated cells held out: each cell type's response in that donor is
    predicted from its control cells; covariates (cell type, donor), so every (type, donor) group of
    the held-out donor is a covariate group never trained with ``stim``."""
    raw = ad.read_h5ad(data / KANG)
    raw.obs["donor"] = raw.obs["sample_id"].astype(str).str.replace("ctrl", "").str.replace("stim", "")
    spec = PerturbationSpec("group_id", control="ctrl", covariate_keys=("cluster_id", "donor"))
    out = {}
    for donor in sorted(raw.obs["donor"].unique()):
        held = ((raw.obs["donor"] == donor) & (raw.obs["group_id"] == "stim")).to_numpy()
        train, test = raw[~held].copy(), raw[(raw.obs["donor"] == donor).to_numpy()].copy()
        model, timing = _train(train, args, perturbation_key="group_id", control="ctrl",
                               covariate_keys=["cluster_id", "donor"])
        ctrl = test[test.obs["group_id"].astype(str) == "ctrl"].copy()
        pred, sampling = _sample(model, ctrl, ["stim"], args)
        res = evaluate(test, pred, spec, train=train, baselines=["no_change", "mean_shift", "linear"], seed=args.seed,
                       figures=False, cell_eval=False, min_cells=20)
        out[donor] = {**timing, **sampling, "n_conditions": res.summary["n_conditions"],
                      "metrics": scoring.method_summary(res, ["model", "mean_shift", "linear", "no_change"])}
        print(f"kang donor {donor}: {json.dumps(out[donor]['metrics'])}", file=sys.stderr, flush=True)
    return out


def papalexi_unseen(data: Path, args) -> dict:
    """Papalexi 2021, perturbations never seen: the knockouts whose target gene is measured (9 of
    25) are held out of training entirely, in ``--folds`` folds; each fold's model (trained on the
    rep_1 + rep_2 cells of the other perturbations) predicts them from rep_3's control cells, with
    the expression prior features (or ``--prior FILE``), against the ``train_mean`` and ``linear``
    baselines (Ahlmann-Eltze et al. 2025: gene embeddings from a PCA of the training matrix)."""
    raw = ad.read_h5ad(data / PAPALEXI)
    spec = PerturbationSpec("perturbation", control="control")
    labels = raw.obs["perturbation"].astype(str).to_numpy()
    rep3 = (raw.obs["bio_rep"] == "rep_3").to_numpy()
    measured = sorted(set(labels) & set(map(str, raw.var_names)))
    folds = [measured[i::args.folds] for i in range(args.folds)]
    tables, out = [], {"targets": measured, "folds": folds}
    for k, fold in enumerate(folds):
        train = raw[~rep3 & ~np.isin(labels, fold)].copy()
        test = raw[rep3 & np.isin(labels, [*fold, "control"])].copy()
        features = args.prior if args.prior else "expression"
        model, timing = _train(train, args, perturbation_key="perturbation", control="control", pair_keys=["bio_rep"],
                               perturbation_features=features)
        pred, sampling = _sample(model, test[test.obs["perturbation"] == "control"].copy(), fold, args)
        res = evaluate(test, pred, spec, train=train, baselines=["no_change", "train_mean", "linear"], seed=args.seed,
                       figures=False, cell_eval=False, min_cells=40)
        tables.append(res.table)
        rule = model.sampler.on_target_rule
        out[f"fold{k}"] = {**timing, **sampling,
                           "metrics": scoring.method_summary(res, ["model", "train_mean", "linear", "no_change"]),
                           "on_target_fraction": None if rule is None else round(rule.fraction, 4)}
        print(f"papalexi_unseen fold {k} {fold}: {json.dumps(out[f'fold{k}']['metrics'])}", file=sys.stderr, flush=True)
    table = pd.concat(tables, ignore_index=True)
    summary = summarize(table)
    out["metrics"] = scoring.rounded_summary(summary, ("model", "train_mean", "linear", "no_change"))
    out["per_condition"] = {k: table.pivot_table(index="perturbation", columns="method", values=k).round(4).to_dict()
                            for k in ("pearson_delta_de20", "edistance")}
    return out


PROTOCOLS = {"papalexi_rep3": papalexi_rep3, "papalexi_rep2": papalexi_rep2, "papalexi_unseen": papalexi_unseen,
             "kang": kang, "kang_donor": kang_donor, "norman_unseen_combo": norman_unseen_combo}


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (its defaults are the benchmark's settings)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the shared .h5ad files")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), action="append", required=True)
    parser.add_argument("--tokenizer", nargs="+", default=["module"], choices=["gene", "module", "latent"],
                        help="one or more: each (tokenizer, source) pair is trained and scored in turn")
    parser.add_argument("--source", nargs="+", default=["control"], choices=["control", "noise"])
    parser.add_argument("--gene-max-steps", type=int, default=None,
                        help="training steps of the gene tokenizer (its O(G^2) attention is the slowest on "
                             "CPU; default --max-steps)")
    parser.add_argument("--no-anchor", action="store_true", help="start the control-source flow at the control cell")
    parser.add_argument("--anchor-shrinkage", default="hybrid", choices=["hybrid", "gate", "eb", "none"],
                        help="shrinkage of the anchors toward no change (none: the plain mean shift)")
    parser.add_argument("--no-gate-velocity", action="store_true",
                        help="the network's velocity not scaled by the condition's shrinkage gate at sampling")
    parser.add_argument("--no-batch-anchors", action="store_true",
                        help="one anchor per condition for every batch (not each pair_keys batch its own)")
    parser.add_argument("--no-on-target", action="store_true",
                        help="no on-target prior (a knockout's own target shrunk like any gene; an unseen "
                             "knockout's target borrowed like the rest)")
    parser.add_argument("--no-escapers", action="store_true",
                        help="no shares of escapers (every source cell gets its condition's whole anchor)")
    parser.add_argument("--no-pair-keys", action="store_true",
                        help="papalexi_rep3 and _rep2: the minimal command (no pair_keys: the data centred as one batch)")
    parser.add_argument("--folds", type=int, default=3, help="papalexi_unseen: folds of held-out perturbations")
    parser.add_argument("--prior", type=Path, default=None,
                        help="papalexi_unseen: a prior feature table (csv/tsv/parquet, indexed by perturbation)")
    parser.add_argument("--support", choices=SUPPORTS, default="discrete",
                        help="how counterfactual cells are put on log1p's support (every rule is also scored on "
                             "the same cells: model_by_support); generated cells use balance for discrete")
    parser.add_argument("--pooling", type=float, default=DEFAULT_POOLING,
                        help="papalexi_rep3 and _rep2: the fraction of the pooled control-mean correction that "
                             "control_mean_pooled applies (to the model and to mean shift alike; default: "
                             "counterfactual's)")
    parser.add_argument("--generate", action="store_true",
                        help="papalexi_rep3 and _rep2: also score generate(P, n) (cells from the model alone, in "
                             "the held-out replicate)")
    parser.add_argument("--cfg-dropout", type=float, default=0.2)
    parser.add_argument("--cell-types", nargs="+", default=None, help="kang: hold out only these cell types")
    parser.add_argument("--covariate-dropout", type=float, default=0.2)
    parser.add_argument("--group-bandwidth", default="median", choices=["median", "leave_one_group_out"],
                        help="kernel bandwidth of a held-out covariate group's anchor (see CellDiTConfig)")
    parser.add_argument("--n-controls", type=int, default=0,
                        help="carry only this many test control cells (seeded draw; 0 = all)")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--ema-decay", default=None,
                        help="decay of the weights' moving average sampled from ('none': the last weights; "
                             "default: CellDiT.fit's)")
    parser.add_argument("--sample-steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale of sampling")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    set_threads(args.threads)  # torch and BLAS alike: idle BLAS threads spin and slow parallel runs
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "device": "cpu"}}
    grid = [(t, s) for t in args.tokenizer for s in args.source]
    for tokenizer, source in grid:
        run = argparse.Namespace(**{**vars(args), "tokenizer": tokenizer, "source": source})
        if tokenizer == "gene" and args.gene_max_steps:
            run.max_steps = args.gene_max_steps
        for name in args.protocol:
            out = PROTOCOLS[name](args.data, run)
            if len(grid) > 1:
                result.setdefault(name, {})[f"{tokenizer}/{source}"] = {"max_steps": run.max_steps, **out}
                print(f"{name} {tokenizer}/{source}: {json.dumps(out.get('metrics', {}).get('model'))}",
                      file=sys.stderr, flush=True)
            else:
                result[name] = out
    emit_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
