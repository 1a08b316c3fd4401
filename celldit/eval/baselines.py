"""Baselines that predict cells, so they are scored exactly like a model.

Every baseline predicts a condition P in covariate group g as control cells plus a shift:
``G = {c + s(P, g) : c in C_g}``, one predicted cell per real control cell of group g (so
``mean(G) = mean(C) + s`` exactly); with ``cells="request"`` it instead draws the request's
``n_cells`` control cells with replacement. Baselines differ only in the shift ``s``,
built from training cells in log1p-normalised space.
With ``m(S, g)`` the mean of the training cells of perturbation set S in group g and
``d(S, g) = m(S, g) - m(∅, g)`` (training controls of g):

* ``no_change``: ``s = 0`` (the control cells themselves).
* ``train_mean``: ``s(g)`` = unweighted mean of ``d(S, g)`` over the perturbation sets S
  seen in g; for a group without training perturbations, the unweighted mean of the other
  groups' ``s(h)``.
* ``mean_shift``: ``s = d(P, g)`` when P was seen in g, else the unweighted mean of
  ``d(P, h)`` over the groups h where P was seen; P never seen: ``train_mean`` (warned).
* ``additive``: ``s = sum_{a in P} s_mean_shift({a}, g)`` over the single perturbations of
  P; an unseen single contributes 0 (warned).
* ``linear``: see :mod:`celldit.eval.linear`.

Perturbation sets come from :meth:`PerturbationSpec.parse`, so ``A+ctrl`` and ``ctrl+A``
pool into ``{A}``.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from celldit.data.spec import PerturbationSpec
from celldit.eval.metrics import mean_expression
from celldit.eval.scoring import group_rows

__all__ = [
    "Baseline",
    "NoChange",
    "TrainMean",
    "MeanShift",
    "Additive",
    "BASELINES",
    "make_baseline",
    "prediction_requests",
    "run_baselines",
]

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
    def fit(self, train: AnnData, spec: PerturbationSpec) -> "Baseline":
        """Compute ``d(S, g)`` for every perturbation set and group of ``train``.

        ``train`` must be log1p-normalised; groups without training controls are skipped.
        """
        spec.validate(train)
        self.spec, self.var_names = spec, pd.Index(train.var_names)
        groups = group_rows(train, spec)
        pooled: dict[Key, list[np.ndarray]] = {}
        for (label, *covs), rows in groups.items():
            pooled.setdefault((spec.parse(label), tuple(covs)), []).append(rows)
        means = {k: mean_expression(train.X[np.concatenate(v)]) for k, v in pooled.items()}
        self.control_means = {covs: m for (s, covs), m in means.items() if not s}
        self.shifts = {(s, covs): m - self.control_means[covs]
                       for (s, covs), m in means.items() if s and covs in self.control_means}
        if not self.shifts and self.name not in ("no_change",):
            raise ValueError("training data has no perturbed cells with matching controls")
        self._fit_extra(train, spec)
        return self

    def _fit_extra(self, train: AnnData, spec: PerturbationSpec) -> None:
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
        for (s, g), d in self.shifts.items():
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

    def shift(self, label: str, covs: tuple[str, ...], control: AnnData,
              control_rows: np.ndarray) -> np.ndarray:
        """The shift added to the control cells for ``label`` in group ``covs``."""
        raise NotImplementedError

    # --------------------------------------------------------------- predict
    def predict(self, control: AnnData, requests: pd.DataFrame, seed: int = 0,
                cells: str = "control") -> AnnData:
        """Predicted cells for each request row.

        Parameters
        ----------
        control
            Real cells holding the control cells to start from (other cells are ignored),
            log1p-normalised, same genes as the training data.
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
        ctrl_mask = spec.control_mask(control)
        covs_all = spec.covariates(control).to_numpy()
        blocks, obs = [], []
        for i in range(len(requests)):
            rowd = requests.iloc[i].to_dict()
            covs = tuple(str(rowd[k]) for k in spec.covariate_keys)
            match = ctrl_mask.copy()
            for j in range(len(covs)):
                match &= covs_all[:, j] == covs[j]
            c_rows = np.flatnonzero(match)
            if len(c_rows) == 0:
                raise ValueError(f"no control cells for covariates "
                                 f"{dict(zip(spec.covariate_keys, covs))}")
            n = int(rowd["n_cells"])
            label = str(rowd[spec.perturbation_key])
            s = self.shift(label, covs, control, c_rows)
            if cells == "control":
                draw, n = c_rows, len(c_rows)
            else:
                draw = np.sort(np.random.default_rng([seed, i]).choice(c_rows, n, replace=True))
            x = control.X[draw]
            x = x.toarray() if sp.issparse(x) else np.asarray(x)
            blocks.append((x + s[None, :]).astype(np.float32))
            obs.append(pd.DataFrame({spec.perturbation_key: [label] * n,
                                     **{k: [v] * n for k, v in zip(spec.covariate_keys, covs)}}))
        frame = pd.concat(obs, ignore_index=True)
        for key in frame.columns:
            frame[key] = pd.Categorical(frame[key])
        frame["baseline"] = self.name
        frame.index = [f"{self.name}_{i}" for i in range(len(frame))]
        out = AnnData(np.vstack(blocks), obs=frame, var=control.var.copy())
        out.uns["celldit_baseline"] = {"name": self.name, "seed": seed, "notes": list(self.notes)}
        return out


class NoChange(Baseline):
    """``s = 0``: the prediction is the control cells themselves."""

    name = "no_change"

    def shift(self, label, covs, control, control_rows):
        return np.zeros(control.n_vars)


class TrainMean(Baseline):
    """``s(g)`` = mean training shift over perturbations (same for every condition)."""

    name = "train_mean"

    def shift(self, label, covs, control, control_rows):
        return self.train_mean_shift(covs)


class MeanShift(Baseline):
    """``s = d(P, g)``, or the mean of the other groups' ``d(P, h)`` for an unseen group."""

    name = "mean_shift"

    def shift(self, label, covs, control, control_rows):
        pset = self.spec.parse(label)
        s = self.mean_shift(pset, covs)
        if s is None:
            self._note(f"{label!r} unseen in training: using the train_mean shift")
            return self.train_mean_shift(covs)
        return s


class Additive(Baseline):
    """``s = sum`` of the single perturbations' mean shifts (for combinations)."""

    name = "additive"

    def shift(self, label, covs, control, control_rows):
        total = np.zeros(control.n_vars)
        for single in sorted(self.spec.parse(label)):
            s = self.mean_shift(frozenset([single]), covs)
            if s is None:
                self._note(f"single {single!r} unseen in training: it contributes 0")
                continue
            total = total + s
        return total


def _linear_class():
    from celldit.eval.linear import Linear

    return Linear


BASELINES: dict[str, type | None] = {
    "no_change": NoChange, "train_mean": TrainMean, "mean_shift": MeanShift,
    "additive": Additive, "linear": None,  # resolved lazily (celldit.eval.linear)
}


def make_baseline(name: str, **kwargs) -> Baseline:
    """A baseline by name (one of :data:`BASELINES`); kwargs go to its constructor."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    cls = _linear_class() if name == "linear" else BASELINES[name]
    return cls(**kwargs)


def run_baselines(train: AnnData, control: AnnData, requests: pd.DataFrame,
                  spec: PerturbationSpec, names: Sequence[str], seed: int = 0,
                  options: Mapping[str, dict] | None = None) -> dict[str, AnnData]:
    """Fit each named baseline on ``train`` and predict ``requests`` from ``control``."""
    options = options or {}
    return {name: make_baseline(name, **options.get(name, {})).fit(train, spec)
            .predict(control, requests, seed=seed) for name in names}
