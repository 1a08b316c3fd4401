"""The splits the peers are run on, written as folders their runners read (layout in
``benchmarks/peer_runners/common.py``): ``benchmarks/cells.py``'s papalexi_rep3 and kang
protocols, and the validation split used for tuning (train rep_1, predict rep_2)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pandas as pd

from celldit.data.expression import log_normalize
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutCovariateGroup, HeldOutReplicate

# as benchmarks/cells.py: papalexi_rep3 (min_cells 40) and kang (min_cells 1)
PAPALEXI_BASELINES = ["no_change", "train_mean", "mean_shift", "linear"]
KANG_BASELINES = ["no_change", "mean_shift", "linear"]


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
