"""The perturbation vocabulary: names -> embedding rows, covariate levels -> codes.

A cell's condition is a *set* of perturbations (empty for control cells), each with a dose,
plus its covariate values. :class:`PerturbationVocab` turns those into the integer and
float arrays the perturbation encoder consumes, and is saved with a model so the same
names map to the same rows after loading.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data.spec import PerturbationSpec

PAD = -1  # pert_idx value of an empty slot


def parse_dose(value: Any, n_perts: int, delimiter: str) -> list[float]:
    """Doses of one cell's perturbations: one number for all, or ``"1+10"`` per perturbation."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return [1.0] * n_perts
    if isinstance(value, str) and delimiter in value:
        parts = [float(p) for p in value.split(delimiter)]
        if len(parts) != n_perts:
            raise ValueError(f"dose {value!r} has {len(parts)} parts for {n_perts} perturbations")
        return parts
    dose = float(value)
    if dose < 0 or not np.isfinite(dose):
        raise ValueError(f"dose {value!r} must be a finite non-negative number")
    return [dose] * n_perts


def parse_condition(label: str, dose: Any, spec: PerturbationSpec) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """A label and its dose -> (perturbation names sorted, their doses in the same order).

    A per-part dose string (``"1+10"``) may follow the label's parts including control
    parts (GEARS ``"A+ctrl"`` with dose ``"1+1"``): control parts and their doses are dropped.
    """
    pset = spec.parse(label)
    parts = [p.strip() for p in str(label).split(spec.delimiter)]
    if isinstance(dose, str) and spec.delimiter in dose and len(dose.split(spec.delimiter)) == len(parts) != len(pset):
        pairs = [(p, float(d)) for p, d in zip(parts, dose.split(spec.delimiter)) if p in pset]
    elif isinstance(dose, str) and spec.delimiter in dose:
        pairs = list(zip([p for p in parts if p in pset], parse_dose(dose, len(pset), spec.delimiter)))
    else:
        pairs = [(p, d) for p, d in zip(sorted(pset), parse_dose(dose, len(pset), spec.delimiter))]
    pairs.sort()
    return tuple(p for p, _ in pairs), tuple(float(d) for _, d in pairs)


@dataclass
class PerturbationVocab:
    """Perturbation names and covariate levels known to a model.

    Parameters
    ----------
    perturbations
        Names in embedding-row order (seen in training first, then prior-only names).
    seen
        Names that had training cells (learned embeddings); the others rely on prior features.
    covariates
        For each registered covariate key, its levels in code order. An unknown level gets
        code ``len(levels)`` (the encoder's "unknown" row).
    dose_reference
        Dose mapped to scale 1 (``log1p(dose) / log1p(dose_reference)``); 1.0 without a dose key.
    """

    perturbations: list[str]
    seen: list[str]
    covariates: dict[str, list[str]] = field(default_factory=dict)
    dose_reference: float = 1.0

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.perturbations)}
        self._seen = set(self.seen)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_adata(cls, adata, spec: PerturbationSpec, extra: Iterable[str] = ()) -> PerturbationVocab:
        """Vocabulary of the perturbations and covariate levels in ``adata`` (training cells),
        plus ``extra`` names that have prior features only."""
        labels = spec.labels(adata)
        seen = sorted({p for label in np.unique(labels) for p in spec.parse(label)})
        extra_names = sorted(set(map(str, extra)) - set(seen))
        covs = spec.covariates(adata)
        levels = {key: sorted(covs[key].unique().tolist()) for key in spec.covariate_keys}
        ref = 1.0
        if spec.dose_key is not None:
            doses = pd.to_numeric(adata.obs[spec.dose_key], errors="coerce").to_numpy(dtype=float)
            doses = doses[np.isfinite(doses) & (doses > 0)]
            ref = float(doses.max()) if doses.size else 1.0
        return cls(seen + extra_names, seen, levels, ref)

    # ------------------------------------------------------------------ encoding
    @property
    def size(self) -> int:
        return len(self.perturbations)

    @property
    def seen_mask(self) -> np.ndarray:
        """(V,) bool: which rows were trained on."""
        return np.array([p in self._seen for p in self.perturbations], dtype=bool)

    def index(self, name: str) -> int:
        """Row of perturbation ``name``; ``KeyError`` naming it when the model does not know it."""
        if name not in self._index:
            known = ", ".join(self.perturbations[:12]) + (" ..." if self.size > 12 else "")
            raise KeyError(
                f"unknown perturbation {name!r}: it was not in the training data and has no "
                f"prior features (known: {known}); pass a feature table with this name to use it"
            )
        return self._index[name]

    def dose_scale(self, dose: float) -> float:
        """Scale of a perturbation's token at ``dose`` (1 at the reference dose, 0 at dose 0)."""
        return float(np.log1p(dose) / np.log1p(self.dose_reference))

    def encode_conditions(self, psets: Sequence[frozenset[str] | Sequence[str]], doses: Sequence[Sequence[float]] | None = None,
                          width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Perturbation sets -> ``(pert_idx (n, K), pert_scale (n, K))``, padded with :data:`PAD`.

        With ``doses``, each set is a sequence aligned with its doses (as in a condition key)."""
        psets = [list(p) if doses is not None else sorted(p) for p in psets]  # with doses: already aligned
        width = max([len(p) for p in psets] + [1, width or 1])
        idx = np.full((len(psets), width), PAD, dtype=np.int64)
        scale = np.zeros((len(psets), width), dtype=np.float32)
        for i, names in enumerate(psets):
            d = doses[i] if doses is not None else [1.0] * len(names)
            for j, name in enumerate(names):
                idx[i, j] = self.index(name)
                scale[i, j] = self.dose_scale(d[j])
        return idx, scale

    def encode_covariates(self, frame: pd.DataFrame | Mapping[str, Sequence[str]], n: int | None = None) -> np.ndarray:
        """Covariate values -> (n, C) int codes (unknown levels -> ``len(levels)``)."""
        keys = list(self.covariates)
        if not keys:
            return np.zeros((n if n is not None else len(frame), 0), dtype=np.int64)
        cols = []
        for key in keys:
            if key not in frame:
                raise KeyError(f"covariate {key!r} (registered with the model) is missing; "
                               f"add obs[{key!r}] or pass {key}=... in the condition")
            lookup = {v: i for i, v in enumerate(self.covariates[key])}
            values = pd.Series(frame[key]).astype(str).to_numpy()
            cols.append([lookup.get(v, len(lookup)) for v in values])
        return np.asarray(cols, dtype=np.int64).T

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"perturbations": list(self.perturbations), "seen": list(self.seen),
                "covariates": {k: list(v) for k, v in self.covariates.items()},
                "dose_reference": self.dose_reference}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerturbationVocab:
        return cls(list(data["perturbations"]), list(data["seen"]),
                   {k: list(v) for k, v in data.get("covariates", {}).items()},
                   float(data.get("dose_reference", 1.0)))
