"""Counterfactual cells on the Papalexi 2021 screen with the Python API.

    python examples/papalexi_counterfactuals.py --out runs/papalexi [--max-steps 1500]

Trains on replicates rep_1 + rep_2 of the copy bundled with the package, carries rep_3's
control cells to a few knockouts, and prints how well the counterfactual change of the
most changed genes matches the real rep_3 knockout cells. ``celldit demo`` runs the full
protocol (every perturbation, baselines, report).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import celldit
from celldit.data.bundled import bundled_papalexi
from celldit.data.expression import log_normalize
from celldit.eval.metrics import pearson_delta, top_k_de_genes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and the counterfactuals")
    parser.add_argument("--max-steps", type=int, default=1500)
    args = parser.parse_args()
    adata = bundled_papalexi()[0]
    rep = adata.obs["bio_rep"].astype(str)
    train, test = adata[rep != "rep_3"].copy(), adata[rep == "rep_3"].copy()
    model = celldit.CellDiT(train, perturbation_key="perturbation", control="control", pair_keys=["bio_rep"])
    model.fit(max_steps=args.max_steps)
    model.save(args.out / "model")
    controls = test[test.obs["perturbation"] == "control"].copy()
    knockouts = ["IFNGR1", "IRF1", "STAT1"]
    cf = model.counterfactual(controls, knockouts)
    cf.write_h5ad(args.out / "counterfactuals.h5ad")
    real = log_normalize(test)
    x = real.X.toarray()
    labels = real.obs["perturbation"].astype(str).to_numpy()
    ctrl_mean = x[labels == "control"].mean(0)
    print("knockout  cells  Pearson(delta) over its 20 most changed genes (real rep_3 vs counterfactual)")
    for ko in knockouts:
        true = x[labels == ko].mean(0) - ctrl_mean
        pred = np.asarray(cf[cf.obs["perturbation"] == ko].X).mean(0) - ctrl_mean
        top = top_k_de_genes(true, 20)
        print(f"{ko:9s} {int((labels == ko).sum()):5d}  {pearson_delta(true, pred, top):.3f}")

if __name__ == "__main__":
    main()
