"""What a fitted model knows of each trained condition before any cell is carried: its anchor
(the shrunk mean shift a control-source prediction starts from, or the noise prior's offset)
and the evidence of an effect behind it.

A biologist reading a prediction wants to know which perturbations the model treats as having
no detectable effect: their predictions stay close to the control cells by design (see
:mod:`celldit.cells.shrinkage`), and should be read as "no effect detected in training", not as
a measured null.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["condition_effects", "evidence_summary"]


def _evidence(gate: float, floor: float, shrinkage: str | None) -> str:
    if shrinkage is None or shrinkage == "eb":
        return "not gated"
    if gate >= 1.0 - 1e-6:
        return "clear"
    return "none detected" if gate <= floor + 1e-6 else "weak"


def condition_effects(model: Any, top: int = 3) -> pd.DataFrame:
    """One row per trained condition (control excluded): its evidence and its anchor.

    Parameters
    ----------
    model
        A :class:`~celldit.cells.model.CellDiT` (fitted or not: anchors are set at registration).
    top
        How many genes to name in ``up`` and ``down``.

    Returns
    -------
    pandas.DataFrame
        Indexed by the condition's label (its perturbations joined by the spec's delimiter),
        with columns ``dose`` (with a dose key), ``gate`` (the shrinkage gate: 1 for a clear
        effect, kept as measured; ``shrinkage_floor`` when the shift is at the level of its
        sampling noise), ``evidence`` (``"clear"``, ``"weak"``, ``"none detected"``, or ``"not
        gated"`` without a gate), ``anchor_norm`` (the anchor's Euclidean length in the model's
        expression space), ``largest`` (the gene the anchor moves most) and its change
        ``largest_change``, ``up`` / ``down`` (the ``top`` genes the anchor raises / lowers
        most, comma-joined), and ``escapers`` (the share of its cells that keep the control state,
        see :mod:`celldit.cells.escapers`; 0 where its cells are not split).
    """
    if top < 1:
        raise ValueError(f"top={top}: must be >= 1")
    table, spec, config = model.conditions, model.spec, model.config
    genes = np.asarray(model.genes, dtype=object)
    gates = np.ones(len(table.keys)) if table.gates is None else np.asarray(table.gates, dtype=np.float64)
    rows, index = [], []
    for r, (names, doses) in enumerate(table.keys):
        if not names:  # the control condition: zero anchor by construction
            continue
        anchor = np.asarray(table.anchors[r], dtype=np.float64)
        order = np.argsort(anchor)
        largest = int(np.argmax(np.abs(anchor)))
        row = {"gate": round(float(gates[r]), 4),
               "evidence": _evidence(float(gates[r]), config.shrinkage_floor, config.anchor_shrinkage),
               "anchor_norm": round(float(np.linalg.norm(anchor)), 4),
               "largest": str(genes[largest]), "largest_change": round(float(anchor[largest]), 4),
               "up": ", ".join(genes[order[::-1][:top]][anchor[order[::-1][:top]] > 0]),
               "down": ", ".join(genes[order[:top]][anchor[order[:top]] < 0]),
               "escapers": round(table.escaper_share((names, doses)) if config.escapers else 0.0, 4)}
        if spec.dose_key is not None:
            row = {"dose": spec.delimiter.join(f"{d:g}" for d in doses), **row}
        rows.append(row)
        index.append(spec.delimiter.join(names))
    out = pd.DataFrame(rows, index=pd.Index(index, name=spec.perturbation_key))
    return out.sort_values(["gate", "anchor_norm"], ascending=False, kind="stable")


def evidence_summary(table: pd.DataFrame) -> str:
    """One line for logs: how many conditions of a :func:`condition_effects` table have each
    level of evidence, and how many are split by escapers, e.g. ``"11 clear, 2 weak, 12 none
    detected; 4 with escapers"``."""
    counts = table["evidence"].value_counts()
    order = [e for e in ("clear", "weak", "none detected", "not gated") if e in counts.index]
    line = ", ".join(f"{int(counts[e])} {e}" for e in order)
    split = int((table["escapers"] > 0).sum()) if "escapers" in table else 0
    return f"{line}; {split} with escapers" if split else line
