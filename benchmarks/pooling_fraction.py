"""One trained CellDiT's ``control_mean="pooled"`` counterfactuals at several ``pooling`` fractions.

    python benchmarks/pooling_fraction.py --data ../shared/data --model runs/demo/model \
        --held-out rep_3 --fractions 0 0.1 0.25 0.5 0.75 1 --seed 0 --threads 1 --out pooling.json
    # or train one first (benchmarks/cells.py's settings, seed --seed) and save it to --model:
    python benchmarks/pooling_fraction.py --data ../shared/data --model runs/pool_rep2_s0 --train \
        --held-out rep_2 --seed 0 --threads 1 --out pooling_rep2.json

A counterfactual carries the held-out replicate's control cells; with ``control_mean="pooled"``
each cell also moves ``pooling`` of the way from its batch's mean control cell to that mean
pooled with the training batches' (``celldit/cells/control_mean.py``). The correction is a
single vector for every perturbation, so it raises the mean-level metrics of every one of them
alike, and it moves perturbations without an effect away from their controls by as much. This
script measures both sides on one saved model (trained on the other replicates, e.g. the demo's
``runs/demo/model`` for ``--held-out rep_3``; ``--held-out rep_2`` with a model trained on rep_1
+ rep_3 is a validation split), every fraction sampled and scored with the same seed:

* the means over conditions of pd_de20, pd_all, mse_de20 and E-distance, and the same of the
  mean-shift baseline moved by the same fraction of its pooled correction (``mean_shift_moved``,
  from the scorer's log1p cells, as ``benchmarks/cells.py`` scores ``control_mean_pooled``);
* ``weak``: the weak-perturbation rule, the conditions where mean shift is worse than no change
  and the model worse than no change by more than 0.01;
* ``not_clear``: the same excess over no change on the conditions the model did not find a clear
  effect for (``model.effects()["evidence"] != "clear"``, decided from training cells alone);
* ``largest_fraction_keeping_not_clear``: the largest fraction up to which no further such
  condition comes out above no change by more than 0.01 than at the smallest fraction.

Prints one JSON object: config, machine, the baselines, and the figures per fraction.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/cells.py's training settings

import cells as cell_bench  # noqa: E402  (benchmarks/cells.py)

from celldit.bench import cell_scoring as scoring
from celldit.bench import emit_report
from celldit.bench.papalexi import held_out_replicate
from celldit.cells import CellDiT
from celldit.eval.report import evaluate
from celldit.train.trainer import set_threads

MIN_CELLS = 40  # as benchmarks/cells.py --protocol papalexi_rep3
TOLERANCE = 0.01


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--fractions {text!r}: a fraction in [0, 1]")
    return value


def largest_fraction_keeping(above: dict[float, list[str]]) -> float:
    """The largest fraction up to which (every fraction at or below it) the conditions above no
    change by more than the tolerance are only those already above at the smallest fraction."""
    fractions = sorted(above)
    base, kept = set(above[fractions[0]]), fractions[0]
    for f in fractions[1:]:
        if not set(above[f]) <= base:
            break
        kept = f
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the shared .h5ad files")
    parser.add_argument("--model", type=Path, required=True, help="a saved CellDiT trained on the other replicates")
    parser.add_argument("--train", action="store_true",
                        help="first train a model with benchmarks/cells.py's default settings (seed --seed) on the "
                             "replicates other than --held-out and save it to --model (a new folder)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="with --train: training steps (default: benchmarks/cells.py's)")
    parser.add_argument("--held-out", default="rep_3", help="the replicate (obs['bio_rep']) carried and scored")
    parser.add_argument("--fractions", type=_fraction, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75, 1.0],
                        help="pooling fractions to compare (0: the observed control mean)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and scoring seed")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    set_threads(args.threads)
    try:
        split = held_out_replicate(args.data, args.held_out, MIN_CELLS)
    except ValueError as err:
        parser.error(f"--held-out: {err}")
    spec, train, test, conditions, controls = split.spec, split.train, split.test, split.conditions, split.controls
    if args.train:
        steps = [] if args.max_steps is None else ["--max-steps", str(args.max_steps)]
        settings = cell_bench.build_parser().parse_args(["--data", str(args.data), "--protocol", "papalexi_rep3",
                                                         "--seed", str(args.seed), *steps])
        settings.tokenizer, settings.source = settings.tokenizer[0], settings.source[0]
        trained, timing = cell_bench._train(train, settings, perturbation_key="perturbation", control="control",
                                            pair_keys=["bio_rep"])
        trained.save(args.model)
    model = CellDiT.load(args.model)
    effects = model.effects()
    not_clear = sorted(set(effects.index[effects["evidence"] != "clear"]) & set(conditions))
    result = {"config": {"data": str(args.data), "model": str(args.model), "model_seed": model.config.seed,
                         "held_out": args.held_out, "seed": args.seed, "trained_here": args.train,
                         "fractions": args.fractions, "conditions": len(conditions), "not_clear": not_clear},
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "fractions": {}}
    if args.train:
        result["training"] = timing
    above_not_clear = {}
    for fraction in sorted(args.fractions):
        start = time.perf_counter()
        pred = model.counterfactual(controls, conditions, seed=args.seed, control_mean="pooled", pooling=fraction)
        sample_s = time.perf_counter() - start
        res = evaluate(test, pred, spec, train=train, min_cells=MIN_CELLS, baselines=["no_change", "mean_shift"],
                       seed=args.seed, figures=False, cell_eval=False)
        per_condition = res.table.pivot_table(index="perturbation", columns="method", values="edistance")
        excess = (per_condition["model"] - per_condition["no_change"]).reindex(not_clear)
        above_not_clear[fraction] = sorted(excess.index[excess > TOLERANCE])
        if "baselines" not in result:
            result["baselines"] = scoring.method_summary(res, ["mean_shift", "no_change"])
        moved, weights = scoring.pooled_mean_shift(test, train, spec, conditions, model.config.pair_keys, fraction)
        result["pooled_shares"] = weights  # the same at every fraction
        moved_res = evaluate(test, moved, spec, train=train, min_cells=MIN_CELLS, baselines=[], seed=args.seed,
                             figures=False, cell_eval=False)
        result["fractions"][str(fraction)] = {
            "sample_s": round(sample_s, 1), **scoring.method_summary(res, ["model"])["model"],
            # the mean-shift baseline moved by the same fraction of its own pooled correction
            "mean_shift_moved": scoring.method_summary(moved_res, ["model"])["model"],
            "weak": scoring.weak_knockouts(per_condition["model"], per_condition, TOLERANCE),
            "not_clear": {"above_no_change_by_0.01": above_not_clear[fraction],
                          "max_model_minus_no_change": round(float(excess.max()), 4) if len(excess) else None},
            "edistance_minus_no_change": (per_condition["model"] - per_condition["no_change"]).round(4).to_dict()}
    result["largest_fraction_keeping_not_clear"] = largest_fraction_keeping(above_not_clear)
    emit_report(result, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
