"""The baseline protocol: fit per-condition shifts on training cells, predict control cells + shift.

Every baseline predicts a condition P in covariate group g as control cells plus a shift:
``G = {c + s(P, g) : c in C_g}``, one predicted cell per real control cell of group g (so
``mean(G) = mean(C) + s`` exactly); with ``cells="request"`` it instead draws the request's
``n_cells`` control cells with replacement. Baselines differ only in the shift ``s``
(:mod:`celldit.eval.baselines.shifts`, :mod:`celldit.eval.baselines.linear`), built from
training cells in log1p-normalised space. With ``m(S, g)`` the mean of the training cells
of perturbation set S in group g, ``d(S, g) = m(S, g) - m(∅, g)`` (training controls of g).
Perturbation sets come from :meth:`PerturbationSpec.parse`, so ``A+ctrl`` and ``ctrl+A``
pool into ``{A}``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from celldit.data.spec import PerturbationSpec
from celldit.eval.cells import GroupedCells
from celldit.eval.scoring import group_rows

__all__ = ["Baseline", "Key", "prediction_requests"]

Key = tuple[frozenset, tuple[str, ...]]


def prediction_requests(real: AnnData, spec: PerturbationSpec) -> pd.DataFrame:
    """What to predict for ``real``: one row per perturbed (label, covariates) group.

    Columns: the perturbation key, the covariate keys, ``n_cells`` (number of real cells).
    """
    rows = []
    for key, idx in group_rows(real, spec).items():
        if key[0] in spec.control_labels:
            continue
        rows.append({spec.perturbation_key: key[0],
                     **dict(zip(spec.covariate_keys, key[1:])), "n_cells": len(idx)})
    if not rows:
        raise ValueError(f"no perturbed cells in obs[{spec.perturbation_key!r}] to predict")
    return pd.DataFrame.from_records(rows)


class Baseline:
    """Base class: fit shifts on training cells, predict control cells + shift.

    Subclasses implement :meth:`shift`. After :meth:`fit`, ``self.shifts`` maps
    ``(perturbation set, covariate values)`` to ``d(S, g)`` and ``self.control_means`` maps
    covariate values to the training control mean.
    """

    name = "baseline"

    def __init__(self) -> None:
        self.spec: PerturbationSpec | None = None
        self.shifts: dict[Key, np.ndarray] = {}
        self.control_means: dict[tuple[str, ...], np.ndarray] = {}
        self.var_names: pd.Index | None = None
        self.notes: list[str] = []

    # ------------------------------------------------------------------ fitting
    def fit(self, train: AnnData | GroupedCells, spec: PerturbationSpec) -> Baseline:
        """Compute ``d(S, g)`` for every perturbation set and group of ``train``.

        ``train``: training cells, an AnnData whose ``X`` is read as it is (log1p-normalised),
        or :class:`~celldit.eval.cells.GroupedCells` (e.g. counts normalised on read, as
        :func:`~celldit.eval.report.evaluate` builds them); groups without training controls
        are skipped.
        """
        if isinstance(train, AnnData):
            spec.validate(train)
            train = GroupedCells.as_given(train, spec)
        self.spec, self.var_names = spec, pd.Index(train.genes)
        pooled: dict[Key, list[tuple[str, ...]]] = {}
        for label, *covs in train.groups:
            pooled.setdefault((spec.parse(label), tuple(covs)), []).append((label, *covs))
        means = {k: train.mean(v) for k, v in pooled.items()}
        self.control_means = {covs: m for (s, covs), m in means.items() if not s}
        self.shifts = {(s, covs): m - self.control_means[covs]
                       for (s, covs), m in means.items() if s and covs in self.control_means}
        if not self.shifts and self.name not in ("no_change",):
            raise ValueError("training data has no perturbed cells with matching controls")
        self._fit_extra(train, spec)
        return self

    def _fit_extra(self, train: GroupedCells, spec: PerturbationSpec) -> None:
        """Hook for subclasses needing more than the mean shifts."""

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            warnings.warn(f"{self.name}: {message}", UserWarning, stacklevel=3)

    # ---------------------------------------------------------------- shifts
    def _group_average(self, values: Sequence[np.ndarray]) -> np.ndarray:
        return np.mean(np.vstack(values), axis=0)

    def train_mean_shift(self, covs: tuple[str, ...]) -> np.ndarray:
        """``train_mean`` shift of group ``covs`` (see module docstring)."""
        per_group: dict[tuple[str, ...], list[np.ndarray]] = {}
        for (_s, g), d in self.shifts.items():
            per_group.setdefault(g, []).append(d)
        if covs in per_group:
            return self._group_average(per_group[covs])
        return self._group_average([self._group_average(v) for v in per_group.values()])

    def mean_shift(self, pset: frozenset, covs: tuple[str, ...]) -> np.ndarray | None:
        """``d(P, g)``, or the mean over other groups; None when P was never seen."""
        if (pset, covs) in self.shifts:
            return self.shifts[(pset, covs)]
        seen = [d for (s, g), d in self.shifts.items() if s == pset]
        return self._group_average(seen) if seen else None

    def shift(self, label: str, covs: tuple[str, ...], control_mean: np.ndarray) -> np.ndarray:
        """The shift added to the control cells for ``label`` in group ``covs`` (whose mean
        control cell is ``control_mean``)."""
        raise NotImplementedError

    # --------------------------------------------------------------- predict
    def predict(self, control: AnnData, requests: pd.DataFrame, seed: int = 0,
                cells: str = "control") -> AnnData:
        """Predicted cells for each request row.

        Parameters
        ----------
        control
            Real cells holding the control cells to start from (other cells are ignored):
            an AnnData read as it is (log1p-normalised), or
            :class:`~celldit.eval.cells.GroupedCells`; same genes as the training data.
        requests
            Rows with the perturbation key, covariate keys and ``n_cells`` (see
            :func:`prediction_requests`).
        seed
            With ``cells="request"``, request i draws its control cells with
            ``numpy.random.default_rng([seed, i])``.
        cells
            ``"control"`` (default): every control cell of the group, once each;
            ``"request"``: ``n_cells`` control cells drawn with replacement.

        Returns
        -------
        AnnData
            Dense float32 ``X``, ``var`` of ``control``, ``obs`` with the perturbation key,
            the covariate keys and ``baseline``.
        """
        if self.spec is None:
            raise RuntimeError(f"{self.name}: call fit() before predict()")
        if cells not in ("control", "request"):
            raise ValueError(f"cells must be 'control' or 'request', got {cells!r}")
        spec = self.spec
        if not pd.Index(control.var_names).equals(self.var_names):
            raise ValueError(f"{self.name}: control cells have other genes than the training data")
        missing = [k for k in (spec.perturbation_key, *spec.covariate_keys, "n_cells")
                   if k not in requests.columns]
        if missing:
            raise ValueError(f"requests lack column(s) {missing}")
        real = control if isinstance(control, GroupedCells) else GroupedCells.as_given(control, spec)
        blocks, obs = [], []
        for i in range(len(requests)):
            rowd = requests.iloc[i].to_dict()
            covs = tuple(str(rowd[k]) for k in spec.covariate_keys)
            label = str(rowd[spec.perturbation_key])
            c_rows = real.control_rows(spec, covs)
            if len(c_rows) == 0:
                raise ValueError(f"no control cells for covariates "
                                 f"{dict(zip(spec.covariate_keys, covs))}")
            s = self.shift(label, covs, real.mean(real.control_keys(spec, covs)))
            draw = c_rows if cells == "control" else np.sort(
                np.random.default_rng([seed, i]).choice(c_rows, int(rowd["n_cells"]), replace=True))
            blocks.append((real.cells(draw) + s[None, :]).astype(np.float32))
            obs.append(pd.DataFrame({spec.perturbation_key: [label] * len(draw),
                                     **{k: [v] * len(draw) for k, v in zip(spec.covariate_keys, covs)}}))
        frame = pd.concat(obs, ignore_index=True)
        for key in frame.columns:
            frame[key] = pd.Categorical(frame[key])
        frame["baseline"] = self.name
        frame.index = [f"{self.name}_{i}" for i in range(len(frame))]
        out = AnnData(np.vstack(blocks), obs=frame, var=pd.DataFrame(index=self.var_names))
        out.uns["celldit_baseline"] = {"name": self.name, "seed": seed, "notes": list(self.notes)}
        return out
