"""Train/test splits as first-class objects, saved to JSON with a run.

Each split holds its :class:`~celldit.data.spec.PerturbationSpec` and its parameters, and
:meth:`Split.masks` returns boolean train/test masks over an AnnData. Control cells are
needed on both sides (to train, and as the reference C of the metrics), so the
perturbation splits put them in both masks unless ``controls_in_test=False``.

* :class:`HeldOutPerturbations` - chosen perturbation labels are test only.
* :class:`HeldOutCombinations` - combinations are test only, grouped by how many of their
  single perturbations were seen in training (0, 1, 2); held-out singles are removed from
  training.
* :class:`HeldOutCovariateGroup` - the perturbed cells of a covariate group (a cell type, a
  donor) are test; that group's controls stay in training and are the test's C.
* :class:`HeldOutReplicate` - every cell of the chosen replicate(s) is test, controls too.

Hold-out *rules* (``celldit fit --holdout KEY=VALUE``) remove cells from training by
``obs`` values: :func:`parse_holdout`, :func:`holdout_mask`, :func:`holdout_record`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from anndata import AnnData

from celldit.data.spec import PerturbationSpec

__all__ = [
    "SplitMasks", "Split", "HeldOutPerturbations", "HeldOutCombinations",
    "HeldOutCovariateGroup", "HeldOutReplicate", "split_from_dict", "load_split",
    "holdout_mask", "holdout_record", "parse_holdout",
]


class SplitMasks(NamedTuple):
    """Boolean masks over the cells of an AnnData."""

    train: np.ndarray
    test: np.ndarray


def _check_labels(adata: AnnData, spec: PerturbationSpec, labels, what: str) -> None:
    present = set(spec.labels(adata))
    absent = [l for l in labels if l not in present]
    if absent:
        raise ValueError(f"{what}: label(s) {absent} not found in obs[{spec.perturbation_key!r}]")


def _check_values(adata: AnnData, key: str, values, what: str) -> np.ndarray:
    if key not in adata.obs.columns:
        raise ValueError(f"{what}: obs key {key!r} is not in adata.obs "
                         f"(columns: {list(adata.obs.columns)[:20]})")
    column = adata.obs[key].astype(str).to_numpy()
    absent = [v for v in values if v not in set(column)]
    if absent:
        raise ValueError(f"{what}: value(s) {absent} not found in obs[{key!r}]")
    return np.isin(column, list(values))


@dataclass
class Split:
    """Base class. Subclasses set ``kind`` and implement :meth:`masks`."""

    spec: PerturbationSpec
    kind: ClassVar[str] = "split"

    def masks(self, adata: AnnData) -> SplitMasks:
        """Train and test masks over ``adata`` (validated against the spec)."""
        raise NotImplementedError

    def apply(self, adata: AnnData) -> tuple[AnnData, AnnData]:
        """``(train, test)`` views of ``adata``."""
        m = self.masks(adata)
        return adata[m.train], adata[m.test]

    def params(self) -> dict[str, Any]:
        """Parameters of the split besides the spec (JSON-serialisable)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "spec", **params}`` (see :func:`split_from_dict`)."""
        return {"kind": self.kind, "spec": self.spec.to_dict(), **self.params()}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass
class HeldOutPerturbations(Split):
    """Cells whose label is in ``perturbations`` are test; all others train."""

    perturbations: list[str] = field(default_factory=list)
    controls_in_test: bool = True
    kind: ClassVar[str] = "held_out_perturbations"

    def params(self):
        return {"perturbations": list(self.perturbations),
                "controls_in_test": self.controls_in_test}

    def masks(self, adata):
        self.spec.validate(adata)
        _check_labels(adata, self.spec, self.perturbations, "HeldOutPerturbations")
        held = np.isin(self.spec.labels(adata), list(self.perturbations))
        ctrl = self.spec.control_mask(adata)
        return SplitMasks(~held, held | (ctrl if self.controls_in_test else False))

    @classmethod
    def random(cls, adata: AnnData, spec: PerturbationSpec, fraction: float = 0.2,
               seed: int = 0) -> HeldOutPerturbations:
        """Hold out a seeded random ``fraction`` (at least one) of the perturbation labels."""
        labels = sorted({l for l in spec.labels(adata) if not spec.is_control(l)})
        n = max(1, int(round(fraction * len(labels))))
        chosen = np.random.default_rng(seed).choice(labels, n, replace=False)
        return cls(spec, perturbations=sorted(str(c) for c in chosen))


@dataclass
class HeldOutCombinations(Split):
    """Held-out combinations, categorised by how many of their singles were seen.

    Training drops the labels in ``combinations`` and every cell whose perturbation set
    contains a gene of ``held_out_singles``. A single ``a`` is *seen* when training keeps
    cells whose set is exactly ``{a}``. ``masks(adata, seen=k)`` keeps in the test mask only
    the combinations with ``k`` seen singles (0, 1 or 2).
    """

    combinations: list[str] = field(default_factory=list)
    held_out_singles: list[str] = field(default_factory=list)
    controls_in_test: bool = True
    kind: ClassVar[str] = "held_out_combinations"

    def params(self):
        return {"combinations": list(self.combinations),
                "held_out_singles": list(self.held_out_singles),
                "controls_in_test": self.controls_in_test}

    def _train_mask(self, labels: np.ndarray) -> np.ndarray:
        singles = set(self.held_out_singles)
        drop = {l for l in set(labels)
                if l in self.combinations or self.spec.parse(l) & singles}
        return ~np.isin(labels, list(drop))

    def seen_counts(self, adata: AnnData) -> dict[str, int]:
        """Number of seen singles of each held-out combination."""
        labels = self.spec.labels(adata)
        train_labels = set(labels[self._train_mask(labels)])
        seen = {next(iter(s)) for s in map(self.spec.parse, train_labels) if len(s) == 1}
        return {c: len(self.spec.parse(c) & seen) for c in self.combinations}

    def masks(self, adata, seen: int | None = None):
        self.spec.validate(adata)
        _check_labels(adata, self.spec, self.combinations, "HeldOutCombinations")
        not_combo = [c for c in self.combinations if not self.spec.is_combination(c)]
        if not_combo:
            raise ValueError(f"HeldOutCombinations: {not_combo} are not combinations "
                             f"(delimiter {self.spec.delimiter!r})")
        labels = self.spec.labels(adata)
        chosen = list(self.combinations)
        if seen is not None:
            if seen not in (0, 1, 2):
                raise ValueError(f"seen must be 0, 1 or 2, got {seen}")
            counts = self.seen_counts(adata)
            chosen = [c for c in chosen if counts[c] == seen]
        test = np.isin(labels, chosen)
        if self.controls_in_test:
            test |= self.spec.control_mask(adata)
        return SplitMasks(self._train_mask(labels), test)

    @classmethod
    def random(cls, adata: AnnData, spec: PerturbationSpec, single_fraction: float = 0.25,
               seen2_fraction: float = 0.25, seed: int = 0) -> HeldOutCombinations:
        """GEARS-like split: hold out a seeded ``single_fraction`` of the genes as singles;
        every combination containing one goes to test (seen 0 or 1), plus a
        ``seen2_fraction`` of the combinations whose singles are all kept (seen 2)."""
        rng = np.random.default_rng(seed)
        sets = {l: spec.parse(l) for l in set(spec.labels(adata))}
        genes = sorted(set().union(*sets.values()))
        n = int(round(single_fraction * len(genes)))
        held = set(rng.choice(genes, n, replace=False).tolist()) if n else set()
        combos = sorted(l for l, s in sets.items() if len(s) > 1)
        test = [c for c in combos if sets[c] & held]
        rest = [c for c in combos if not sets[c] & held]
        k = int(round(seen2_fraction * len(rest)))
        test += sorted(rng.choice(rest, k, replace=False).tolist()) if k else []
        return cls(spec, combinations=sorted(test), held_out_singles=sorted(held))


@dataclass
class HeldOutCovariateGroup(Split):
    """The perturbed cells of ``obs[key] in values`` are test (with that group's controls);
    training keeps everything else, that group's controls included unless
    ``perturbed_only=False``."""

    key: str = ""
    values: list[str] = field(default_factory=list)
    perturbed_only: bool = True
    kind: ClassVar[str] = "held_out_covariate_group"

    def params(self):
        return {"key": self.key, "values": list(self.values),
                "perturbed_only": self.perturbed_only}

    def masks(self, adata):
        self.spec.validate(adata)
        group = _check_values(adata, self.key, self.values, "HeldOutCovariateGroup")
        ctrl = self.spec.control_mask(adata)
        held = group & ~ctrl if self.perturbed_only else group
        return SplitMasks(~held, group)


@dataclass
class HeldOutReplicate(Split):
    """Every cell with ``obs[key] in values`` (controls too) is test; the rest train."""

    key: str = ""
    values: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "held_out_replicate"

    def params(self):
        return {"key": self.key, "values": list(self.values)}

    def masks(self, adata):
        self.spec.validate(adata)
        test = _check_values(adata, self.key, self.values, "HeldOutReplicate")
        if not (test & self.spec.control_mask(adata)).any():
            raise ValueError(f"HeldOutReplicate: no control cells in obs[{self.key!r}] in "
                             f"{list(self.values)}; the metrics need them as reference")
        return SplitMasks(~test, test)


_KINDS = {c.kind: c for c in (HeldOutPerturbations, HeldOutCombinations,
                              HeldOutCovariateGroup, HeldOutReplicate)}


def split_from_dict(data: dict[str, Any]) -> Split:
    """Rebuild a split from :meth:`Split.to_dict` output."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown split kind {kind!r}; expected one of {sorted(_KINDS)}")
    if "spec" not in data:
        raise ValueError("split JSON lacks its 'spec'")
    spec = PerturbationSpec.from_dict(data.pop("spec"))
    try:
        return _KINDS[kind](spec, **data)
    except TypeError as err:
        raise ValueError(f"bad parameters for split {kind!r}: {err}") from None


def load_split(path: str | Path) -> Split:
    """Read a split saved with :meth:`Split.save`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"split file {str(path)!r} does not exist")
    return split_from_dict(json.loads(path.read_text()))


# ---------------------------------------------------------------- hold-out rules (celldit fit --holdout)
def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, int, float)) else [str(v) for v in value]


def parse_holdout(items: Any) -> list[dict[str, str]]:
    """Hold-out rules: ``["KEY=VALUE", "K1=V1&K2=V2", ...]`` (or a ``{KEY: VALUE or [VALUES]}``
    mapping) -> a list of ``{KEY: VALUE}`` rules. A cell is held out when it matches every
    pair of some rule, so rules on one key add values and ``&`` narrows a rule."""
    rules: list[dict[str, str]] = []
    if isinstance(items, Mapping):
        items = [f"{key}={value}" for key, values in items.items() for value in _as_list(values)]
    for item in _as_list(items):
        rule: dict[str, str] = {}
        for part in item.split("&"):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ValueError(f"--holdout {item!r}: expected KEY=VALUE (or KEY=VALUE&KEY=VALUE), "
                                 "e.g. bio_rep=rep_3")
            if key in rule and rule[key] != value:
                raise ValueError(f"--holdout {item!r} asks {key} to equal two values; give two rules instead")
            rule[key] = value
        if rule not in rules:
            rules.append(rule)
    return rules


def holdout_mask(obs, rules: list[dict[str, str]]) -> np.ndarray:
    """Boolean mask of the cells held out: those matching every pair of some rule."""
    held = np.zeros(len(obs), dtype=bool)
    columns: dict[str, np.ndarray] = {}
    for rule in rules:
        match = np.ones(len(obs), dtype=bool)
        for key, value in rule.items():
            if key not in obs.columns:
                raise ValueError(f"--holdout: obs key {key!r} is not in the data (columns: {list(obs.columns)[:20]})")
            column = columns.setdefault(key, obs[key].astype(str).to_numpy())
            if not (column == value).any():
                raise ValueError(f"--holdout: value {value!r} not found in obs[{key!r}]")
            match &= column == value
        held |= match
    return held


def holdout_record(obs, options: Mapping[str, Any], rules: list[dict[str, str]], held: np.ndarray) -> dict:
    """What ``holdout.json`` records: the rules, cell counts, and the perturbation labels left
    without training cells; ``split`` is the same rule as a :mod:`celldit.data.splits` dict
    when the rules hold out values of one key."""
    key = options["perturbation_key"]
    labels = obs[key].astype(str).to_numpy()
    absent = sorted(set(labels[held]) - set(labels[~held]))
    split = None
    keys = {k for rule in rules for k in rule}
    if len(keys) == 1 and all(len(rule) == 1 for rule in rules):
        spec = PerturbationSpec(key, options["control"], options["delimiter"], options["dose_key"],
                                tuple(options["covariate_keys"]))
        hkey, values = keys.pop(), [rule_value for rule in rules for rule_value in rule.values()]
        split = (HeldOutPerturbations(spec, perturbations=values, controls_in_test=False) if hkey == key
                 else HeldOutReplicate(spec, key=hkey, values=values)).to_dict()
    return {"holdout": [dict(rule) for rule in rules], "data": str(options["data"]),
            "n_cells": len(obs), "n_held_out": int(held.sum()), "n_train": int((~held).sum()),
            "labels_not_trained": absent, "split": split}
