"""How perturbations are labelled in an AnnData: the :class:`PerturbationSpec`.

Real data sets label perturbations differently (``perturbation``/``control``,
``condition``/``ctrl`` with GEARS ``A+B`` and ``A+ctrl``, ``group_id``/``ctrl``). The spec
holds those settings once, checks them against a data set (:meth:`PerturbationSpec.validate`)
and turns a label into the set of perturbations it stands for
(:meth:`PerturbationSpec.parse`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = ["PerturbationSpec"]


def _as_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class PerturbationSpec:
    """Where the perturbation labels live and how to read them.

    Parameters
    ----------
    perturbation_key
        Column of ``adata.obs`` holding one label per cell (e.g. ``"perturbation"``,
        ``"condition"``, ``"group_id"``).
    control
        Label or labels of the control (unperturbed) cells, e.g. ``"control"`` or
        ``["ctrl", "non-targeting"]``.
    delimiter
        Separator of combined perturbations in a label (GEARS: ``"A+B"``). A part equal to
        a control label is dropped, so ``"A+ctrl"`` and ``"ctrl+A"`` both mean ``{A}``.
    dose_key
        Optional ``obs`` column with the dose of each cell.
    covariate_keys
        ``obs`` columns that define the context of a cell (cell type, donor, ...). Control
        cells are matched to perturbed cells within equal covariate values.

    Examples
    --------
    >>> spec = PerturbationSpec("condition", control="ctrl")
    >>> sorted(spec.parse("A+ctrl")), sorted(spec.parse("A+B")), spec.parse("ctrl")
    (['A'], ['A', 'B'], frozenset())
    """

    perturbation_key: str = "perturbation"
    control: str | tuple[str, ...] = "control"
    delimiter: str = "+"
    dose_key: str | None = None
    covariate_keys: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        controls = _as_tuple(self.control)
        if not controls:
            raise ValueError("PerturbationSpec: `control` needs at least one control label")
        object.__setattr__(self, "control", controls[0] if len(controls) == 1 else controls)
        object.__setattr__(self, "covariate_keys", _as_tuple(self.covariate_keys))
        if not self.perturbation_key:
            raise ValueError("PerturbationSpec: `perturbation_key` must be a non-empty obs key")
        if not self.delimiter:
            raise ValueError("PerturbationSpec: `delimiter` must be a non-empty string")

    # ------------------------------------------------------------------ labels
    @property
    def control_labels(self) -> tuple[str, ...]:
        """The control labels as a tuple (one or more)."""
        return _as_tuple(self.control)

    def is_control(self, label: str) -> bool:
        """Whether ``label`` stands for control cells (no perturbation at all)."""
        return len(self.parse(label)) == 0

    def parse(self, label: str) -> frozenset[str]:
        """The set of perturbations a label stands for.

        A control label gives the empty set; ``"A+B"`` gives ``{A, B}``; ``"A+ctrl"`` and
        ``"ctrl+B"`` give ``{A}`` and ``{B}`` (parts equal to a control label are dropped).

        Raises
        ------
        ValueError
            If the label is empty or has an empty part (``"A+"``).
        """
        label = str(label).strip()
        if not label:
            raise ValueError(f"empty perturbation label in obs[{self.perturbation_key!r}]")
        if label in self.control_labels:
            return frozenset()
        parts = [p.strip() for p in label.split(self.delimiter)]
        if any(not p for p in parts):
            raise ValueError(
                f"perturbation label {label!r} has an empty part when split on "
                f"delimiter {self.delimiter!r}"
            )
        return frozenset(p for p in parts if p not in self.control_labels)

    def is_combination(self, label: str) -> bool:
        """Whether ``label`` combines two or more perturbations."""
        return len(self.parse(label)) > 1

    def labels(self, adata: AnnData) -> np.ndarray:
        """The perturbation label of every cell, as strings."""
        self._require_key(adata, self.perturbation_key, "perturbation_key")
        return adata.obs[self.perturbation_key].astype(str).to_numpy()

    def control_mask(self, adata: AnnData) -> np.ndarray:
        """Boolean mask of the control cells of ``adata``."""
        labels = self.labels(adata)
        return np.isin(labels, self.control_labels)

    def covariates(self, adata: AnnData) -> pd.DataFrame:
        """The covariate columns of ``adata.obs`` as strings (no columns when none set)."""
        for key in self.covariate_keys:
            self._require_key(adata, key, "covariate_keys")
        return adata.obs[list(self.covariate_keys)].astype(str)

    # -------------------------------------------------------------- validation
    @staticmethod
    def _require_key(adata: AnnData, key: str, what: str) -> None:
        if key not in adata.obs.columns:
            cols = ", ".join(map(repr, list(adata.obs.columns)[:20])) or "none"
            raise ValueError(
                f"obs key {key!r} (PerturbationSpec.{what}) is not in adata.obs; "
                f"available columns: {cols}"
            )

    @classmethod
    def require_labels(cls, adata: AnnData, key: str, what: str, needs: str = "a label") -> None:
        """Refuse a missing obs column or missing (NaN/None) entries in it.

        A NaN would otherwise become a category ``'nan'`` of its own once the column is read
        as strings, silently pooling unrelated cells.
        """
        cls._require_key(adata, key, what)
        n_missing = int(adata.obs[key].isna().sum())
        if n_missing:
            raise ValueError(
                f"obs[{key!r}] (PerturbationSpec.{what}) has {n_missing} missing (NaN) entries; "
                f"give every cell {needs}, or drop those cells"
            )

    def _check_doses(self, adata: AnnData) -> None:
        """Perturbed cells need a dose: a number or one per perturbation (``"1+10"``)."""
        perturbed = ~self.control_mask(adata)
        doses = adata.obs[self.dose_key][perturbed]
        n_missing = int(doses.isna().sum())
        if n_missing:
            raise ValueError(
                f"obs[{self.dose_key!r}] (PerturbationSpec.dose_key) has {n_missing} missing (NaN) doses "
                "on perturbed cells; give every perturbed cell a dose (control cells may have none)"
            )
        for value in pd.unique(doses.astype(str)):
            try:
                parts = [float(v) for v in value.split(self.delimiter)]
            except ValueError:
                raise ValueError(
                    f"obs[{self.dose_key!r}] (PerturbationSpec.dose_key) holds {value!r}, not a number "
                    f"(or one number per perturbation joined by {self.delimiter!r})"
                ) from None
            if not all(np.isfinite(d) and d >= 0 for d in parts):
                raise ValueError(
                    f"obs[{self.dose_key!r}] (PerturbationSpec.dose_key) holds dose {value!r}; "
                    "doses must be finite non-negative numbers"
                )

    def validate(self, adata: AnnData, *, require_control: bool = True) -> None:
        """Check that ``adata`` carries what this spec names.

        Raises
        ------
        ValueError
            Naming the thing to fix: a missing obs key (perturbation, dose or covariate),
            missing entries (NaN) in the perturbation or a covariate column, a missing or
            impossible dose on a perturbed cell, a control label that does not
            occur, or no control cells at all.
        """
        self.require_labels(adata, self.perturbation_key, "perturbation_key", "a perturbation or control label")
        column = adata.obs[self.perturbation_key]
        if self.dose_key is not None:
            self._require_key(adata, self.dose_key, "dose_key")
            self._check_doses(adata)
        for key in self.covariate_keys:
            self.require_labels(adata, key, "covariate_keys", "a level")
        present = set(column.astype(str).unique())
        if require_control:
            absent = [c for c in self.control_labels if c not in present]
            if absent:
                shown = ", ".join(map(repr, sorted(present)[:10]))
                raise ValueError(
                    f"control label(s) {', '.join(map(repr, absent))} not found in "
                    f"obs[{self.perturbation_key!r}] (labels present include: {shown}); "
                    "set PerturbationSpec.control / --control to the control label"
                )
            if not self.control_mask(adata).any():
                raise ValueError(f"no control cells in obs[{self.perturbation_key!r}]")
        for label in present:
            self.parse(label)

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (see :meth:`from_dict`)."""
        return {
            "perturbation_key": self.perturbation_key,
            "control": list(self.control_labels),
            "delimiter": self.delimiter,
            "dose_key": self.dose_key,
            "covariate_keys": list(self.covariate_keys),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerturbationSpec:
        """Inverse of :meth:`to_dict`."""
        known = {"perturbation_key", "control", "delimiter", "dose_key", "covariate_keys"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PerturbationSpec field(s): {sorted(unknown)}")
        return cls(**{k: data[k] for k in known if k in data})
