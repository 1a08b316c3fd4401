"""Cells of an evaluation, grouped by condition, read on demand (memory bounded by a condition).

:class:`GroupedCells` indexes the cells of an AnnData by ``(label, *covariate values)`` and
reads them in log1p-normalised space through :class:`~celldit.data.rows.ExpressionRows`
(counts normalised on read, nothing copied); the mean of every group comes from one
chunked pass. A *prediction* is anything that gives, for a condition, its mean predicted
cell and ``n`` cells drawn from it:

* :class:`CellsPrediction`: predicted cells (a model's output AnnData, in memory or backed);
* :class:`ShiftPrediction`: control cells plus a baseline's shift, computed for the cells
  that are drawn only (never one dense block per control cell and condition).

Scoring (:mod:`celldit.eval.scoring`) needs at most ``max_cells`` predicted and true cells of
one condition at a time, whatever the size of the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..data.rows import ExpressionRows, group_sums
from ..data.spec import PerturbationSpec

__all__ = ["CellsPrediction", "GroupedCells", "PlainRows", "ShiftPrediction", "Key"]

Key = tuple[str, ...]  # (label, *covariate values)


class PlainRows:
    """The rows of ``adata.X`` as they are (predictions: log1p values, negatives allowed)."""

    def __init__(self, adata: AnnData):
        from ..data.expression import check_expression

        self._x = adata.X
        self.n_obs, self.n_vars = adata.shape
        negative, low = 0, 0.0
        for start in range(0, self.n_obs, 8192):  # NaN / infinite values, in one chunked pass
            block = self._x[start: start + 8192]
            block = block.to_memory() if hasattr(block, "to_memory") else block
            check_expression(block, "pred X", allow_negative=True)
            values = block.data if sp.issparse(block) else np.asarray(block)
            if values.size:
                negative += int((values < 0).sum())
                low = min(low, float(values.min()))
        if negative:
            import warnings

            warnings.warn(f"pred X holds {negative} negative values (min {low:.3g}), impossible in log1p-normalised "
                          "space; they are scored as given (celldit's outputs keep X on the support, see "
                          "CellDiT.counterfactual(support=...))", UserWarning, stacklevel=3)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        block = self._x[uniq]
        block = block.to_memory() if hasattr(block, "to_memory") else block
        dense = block.toarray() if sp.issparse(block) else np.asarray(block)
        return np.asarray(dense, dtype=np.float32)[inverse]


def _keys(adata: AnnData, spec: PerturbationSpec) -> dict[Key, np.ndarray]:
    frame = pd.DataFrame({"__label": spec.labels(adata)})
    covs = spec.covariates(adata)
    for key in spec.covariate_keys:
        frame[key] = covs[key].to_numpy()
    cols = ["__label", *spec.covariate_keys]
    return {tuple(str(v) for v in (k if isinstance(k, tuple) else (k,))): np.asarray(idx)
            for k, idx in frame.groupby(cols, sort=True, observed=True).indices.items()}


class GroupedCells:
    """Cells grouped by ``(label, *covariates)``, readable in log1p-normalised space.

    Parameters
    ----------
    rows
        The cells' rows (``rows(idx)``, ``n_obs``, ``n_vars``).
    groups
        ``{(label, *covariates): row indices}``.
    genes
        Gene names of the columns.
    """

    def __init__(self, rows: Any, groups: dict[Key, np.ndarray], genes: list[str]):
        self.rows, self.groups, self.genes = rows, groups, list(genes)
        self._sums: np.ndarray | None = None
        self._index = {k: i for i, k in enumerate(sorted(groups))}

    @classmethod
    def from_adata(cls, adata: AnnData, spec: PerturbationSpec, *, prediction: bool = False,
                   layer: str | None = None, input_space: str = "auto") -> GroupedCells:
        """Group ``adata`` under ``spec``. Real cells are read through
        :class:`~celldit.data.rows.ExpressionRows` (counts normalised); a ``prediction`` is
        taken as it is unless it holds counts (integer values, or a counts layer)."""
        groups = _keys(adata, spec)
        if prediction and layer is None and "counts" not in adata.layers and not _integer(adata.X):
            return cls(PlainRows(adata), groups, list(map(str, adata.var_names)))
        rows = ExpressionRows(adata, layer=layer, input_space=input_space, warn_log1p=False)
        return cls(rows, groups, rows.genes)

    @classmethod
    def as_given(cls, adata: AnnData, spec: PerturbationSpec) -> GroupedCells:
        """Group ``adata`` and read its ``X`` as it is (values already in the space of the
        evaluation; negative values allowed)."""
        return cls(PlainRows(adata), _keys(adata, spec), list(map(str, adata.var_names)))

    def _compute(self) -> None:
        codes = np.full(self.rows.n_obs, -1, dtype=np.int64)
        for key, idx in self.groups.items():
            codes[idx] = self._index[key]
        self._sums, self._sizes = group_sums(self.rows, codes, len(self._index))

    def mean(self, keys: Key | list[Key]) -> np.ndarray:
        """(G,) float64 mean of the cells of one group, or of several groups pooled."""
        if self._sums is None:
            self._compute()
        keys = [keys] if isinstance(keys, tuple) else list(keys)
        pos = [self._index[k] for k in keys]
        return self._sums[pos].sum(0) / self._sizes[pos].sum()

    def cells(self, idx: np.ndarray) -> np.ndarray:
        """Dense rows ``idx``."""
        return self.rows.rows(np.asarray(idx, dtype=np.int64))

    def control_keys(self, spec: PerturbationSpec, covs: tuple[str, ...]) -> list[Key]:
        """The control groups with covariate values ``covs``."""
        return [k for k in self.groups if k[0] in spec.control_labels and k[1:] == covs]

    def control_rows(self, spec: PerturbationSpec, covs: tuple[str, ...]) -> np.ndarray:
        keys = self.control_keys(spec, covs)
        return np.sort(np.concatenate([self.groups[k] for k in keys])) if keys else np.zeros(0, np.int64)


def _integer(x) -> bool:
    block = x[: min(2048, x.shape[0])]
    block = block.to_memory() if hasattr(block, "to_memory") else block
    values = block.data if sp.issparse(block) else np.asarray(block)
    return bool(values.size and np.all(np.mod(values, 1) == 0) and values.min() >= 0)


class CellsPrediction:
    """Predicted cells grouped by condition (see the module notes)."""

    def __init__(self, cells: GroupedCells):
        self.cells_ = cells

    def keys(self) -> list[Key]:
        return sorted(self.cells_.groups)

    def size(self, key: Key) -> int:
        return len(self.cells_.groups[key])

    def mean(self, key: Key) -> np.ndarray:
        return self.cells_.mean(key)

    def sample(self, key: Key, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` cells of the condition drawn with replacement (sorted draws)."""
        return self.cells_.cells(np.sort(rng.choice(self.cells_.groups[key], n, replace=True)))


class ShiftPrediction:
    """A baseline's prediction: ``c + s`` for the control cells ``c`` of the condition's group.

    Parameters
    ----------
    baseline
        A fitted :class:`~celldit.eval.baselines.base.Baseline`.
    real
        The real cells (their controls are the starting cells).
    spec
        Keys and control labels.
    keys
        The conditions to predict.
    """

    def __init__(self, baseline: Any, real: GroupedCells, spec: PerturbationSpec, keys: list[Key]):
        self.baseline, self.real, self.spec, self._keys = baseline, real, spec, list(keys)
        self._shift: dict[Key, np.ndarray] = {}

    def keys(self) -> list[Key]:
        return list(self._keys)

    def _controls(self, key: Key) -> np.ndarray:
        rows = self.real.control_rows(self.spec, key[1:])
        if rows.size == 0:
            raise ValueError(f"no control cells for covariates {dict(zip(self.spec.covariate_keys, key[1:]))}")
        return rows

    def shift(self, key: Key) -> np.ndarray:
        if key not in self._shift:
            control_mean = self.real.mean(self.real.control_keys(self.spec, key[1:]))
            self._shift[key] = np.asarray(self.baseline.shift(key[0], key[1:], control_mean), dtype=np.float64)
        return self._shift[key]

    def size(self, key: Key) -> int:
        return len(self._controls(key))

    def mean(self, key: Key) -> np.ndarray:
        return self.real.mean(self.real.control_keys(self.spec, key[1:])) + self.shift(key)

    def sample(self, key: Key, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` control cells of the group drawn with replacement, each moved by the shift."""
        rows = np.sort(rng.choice(self._controls(key), n, replace=True))
        return (self.real.cells(rows) + self.shift(key)).astype(np.float32)
