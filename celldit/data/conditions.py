"""Conditions of the training cells and their mean shifts (the flow's anchors).

A condition is a perturbation set with one dose per member; the control condition is the
empty set. Its *anchor* is the mean-shift estimate of its effect: for each covariate group
in which it was trained, mean(perturbed) - mean(control), averaged over those groups
(exactly the mean-shift baseline's estimate). The control-source flow starts from
``control cell + anchor``, so an untrained network (which outputs exactly zero) already
predicts mean shift, and training learns what a mean shift misses: mixtures, changes of
spread, effects that depend on the cell's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .spec import PerturbationSpec
from .vocab import parse_condition

ConditionKey = tuple[tuple[str, ...], tuple[float, ...]]  # (sorted names, their doses)


def cell_conditions(obs: pd.DataFrame, spec: PerturbationSpec) -> list[ConditionKey]:
    """Condition key of every cell of ``obs`` under ``spec``: (sorted names, their doses)."""
    labels = obs[spec.perturbation_key].astype(str).to_numpy()
    doses = obs[spec.dose_key].to_numpy(dtype=object) if spec.dose_key else [None] * len(labels)
    cache: dict = {}
    keys = []
    for lab, dose in zip(labels, doses):
        if (lab, dose) not in cache:
            cache[(lab, dose)] = parse_condition(lab, dose, spec)
        keys.append(cache[(lab, dose)])
    return keys


@dataclass
class ConditionTable:
    """The training conditions (row 0 is control) and their anchors (n_conditions, G).

    ``group_shifts`` holds the per-group shifts behind the anchors, ``{(row, group): (G,)}``:
    a training-time quantity (not saved) from which :meth:`held_out_anchor` is taken.
    """

    keys: list[ConditionKey]
    anchors: np.ndarray
    group_shifts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._row = {k: i for i, k in enumerate(self.keys)}

    def held_out_anchor(self, row: int, group: int) -> np.ndarray | None:
        """Anchor of condition ``row`` as a covariate group never trained with it would
        get it: the mean of its *other* groups' shifts (None when it has no other group).

        Training cells whose covariates are hidden start from this anchor, so that the
        network learns to correct a held-out group's mean-shift error from the cell's
        state, as it must at prediction time.
        """
        others = [s for (r, g), s in self.group_shifts.items() if r == row and g != group]
        return np.mean(others, axis=0).astype(self.anchors.dtype) if others else None

    def row(self, key: ConditionKey) -> int | None:
        return self._row.get(key)

    def anchor(self, key: ConditionKey) -> np.ndarray:
        """Anchor of any condition: its own when trained; else the sum of its members'
        single anchors (the additive estimate), each taken at the nearest trained dose and
        scaled linearly by dose; members never trained add nothing."""
        row = self.row(key)
        if row is not None:
            return self.anchors[row]
        total = np.zeros(self.anchors.shape[1], dtype=self.anchors.dtype)
        for name, dose in zip(*key):
            singles = [(k[1][0], i) for k, i in self._row.items() if k[0] == (name,)]
            if not singles:
                continue
            ref, i = min(singles, key=lambda s: abs(s[0] - dose))
            total += self.anchors[i] * (dose / ref if ref else 1.0)
        return total

    def to_dict(self) -> list:
        return [[list(names), list(doses)] for names, doses in self.keys]

    @classmethod
    def from_dict(cls, data: list, anchors: np.ndarray) -> "ConditionTable":
        return cls([(tuple(n), tuple(float(d) for d in ds)) for n, ds in data], anchors)


def build_condition_table(keys: Sequence[ConditionKey], groups: np.ndarray, x_mean_fn,
                          n_genes: int, anchored: bool = True) -> tuple[ConditionTable, np.ndarray]:
    """Index the cells' conditions and compute their anchors.

    Parameters
    ----------
    keys
        Condition key of each training cell.
    groups
        (n_cells,) covariate-group code of each cell (shifts are taken within a group).
    x_mean_fn
        ``x_mean_fn(cell_indices) -> (G,)`` mean expression of those cells.
    n_genes
        G.
    anchored
        Compute mean-shift anchors (else all zero).

    Returns
    -------
    The table and the (n_cells,) condition row of every cell.
    """
    control = ((), ())
    uniq = [control] + sorted(set(keys) - {control})
    table_rows = {k: i for i, k in enumerate(uniq)}
    cond_id = np.array([table_rows[k] for k in keys], dtype=np.int64)
    anchors = np.zeros((len(uniq), n_genes), dtype=np.float32)
    shifts: dict[tuple[int, int], np.ndarray] = {}
    if anchored:
        ctrl_means = {int(g): x_mean_fn(idx) for g in np.unique(groups)
                      if (idx := np.flatnonzero((cond_id == 0) & (groups == g))).size}
        for row in range(1, len(uniq)):
            for g in map(int, np.unique(groups[cond_id == row])):
                if g in ctrl_means:
                    shifts[(row, g)] = x_mean_fn(np.flatnonzero((cond_id == row) & (groups == g))) - ctrl_means[g]
            mine = [s for (r, _), s in shifts.items() if r == row]
            if mine:
                anchors[row] = np.mean(mine, axis=0)
    return ConditionTable(uniq, anchors, shifts), cond_id
