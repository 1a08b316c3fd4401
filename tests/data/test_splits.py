"""Splits: masks, seen-single categories, JSON round trips, errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from anndata import AnnData
from conftest import make_adata, shared_data

from celldit.data.spec import PerturbationSpec
from celldit.data.splits import (
    HeldOutCombinations,
    HeldOutCovariateGroup,
    HeldOutPerturbations,
    HeldOutReplicate,
    load_split,
    split_from_dict,
)


def _adata(labels, **obs):
    return make_adata(labels, 2, key="condition", obs=obs)


GEARS = ["ctrl", "ctrl", "A+ctrl", "ctrl+B", "C+ctrl", "A+B", "A+C", "C+D", "D+ctrl", "B+D"]
SPEC = PerturbationSpec("condition", control="ctrl")


def test_held_out_perturbations():
    adata = _adata(["ctrl", "A", "B", "A", "ctrl"])
    split = HeldOutPerturbations(PerturbationSpec("condition", "ctrl"), perturbations=["A"])
    m = split.masks(adata)
    assert m.train.tolist() == [True, False, True, False, True]
    assert m.test.tolist() == [True, True, False, True, True]  # controls on both sides
    no_ctrl = HeldOutPerturbations(split.spec, perturbations=["A"], controls_in_test=False)
    assert no_ctrl.masks(adata).test.tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="'Z'.*not found"):
        HeldOutPerturbations(split.spec, perturbations=["Z"]).masks(adata)
    rnd = HeldOutPerturbations.random(adata, split.spec, fraction=0.5, seed=0)
    assert len(rnd.perturbations) == 1 and rnd.perturbations[0] in {"A", "B"}


def test_held_out_combinations_by_seen_singles():
    adata = _adata(GEARS)
    split = HeldOutCombinations(SPEC, combinations=["A+B", "A+C", "C+D"],
                                held_out_singles=["C", "D"])
    m = split.masks(adata)
    labels = np.array(GEARS)
    # training drops the test combos and every cell touching C or D (C+ctrl, D+ctrl, B+D)
    assert set(labels[m.train]) == {"ctrl", "A+ctrl", "ctrl+B"}
    assert split.seen_counts(adata) == {"A+B": 2, "A+C": 1, "C+D": 0}
    for seen, combo in ((0, "C+D"), (1, "A+C"), (2, "A+B")):
        test = split.masks(adata, seen=seen).test
        assert set(labels[test]) == {"ctrl", combo}
    with pytest.raises(ValueError, match="not combinations"):
        HeldOutCombinations(SPEC, combinations=["A+ctrl"]).masks(adata)
    with pytest.raises(ValueError, match="seen must be"):
        split.masks(adata, seen=3)


def test_random_combination_split_is_consistent_and_seeded():
    adata = _adata(GEARS)
    a = HeldOutCombinations.random(adata, SPEC, single_fraction=0.25, seen2_fraction=0.5, seed=1)
    b = HeldOutCombinations.random(adata, SPEC, single_fraction=0.25, seen2_fraction=0.5, seed=1)
    assert a == b
    counts = a.seen_counts(adata)
    for combo, n in counts.items():
        assert n == len(SPEC.parse(combo) - set(a.held_out_singles))


def test_covariate_group_and_replicate():
    adata = _adata(["ctrl", "stim", "ctrl", "stim", "stim"],
                   cell_type=["B", "B", "T", "T", "T"], rep=["r1", "r2", "r2", "r1", "r2"])
    spec = PerturbationSpec("condition", control="ctrl")
    m = HeldOutCovariateGroup(spec, key="cell_type", values=["B"]).masks(adata)
    assert m.train.tolist() == [True, False, True, True, True]  # B controls stay in train
    assert m.test.tolist() == [True, True, False, False, False]
    m = HeldOutReplicate(spec, key="rep", values=["r2"]).masks(adata)
    assert m.train.tolist() == [True, False, False, True, False]
    assert m.test.tolist() == [False, True, True, False, True]
    with pytest.raises(ValueError, match="obs key 'donor'"):
        HeldOutReplicate(spec, key="donor", values=["d1"]).masks(adata)
    with pytest.raises(ValueError, match="'r9'.*not found"):
        HeldOutReplicate(spec, key="rep", values=["r9"]).masks(adata)
    with pytest.raises(ValueError, match="no control cells"):
        HeldOutReplicate(spec, key="cell_type", values=["B"]).masks(
            _adata(["stim", "ctrl"], cell_type=["B", "T"]))


@pytest.mark.parametrize("split", [
    HeldOutPerturbations(SPEC, perturbations=["A+ctrl"]),
    HeldOutCombinations(SPEC, combinations=["A+B"], held_out_singles=["C"]),
    HeldOutCovariateGroup(PerturbationSpec("condition", "ctrl", covariate_keys=["ct"]),
                          key="ct", values=["B"], perturbed_only=False),
    HeldOutReplicate(SPEC, key="rep", values=["r2"]),
])
def test_json_round_trip(split, tmp_path):
    path = split.save(tmp_path / "split.json")
    again = load_split(path)
    assert again == split and type(again) is type(split)
    assert split_from_dict(split.to_dict()) == split


def test_bad_json():
    with pytest.raises(ValueError, match="unknown split kind"):
        split_from_dict({"kind": "nope", "spec": SPEC.to_dict()})
    with pytest.raises(ValueError, match="bad parameters"):
        split_from_dict({"kind": "held_out_replicate", "spec": SPEC.to_dict(), "x": 1})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split("/nonexistent/split.json")


def test_papalexi_replicate_split_sizes():
    adata = ad.read_h5ad(shared_data("papalexi2021_thp1_crispr_ko.h5ad"), backed="r")
    spec = PerturbationSpec("perturbation", control="control")
    obs_only = AnnData(obs=adata.obs.copy())
    m = HeldOutReplicate(spec, key="bio_rep", values=["rep_3"]).masks(obs_only)
    assert int(m.test.sum()) == 5300 and int(m.train.sum()) == 9428 + 6001
    labels = spec.labels(obs_only)[m.test]
    names, counts = np.unique(labels[labels != "control"], return_counts=True)
    assert int((counts >= 40).sum()) == 23
