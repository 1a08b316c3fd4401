"""Leave-one-perturbation-out over every Papalexi knockout: the unseen fall-back's scale.

    python benchmarks/borrowing_scale.py --data ../shared/data --seed 0

A perturbation never trained, whose prior features tell effects apart no better than
chance, starts from the mean of the trained perturbations' anchors (``celldit.cells.borrowing``).
Should that mean be shrunk again, by a scale fitted by leave-one-out on the trained anchors?
``papalexi_unseen`` scores 9 knockouts whose targets are measured genes, among them the
strongest IFN-pathway ones, so choosing the scale there would tune to the test. Here every perturbation with >= 40 rep_3
cells is held out in turn: the anchors are rebuilt without its cells (rep_1 + rep_2,
``pair_keys=["bio_rep"]``, the default shrinkage), and rep_3's control cells are moved by

* ``loo_scale``: the others' mean anchor (rep_3's, batch-weighted) times the scale fitted
  on them (the fall-back until this script settled it);
* ``scale_1``: the same mean, unscaled (the fall-back since);
* ``train_mean``: the unweighted mean of the others' plain training shifts, each the mean of
  its per-replicate shifts (as the anchors are; ``evaluate``'s baseline pools the replicates);
* ``no_change``: nothing;
* ``on_target``: ``scale_1`` with the held-out knockout's own target (a measured gene for the
  9 of ``papalexi_unseen``) set by the on-target prior (``celldit.cells.on_target``), as the
  default model does; the anchors are then built with the prior as well (each trained
  knockout's target unshrunk), so ``scale_1`` is also the prior's ablation
  (``--no-on-target``: every anchor built without it).

Anchors only (the network's part, gated for an unseen perturbation, is left out). Prints one
JSON object: config, machine, figures per condition and averaged over all held-out
knockouts, over the 9 of ``papalexi_unseen`` and over the others.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from celldit.bench import emit_report
from celldit.cells import CellDiT
from celldit.cells.borrowing import _loo_fit
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutReplicate
from celldit.eval.report import evaluate

PAPALEXI = "papalexi2021_thp1_crispr_ko.h5ad"
UNSEEN_9 = ("CMTM6", "NFKBIA", "STAT3", "IFNGR2", "STAT1", "TNFRSF14", "JAK2", "STAT2", "UBE2L6")
RULES = ("loo_scale", "scale_1", "train_mean", "no_change", "on_target")
METRICS = ("pearson_delta_de20", "pearson_delta_all", "mse_de20", "edistance")


def _plain_shift(x: np.ndarray, labels: np.ndarray, reps: np.ndarray, name: str) -> np.ndarray:
    """Mean-shift baseline's shift of ``name``: per replicate, averaged over replicates."""
    return np.mean([x[(labels == name) & (reps == r)].mean(0) - x[(labels == "control") & (reps == r)].mean(0)
                    for r in np.unique(reps) if ((labels == name) & (reps == r)).any()], axis=0)


def held_out_shifts(train: ad.AnnData, controls_mean: np.ndarray, name: str, on_target: bool = True
                    ) -> tuple[dict, float]:
    """The shifts of each rule for ``name`` held out of ``train``, and the fitted scale.

    ``on_target``: build the anchors with the on-target prior and set ``name``'s own target
    in the ``on_target`` rule (False: that rule equals ``scale_1``)."""
    rest = train[train.obs["perturbation"].astype(str) != name].copy()
    model = CellDiT(rest, perturbation_key="perturbation", control="control", pair_keys=["bio_rep"],
                    on_target=on_target)
    table = model.conditions
    rows = sorted(table.single_rows())
    anchors = table.anchors[rows].astype(np.float64)  # what the scale is fitted on (as the sampler does)
    pred = (anchors.sum(0) - anchors) / (len(anchors) - 1)
    _, scale = _loo_fit(anchors, pred)
    mean = np.mean([table.anchor(table.keys[r], controls_mean) for r in rows], axis=0)  # rep_3's anchors
    x = model.sampler.input_rows(rest).all_rows()
    labels, reps = rest.obs["perturbation"].astype(str).to_numpy(), rest.obs["bio_rep"].astype(str).to_numpy()
    plain = np.mean([_plain_shift(x, labels, reps, table.single_rows()[r]) for r in rows], axis=0)
    zero = np.zeros_like(mean)
    targeted = mean[None].copy()
    rule = model.sampler.on_target_rule
    if rule is not None:  # rep_3's controls are uncentred here: the level is their mean
        rule.set_targets(targeted, [name], model.genes, controls_mean[None])
    return {"loo_scale": scale * mean, "scale_1": mean, "train_mean": plain, "no_change": zero,
            "on_target": targeted[0]}, scale


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with the shared .h5ad files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scoring subsamples")
    parser.add_argument("--no-on-target", action="store_true", help="build the anchors without the on-target prior")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    raw = ad.read_h5ad(args.data / PAPALEXI)
    spec = PerturbationSpec("perturbation", control="control")
    masks = HeldOutReplicate(spec, key="bio_rep", values=["rep_3"]).masks(raw)
    train, test = raw[masks.train].copy(), raw[masks.test].copy()
    labels = test.obs["perturbation"].astype(str)
    counts = labels.value_counts()
    names = sorted(n for n, c in counts.items() if c >= 40 and n != "control")
    controls = test[labels == "control"].copy()
    probe = CellDiT(train, perturbation_key="perturbation", control="control", pair_keys=["bio_rep"])
    xc = probe.sampler.input_rows(controls).all_rows()
    parts: dict[str, list] = {r: [] for r in RULES}
    scales = {}
    for name in names:
        shifts, scales[name] = held_out_shifts(train, xc.mean(0), name, on_target=not args.no_on_target)
        for rule, s in shifts.items():
            parts[rule].append(ad.AnnData((xc + s[None]).astype(np.float32), obs={"perturbation": [name] * len(xc)}))
        print(f"{name}: scale {scales[name]:.3f}", file=sys.stderr, flush=True)
    per_condition, summary = {}, {}
    for rule in RULES:
        pred = ad.concat(parts[rule])
        pred.var_names = list(probe.genes)
        pred.obs_names_make_unique()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a shift can leave values below 0, as for the baselines
            res = evaluate(test, pred, spec, train=train, min_cells=40, baselines=[], seed=args.seed, figures=False,
                           cell_eval=False)
        table = res.table.set_index("perturbation")
        per_condition[rule] = {m: table[m].round(4).to_dict() for m in METRICS if m in table}
        for subset, keep in (("all", names), ("unseen_9", [n for n in names if n in UNSEEN_9]),
                             ("others", [n for n in names if n not in UNSEEN_9])):
            summary.setdefault(subset, {"n": len(keep)})[rule] = {
                m: round(float(table.loc[keep, m].mean()), 4) for m in METRICS
                if m in table and table.loc[keep, m].notna().any()}
    out = {"config": {"protocol": "papalexi_rep3, one perturbation held out of training at a time", "seed": args.seed,
                      "pair_keys": ["bio_rep"], "anchors_only": True, "on_target": not args.no_on_target},
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
           "scales": {k: round(v, 3) for k, v in scales.items()}, "summary": summary, "per_condition": per_condition}
    emit_report(out, args.out)
    return out


if __name__ == "__main__":
    main()
