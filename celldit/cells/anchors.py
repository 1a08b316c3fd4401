"""Conditions of the training cells and their mean shifts (the flow's anchors).

A condition is a perturbation set with one dose per member; the control condition is the
empty set. Its *anchor* is the mean-shift estimate of its effect: for each covariate group
in which it was trained, mean(perturbed) - mean(control), averaged over those groups
(exactly the mean-shift baseline's estimate). The control-source flow starts from
``control cell + anchor``, so an untrained network (which outputs exactly zero) already
predicts mean shift, and training learns what a mean shift misses: mixtures, changes of
spread, effects that depend on the cell's state. A covariate group never trained with a
condition (a held-out cell type) gets a group-weighted anchor (see :class:`ConditionTable`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data.spec import PerturbationSpec
from .vocab import parse_condition

ConditionKey = tuple[tuple[str, ...], tuple[float, ...]]  # (sorted names, their doses)


def median_bandwidth(means: Sequence[np.ndarray]) -> float | None:
    """The median squared distance between mean control cells (the kernel's bandwidth by the
    median heuristic); None with fewer than two of them or when they coincide."""
    d2 = [float(((a - b) ** 2).sum()) for i, a in enumerate(means) for b in means[i + 1:]]
    return float(np.median(d2)) if d2 and np.median(d2) > 0 else None


def likeness_weights(d2: np.ndarray, bandwidth: float | None) -> np.ndarray:
    """Normalised kernel weights ``exp(-(d2 - min d2) / bandwidth)`` of groups at squared
    distances ``d2`` (all alike without a bandwidth)."""
    w = np.exp(-(d2 - d2.min()) / bandwidth) if bandwidth else np.ones(len(d2))
    return w / w.sum()


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

    Parameters
    ----------
    keys, anchors
        The conditions and their anchors (the mean over covariate groups of their shifts).
    group_shifts
        ``{(row, group): (G,)}`` the per-group shifts of the conditions trained in two or
        more covariate groups.
    group_controls
        ``{group: (G,)}`` the mean control cell of each covariate group.
    gates
        The conditions' shrinkage gate factors (see :mod:`celldit.cells.shrinkage`; None: all 1).
    escapers
        The conditions' shares of escapers (see :mod:`celldit.cells.escapers`; None: all 0).

    A covariate group that never saw a condition gets a *group-weighted* anchor: the
    condition's group shifts averaged with kernel weights ``exp(-|c - c_g|^2 / h)``, where
    ``c`` is the mean of the cells the prediction starts from, ``c_g`` a trained group's
    mean control cell and ``h`` the median squared distance between the training groups'
    mean control cells (the median heuristic). With ``bandwidth_rule="leave_one_group_out"``
    ``h`` is that times a factor (1/8 to 4, or infinite: the plain mean) chosen on the
    training groups' own shifts, each predicted from the other groups' (when a condition was
    trained in three groups or more; ``bandwidth_factor``). Groups alike at baseline weigh more: a held-out monocyte type borrows mostly
    from the other monocytes. With one group, or far apart groups alike, this is the plain
    mean of the mean-shift baseline.
    """

    keys: list[ConditionKey]
    anchors: np.ndarray
    group_shifts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    group_controls: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    gates: np.ndarray | None = field(default=None, repr=False)  # (n_conditions,) shrinkage gates
    bandwidth_rule: str = "median"  # or "leave_one_group_out" (see the class notes)
    escapers: np.ndarray | None = field(default=None, repr=False)  # (n_conditions,) shares of escapers

    def __post_init__(self) -> None:
        self._row = {k: i for i, k in enumerate(self.keys)}
        self._shifts_of: dict[int, list[tuple[int, np.ndarray]]] = {}  # row -> [(group, shift)]
        for (r, g), v in sorted(self.group_shifts.items()):
            self._shifts_of.setdefault(r, []).append((g, v))
        self.bandwidth = median_bandwidth(list(self.group_controls.values()))
        self.bandwidth_factor = 1.0
        if self.bandwidth is not None and self.bandwidth_rule == "leave_one_group_out":
            self.bandwidth_factor = self._leave_one_group_out()
            self.bandwidth *= self.bandwidth_factor

    def _leave_one_group_out(self, max_rows: int = 256) -> float:
        """The factor of the median heuristic whose kernel predicts the training groups' shifts
        best, each group's shift of a condition from its other groups (squared error summed over
        the conditions trained in three groups or more, at most ``max_rows`` of them); the
        widest within 1% of the least error, as for unseen perturbations
        (:mod:`celldit.cells.borrowing`). 1 (the median heuristic) when no condition has three
        groups: with two, each is predicted by the other whatever the bandwidth."""
        from .borrowing import BANDWIDTH_FACTORS

        rows = [r for r, items in sorted(self._shifts_of.items()) if len(items) >= 3][:max_rows]
        if not rows:
            return 1.0
        errors = [sum(float(((self.group_weighted_anchor(r, self.group_controls[g], exclude=g,
                                                         bandwidth=self.bandwidth * factor) - v) ** 2).sum())
                      for r in rows for g, v in self._shifts_of[r]) for factor in BANDWIDTH_FACTORS]
        least = min(errors)
        return float([f for f, e in zip(BANDWIDTH_FACTORS, errors) if e <= least * 1.01][-1])

    def row(self, key: ConditionKey) -> int | None:
        return self._row.get(key)

    def single_rows(self) -> dict[int, str]:
        """``{row: name}`` of the trained single-perturbation conditions."""
        return {i: k[0][0] for k, i in self._row.items() if len(k[0]) == 1}

    def group_weighted_anchor(self, row: int, control_mean: np.ndarray | None,
                              exclude: int | None = None, bandwidth: float | None = None) -> np.ndarray:
        """Anchor of condition ``row`` for cells of mean ``control_mean`` in a covariate
        group never trained with it (see the class notes); ``exclude`` leaves one group out,
        ``bandwidth`` replaces the table's. Conditions trained in a single group get their anchor."""
        items = [(g, v) for g, v in self._shifts_of.get(row, []) if g != exclude]
        if not items:
            return self.anchors[row]
        bandwidth = self.bandwidth if bandwidth is None else bandwidth
        if bandwidth is None or control_mean is None:
            w = np.full(len(items), 1.0 / len(items))
        else:
            w = likeness_weights(np.array([((control_mean - self.group_controls[g]) ** 2).sum() for g, _ in items]),
                                 bandwidth)
        return (np.tensordot(w, np.stack([v for _, v in items]), axes=1)).astype(self.anchors.dtype)

    def held_out_anchor(self, row: int, group: int) -> np.ndarray | None:
        """Anchor of condition ``row`` as covariate group ``group`` would get it had it never
        been trained with it (its other groups, weighted by likeness to ``group``; None when
        it has no other group).

        Training cells whose covariates are hidden start from this anchor, so that the
        network learns to correct a held-out group's anchor error from the cell's state, as
        it must at prediction time.
        """
        if not any(g != group for g, _ in self._shifts_of.get(row, [])):
            return None
        return self.group_weighted_anchor(row, self.group_controls.get(group), exclude=group)

    def anchor(self, key: ConditionKey, control_mean: np.ndarray | None = None,
               neighbours=None) -> np.ndarray:
        """Anchor of any condition: its own when trained; else the sum of its members'
        single anchors (the additive estimate), each taken at the nearest trained dose and
        scaled linearly by dose. A member never trained gets ``neighbours(name) -> {row:
        weight}`` (trained conditions alike to it, e.g. by prior features), the weighted mean
        of their anchors; without it, it adds nothing. With ``control_mean`` (cells of a
        covariate group never trained with the condition), trained anchors are group-weighted
        (see the class notes)."""

        def own(row: int) -> np.ndarray:
            return self.anchors[row] if control_mean is None else self.group_weighted_anchor(row, control_mean)

        row = self.row(key)
        if row is not None:
            return own(row)
        total = np.zeros(self.anchors.shape[1], dtype=self.anchors.dtype)
        for name, dose in zip(*key):
            singles = [(k[1][0], i) for k, i in self._row.items() if k[0] == (name,)]
            if not singles:
                for i, w in (neighbours(name) if neighbours is not None else {}).items():
                    total += w * own(i)
                continue
            ref, i = min(singles, key=lambda s: abs(s[0] - dose))
            total += own(i) * (dose / ref if ref else 1.0)
        return total

    def to_dict(self) -> list:
        return [[list(names), list(doses)] for names, doses in self.keys]

    def group_tensors(self) -> dict[str, np.ndarray]:
        """The group tables as arrays (for safetensors; see :meth:`from_dict`)."""
        n_genes = self.anchors.shape[1]
        shift_keys = sorted(self.group_shifts)
        groups = sorted(self.group_controls)
        return {"gates": (np.ones(len(self.keys)) if self.gates is None else self.gates).astype(np.float32),
                "escapers": (np.zeros(len(self.keys)) if self.escapers is None else self.escapers).astype(np.float32),
                "shift_keys": np.array(shift_keys, dtype=np.int64).reshape(-1, 2),
                "shifts": np.stack([self.group_shifts[k] for k in shift_keys]) if shift_keys
                else np.zeros((0, n_genes), np.float32),
                "control_groups": np.array(groups, dtype=np.int64),
                "controls": np.stack([self.group_controls[g] for g in groups]) if groups
                else np.zeros((0, n_genes), np.float32)}

    @classmethod
    def from_dict(cls, data: list, anchors: np.ndarray, groups: dict[str, np.ndarray] | None = None,
                  bandwidth_rule: str = "median") -> ConditionTable:
        keys = [(tuple(n), tuple(float(d) for d in ds)) for n, ds in data]
        if not groups:
            return cls(keys, anchors)
        shifts = {(int(r), int(g)): v for (r, g), v in zip(groups["shift_keys"], groups["shifts"])}
        controls = {int(g): v for g, v in zip(groups["control_groups"], groups["controls"])}
        gates = groups.get("gates")  # absent in folders saved before shrinkage: all open
        escapers = groups.get("escapers")  # absent in folders saved before escapers: none
        return cls(keys, anchors, shifts, controls, None if gates is None else np.asarray(gates, np.float64),
                   bandwidth_rule, None if escapers is None else np.asarray(escapers, np.float64))

    def escaper_share(self, key: ConditionKey) -> float:
        """Share of escapers of a trained condition (0 for an untrained one or without escapers)."""
        row = self._row.get(key)
        return 0.0 if row is None or self.escapers is None else float(self.escapers[row])

    def gate(self, key: ConditionKey) -> float:
        """Shrinkage gate of a trained condition (1 for an untrained one or without gates)."""
        row = self.row(key)
        return 1.0 if row is None or self.gates is None else float(self.gates[row])


def build_condition_table(keys: Sequence[ConditionKey], groups: np.ndarray, rows, n_genes: int,
                          anchored: bool = True, shrinkage: str | None = None, gate: float = 2.0,
                          floor: float = 0.1, target_columns: Mapping[str, int] | None = None,
                          bandwidth_rule: str = "median") -> tuple[ConditionTable, np.ndarray]:
    """Index the cells' conditions and compute their anchors.

    Parameters
    ----------
    keys
        Condition key of each training cell.
    groups
        (n_cells,) covariate-group code of each cell (shifts are taken within a group).
    rows
        The cells' expression rows (``rows(idx)``, ``n_obs``, ``n_vars``): the mean of every
        (condition, group) is computed in one chunked pass (:func:`~celldit.data.rows.group_sums`).
    n_genes
        G.
    anchored
        Compute mean-shift anchors (else all zero; the groups' mean control cells are computed
        either way).
    shrinkage, gate, floor
        Shrink the anchors (and the groups' shifts alike) toward zero by their standard errors,
        from the per-gene variances of the same pass (see :mod:`celldit.cells.shrinkage`).
        ``table.gates`` holds each condition's gate factor (1 for control and clear conditions).
    bandwidth_rule
        Of the group-weighted anchor (see :class:`ConditionTable`).
    target_columns
        ``{perturbation name: its column}`` for perturbations named after a model gene: the
        target of a knockout (or activation) is known to move, so its own column keeps the
        measured shift while the rest of the condition's shift is shrunk (the on-target prior;
        see :mod:`celldit.cells.on_target`).

    Returns
    -------
    The table and the (n_cells,) condition row of every cell.
    """
    from ..data.rows import group_sums

    control = ((), ())
    uniq = [control] + sorted(set(keys) - {control})
    table_rows = {k: i for i, k in enumerate(uniq)}
    cond_id = np.array([table_rows[k] for k in keys], dtype=np.int64)
    anchors = np.zeros((len(uniq), n_genes), dtype=np.float32)
    shifts: dict[tuple[int, int], np.ndarray] = {}
    ctrl_means: dict[int, np.ndarray] = {}
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if groups.size else 1
    pair = np.where(cond_id == 0, groups, -1) if not anchored else cond_id * n_groups + groups
    shrink = anchored and shrinkage is not None
    sums, sizes, *squares = group_sums(rows, pair, (len(uniq) if anchored else 1) * n_groups, squares=shrink)
    means_of: dict[int, dict[int, np.ndarray]] = {}  # condition row -> {group: mean}
    for p in np.flatnonzero(sizes):
        means_of.setdefault(int(p) // n_groups, {})[int(p) % n_groups] = (sums[p] / sizes[p]).astype(np.float32)

    def se2_of(row: int, g: int) -> np.ndarray:
        """Squared standard error of a (condition, group) mean: sample variance / n (inf for one cell)."""
        p = row * n_groups + g
        if sizes[p] < 2:
            return np.full(n_genes, np.inf)
        return np.maximum(squares[0][p] - sums[p] ** 2 / sizes[p], 0.0) / (sizes[p] - 1) / sizes[p]

    ctrl_means = means_of.get(0, {})
    se2 = np.full((len(uniq), n_genes), np.inf)
    if anchored:
        for row in range(1, len(uniq)):
            mine = {g: m - ctrl_means[g] for g, m in sorted(means_of.get(row, {}).items()) if g in ctrl_means}
            if mine:
                anchors[row] = np.mean(list(mine.values()), axis=0)
                if shrink:  # the anchor averages the groups' shifts: its variance is the mean of theirs / m
                    se2[row] = sum(se2_of(row, g) + se2_of(0, g) for g in mine) / len(mine) ** 2
            if len(mine) > 1:  # with one group its shift is the anchor, in every group
                shifts.update({(row, g): v for g, v in mine.items()})
    gates = np.ones(len(uniq))
    if shrink and len(uniq) > 1:
        from .shrinkage import empirical_bayes, shrink_group_shift, shrink_shifts

        raw = anchors[1:].astype(np.float64)
        anchors[1:], gates[1:], mix = shrink_shifts(raw, se2[1:], shrinkage, gate, floor)
        eb = empirical_bayes(raw, se2[1:])
        measured = dict(shifts)
        shifts = {(r, g): shrink_group_shift(v, eb[r - 1], gates[r], mix[r - 1]) for (r, g), v in shifts.items()}
        if target_columns:  # the on-target prior: a perturbation's own target keeps its measured shift
            targets = {row: sorted({target_columns.get(name) for name in key[0]} - {None})
                       for row, key in enumerate(uniq) if row}
            for row, cols in targets.items():
                anchors[row, cols] = raw[row - 1, cols]
            for (row, g), v in shifts.items():
                v[targets[row]] = measured[row, g][targets[row]]
    return ConditionTable(uniq, anchors, shifts, ctrl_means, gates, bandwidth_rule), cond_id
