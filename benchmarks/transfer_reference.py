"""Real-cell references for ``papalexi_rep3``, scored exactly as ``benchmarks/cells.py`` scores a model.

    python benchmarks/transfer_reference.py --data ../shared/data --seeds 0 1 2 --out transfer.json

No model is trained. Each reference is a set of *real* cells standing in for the predicted
cells of a perturbation P on rep_3, scored by the same :func:`~celldit.eval.report.evaluate`
call (same PCA space, same 300-cell draws per seed) as the model and the baselines:

* ``transfer``: the training replicates' own P cells (rep_1 and rep_2), each moved by its
  replicate's control offset onto rep_3 (``x + mean(rep_3 controls) - mean(rep_k controls)``):
  a per-perturbation distribution learned perfectly from the training replicates;
* ``transfer_at_mean_shift``: the same cells re-centred on the plain mean shift's mean
  (their shape, the baseline's mean);
* ``controls_at_transfer_mean``: rep_3's control cells moved to the transfer's mean (the
  controls' shape, the transfer's mean);
* ``rep2_controls_mean_shift``: rep_2's control cells, moved onto rep_3's control mean, plus
  the plain mean shift (the baseline started from another replicate's real controls);
* ``controls_at_own_shift``: rep_3's control cells moved by rep_3's *own* measured shift of P
  (``mean(rep_3 P) - mean(rep_3 controls)``): an oracle no prediction can match, the floor of
  any method that moves the controls by one vector per perturbation.

Prints one JSON object: config, machine, and per seed the means over conditions of
pd_de20, pd_all, mse_de20 and E-distance for each reference and the baselines.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from celldit.bench import emit_report
from celldit.data.expression import log_normalize
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutReplicate
from celldit.eval.report import evaluate

PAPALEXI = "papalexi2021_thp1_crispr_ko.h5ad"
METRICS = ("pearson_delta_de20", "pearson_delta_all", "mse_de20", "edistance")
TRAIN_REPS = ("rep_1", "rep_2")


def _dense(a: ad.AnnData) -> np.ndarray:
    x = a.X
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def references(train: ad.AnnData, test: ad.AnnData, keep: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{reference: {perturbation: cells (log1p)}}`` for the references of the module notes."""
    xtr, xte = _dense(log_normalize(train)), _dense(log_normalize(test))
    ltr, lte = train.obs["perturbation"].astype(str).to_numpy(), test.obs["perturbation"].astype(str).to_numpy()
    rep = train.obs["bio_rep"].astype(str).to_numpy()
    rep3_controls = xte[lte == "control"]
    rep3_mean = rep3_controls.mean(0)
    control_mean = {r: xtr[(ltr == "control") & (rep == r)].mean(0) for r in TRAIN_REPS}
    plain_shift = {p: xtr[ltr == p].mean(0) - xtr[ltr == "control"].mean(0) for p in keep}
    rep2_controls = xtr[(ltr == "control") & (rep == "rep_2")] - control_mean["rep_2"] + rep3_mean
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in ("transfer", "transfer_at_mean_shift",
                                                             "controls_at_transfer_mean", "rep2_controls_mean_shift",
                                                             "controls_at_own_shift")}
    for p in keep:
        moved = np.vstack([xtr[(ltr == p) & (rep == r)] + (rep3_mean - control_mean[r]) for r in TRAIN_REPS])
        out["transfer"][p] = moved
        out["transfer_at_mean_shift"][p] = moved - moved.mean(0) + rep3_mean + plain_shift[p]
        out["controls_at_transfer_mean"][p] = rep3_controls - rep3_mean + moved.mean(0)
        out["rep2_controls_mean_shift"][p] = rep2_controls + plain_shift[p]
        out["controls_at_own_shift"][p] = rep3_controls + xte[lte == p].mean(0) - rep3_mean
    return out


def _as_prediction(cells: dict[str, np.ndarray], var: pd.DataFrame) -> ad.AnnData:
    obs = pd.DataFrame({"perturbation": np.concatenate([[p] * len(x) for p, x in cells.items()])})
    obs.index = obs.index.astype(str)
    return ad.AnnData(np.vstack(list(cells.values())).astype(np.float32), obs=obs, var=var.copy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the shared .h5ad files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="scoring draws (as --seed of cells.py)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # shifted cells can dip below 0, as the baselines do
    t0 = time.perf_counter()
    raw = ad.read_h5ad(args.data / PAPALEXI)
    spec = PerturbationSpec("perturbation", control="control")
    masks = HeldOutReplicate(spec, key="bio_rep", values=["rep_3"]).masks(raw)
    train, test = raw[masks.train].copy(), raw[masks.test].copy()
    counts = test.obs["perturbation"].astype(str).value_counts()
    keep = sorted(p for p, n in counts.items() if n >= 40 and p != "control")
    refs = {name: _as_prediction(cells, test.var) for name, cells in references(train, test, keep).items()}
    result = {"config": {"data": str(args.data), "protocol": "papalexi_rep3", "seeds": args.seeds},
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "n_conditions": len(keep), "by_seed": {}}
    for seed in args.seeds:
        row = {}
        for i, (name, pred) in enumerate(refs.items()):
            res = evaluate(test, pred, spec, train=train, min_cells=40, seed=seed, figures=False, cell_eval=False,
                           baselines=["no_change", "mean_shift"] if i == 0 else [])
            row[name] = {k: round(float(res.summary["model"][k]), 4) for k in METRICS}
            if i == 0:
                row.update({m: {k: round(float(res.summary[m][k]), 4) for k in METRICS if res.summary[m].get(k)
                                is not None} for m in ("mean_shift", "no_change")})
        result["by_seed"][str(seed)] = row
    result["mean_over_seeds"] = {name: {k: round(float(np.mean([result["by_seed"][str(s)][name][k] for s in args.seeds])), 4)
                                        for k in METRICS if k in result["by_seed"][str(args.seeds[0])][name]}
                                 for name in result["by_seed"][str(args.seeds[0])]}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    emit_report(result, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
