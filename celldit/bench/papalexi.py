"""The Papalexi 2021 screen split by replicate, as the ``benchmarks/`` scripts score it.

One replicate (``obs['bio_rep']``) is held out: its control cells are carried, and the
perturbations with at least ``min_cells`` of its cells are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad

from ..data.spec import PerturbationSpec
from ..data.splits import HeldOutReplicate

__all__ = ["PAPALEXI", "ReplicateSplit", "held_out_replicate"]

#: the screen's file name in the shared data folder (and in the bundled one)
PAPALEXI = "papalexi2021_thp1_crispr_ko.h5ad"


@dataclass
class ReplicateSplit:
    """The screen split by replicate."""

    spec: PerturbationSpec
    train: ad.AnnData  # every cell of the other replicates
    test: ad.AnnData  # every cell of the held-out replicate
    conditions: list[str]  # scored perturbations, sorted
    controls: ad.AnnData  # the held-out replicate's control cells


def held_out_replicate(data: Path, held_out: str = "rep_3", min_cells: int = 40) -> ReplicateSplit:
    """Read ``data / PAPALEXI`` and hold out replicate ``held_out``.

    Raises
    ------
    ValueError
        When ``held_out`` is not a value of ``obs['bio_rep']`` (the message lists them).
    """
    raw = ad.read_h5ad(Path(data) / PAPALEXI)
    reps = sorted(raw.obs["bio_rep"].astype(str).unique())
    if held_out not in reps:
        raise ValueError(f"held-out replicate {held_out!r}: not a value of obs['bio_rep'] ({reps})")
    spec = PerturbationSpec("perturbation", control="control")
    masks = HeldOutReplicate(spec, key="bio_rep", values=[held_out]).masks(raw)
    train, test = raw[masks.train].copy(), raw[masks.test].copy()
    labels = test.obs["perturbation"].astype(str)
    conditions = sorted(p for p, n in labels[labels != "control"].value_counts().items() if n >= min_cells)
    return ReplicateSplit(spec, train, test, conditions, test[(labels == "control").to_numpy()].copy())
