"""Perturbation vocabulary (GEARS labels, doses) and the condition table of mean-shift
anchors (plain, and group-weighted for held-out covariate groups). Values, not shapes."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from conftest import ArrayRows, make_adata, shared_data

from celldit.cells import CellDiT
from celldit.cells.anchors import ConditionTable, build_condition_table, cell_conditions
from celldit.cells.vocab import PAD, PerturbationVocab, parse_condition, parse_dose
from celldit.data.spec import PerturbationSpec


def condition_key(names, doses=None):
    """A condition key by hand: (sorted names, their doses)."""
    names = sorted(names)
    return tuple(names), tuple(float(d) for d in (doses or [1.0] * len(names)))


# -- vocabulary and conditions --------------------------------------------------------------
def gears_adata(dose: bool = False) -> AnnData:
    labels = ["ctrl", "ctrl", "A+ctrl", "ctrl+B", "A+B", "C+ctrl", "A+ctrl"]
    obs = {"cell_type": ["T", "B", "T", "B", "T", "T", "B"]}
    if dose:
        obs["dose"] = [0.0, 0.0, 10.0, 100.0, "1+10", 10.0, 10.0]
    return make_adata(labels, 2, key="condition", obs=obs)


def test_vocab_parses_gears_labels_and_pads_rows():
    adata = gears_adata()
    spec = PerturbationSpec("condition", control="ctrl", covariate_keys=["cell_type"])
    assert spec.parse("A+ctrl") == {"A"} and spec.parse("ctrl+B") == {"B"} and spec.parse("A+B") == {"A", "B"}
    vocab = PerturbationVocab.from_adata(adata, spec, extra=["D", "A"])
    assert vocab.perturbations == ["A", "B", "C", "D"] and vocab.seen == ["A", "B", "C"]
    np.testing.assert_array_equal(vocab.seen_mask, [True, True, True, False])
    idx, scale = vocab.encode_conditions([spec.parse(s) for s in ("A+ctrl", "ctrl+B", "B+A", "ctrl", "D+C")])
    np.testing.assert_array_equal(idx, [[0, PAD], [1, PAD], [0, 1], [PAD, PAD], [2, 3]])
    np.testing.assert_array_equal(scale, [[1, 0], [1, 0], [1, 1], [0, 0], [1, 1]])
    idx3, _ = vocab.encode_conditions([{"A"}], width=3)
    np.testing.assert_array_equal(idx3, [[0, PAD, PAD]])
    with pytest.raises(KeyError, match="'E'"):
        vocab.encode_conditions([{"A", "E"}])
    assert vocab.covariates == {"cell_type": ["B", "T"]}
    codes = vocab.encode_covariates(pd.DataFrame({"cell_type": ["T", "B", "NK"]}))
    np.testing.assert_array_equal(codes, [[1], [0], [2]])  # unknown level -> len(levels)
    with pytest.raises(KeyError, match="'cell_type'"):
        vocab.encode_covariates(pd.DataFrame({"donor": ["x"]}))
    back = PerturbationVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert back == vocab
    np.testing.assert_array_equal(back.encode_conditions([{"B", "D"}])[0], [[1, 3]])
    np.testing.assert_array_equal(back.seen_mask, vocab.seen_mask)


def test_dose_scaling():
    adata = gears_adata(dose=True)
    adata.obs["dose"] = [0.0, 0.0, 10.0, 100.0, 1.0, 10.0, 10.0]
    spec = PerturbationSpec("condition", control="ctrl", dose_key="dose")
    vocab = PerturbationVocab.from_adata(adata, spec)
    assert vocab.dose_reference == 100.0
    assert vocab.dose_scale(100.0) == pytest.approx(1.0)
    assert vocab.dose_scale(10.0) == pytest.approx(np.log1p(10) / np.log1p(100))
    assert vocab.dose_scale(0.0) == 0.0
    _, scale = vocab.encode_conditions([{"A", "B"}], [[10.0, 100.0]])
    np.testing.assert_allclose(scale, [[np.log1p(10) / np.log1p(100), 1.0]], rtol=1e-6)
    assert parse_dose("1+10", 2, "+") == [1.0, 10.0] and parse_dose(None, 2, "+") == [1.0, 1.0]
    assert parse_dose(5, 2, "+") == [5.0, 5.0]
    with pytest.raises(ValueError, match="2 parts for 3"):
        parse_dose("1+10", 3, "+")
    with pytest.raises(ValueError, match="non-negative"):
        parse_dose(-1, 1, "+")
    spec_str = PerturbationSpec("condition", control="ctrl", dose_key="dose")
    keys = cell_conditions(gears_adata(dose=True).obs, spec_str)
    assert keys[0] == ((), ()) and keys[2] == (("A",), (10.0,)) and keys[4] == (("A", "B"), (1.0, 10.0))
    assert parse_condition("ctrl+B", "1+5", spec_str) == (("B",), (5.0,))  # the control part's dose is dropped
    assert parse_condition("B+A", "2+7", spec_str) == (("A", "B"), (7.0, 2.0))  # doses follow their names


def test_condition_table_anchors_are_mean_shifts_averaged_over_groups():
    # gene values per cell; groups 0 and 1
    x = np.array([[1, 0], [3, 0],      # control, group 0: mean (2, 0)
                  [10, 4],             # control, group 1: mean (10, 4)
                  [5, 1], [7, 3],      # A, group 0: mean (6, 2) -> shift (4, 2)
                  [11, 8],             # A, group 1: shift (1, 4)
                  [12, 4], [14, 6],    # B, group 1 only: mean (13, 5) -> shift (3, 1)
                  [9, 9]], float)      # B, group 2 (no control there): ignored
    groups = np.array([0, 0, 1, 0, 0, 1, 1, 1, 2])
    ctrl, a, b = condition_key([]), condition_key(["A"]), condition_key(["B"])
    keys = [ctrl, ctrl, ctrl, a, a, a, b, b, b]
    table, cond_id = build_condition_table(keys, groups, ArrayRows(x), 2)
    assert table.keys == [ctrl, a, b]
    np.testing.assert_array_equal(cond_id, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_allclose(table.anchors, [[0, 0], [2.5, 3.0], [3.0, 1.0]])
    # unseen combination: the sum of single anchors; an untrained member adds nothing
    np.testing.assert_allclose(table.anchor(condition_key(["A", "B"])), [5.5, 4.0])
    np.testing.assert_allclose(table.anchor(condition_key(["B", "Z"])), [3.0, 1.0])
    np.testing.assert_allclose(table.anchor(condition_key(["A"], [2.0])), [5.0, 6.0])  # linear in dose
    np.testing.assert_allclose(table.anchor(ctrl), [0, 0])
    back = ConditionTable.from_dict(json.loads(json.dumps(table.to_dict())), table.anchors)
    assert back.keys == table.keys
    np.testing.assert_array_equal(back.anchor(condition_key(["A", "B"])), table.anchor(condition_key(["A", "B"])))
    # a group never trained with A would get the other groups' shift
    np.testing.assert_allclose(table.held_out_anchor(1, 0), [1.0, 4.0])
    np.testing.assert_allclose(table.held_out_anchor(1, 1), [4.0, 2.0])
    assert table.held_out_anchor(2, 1) is None  # B: trained in group 1 only
    flat, _ = build_condition_table(keys, groups, ArrayRows(x), 2, anchored=False)
    np.testing.assert_array_equal(flat.anchors, np.zeros((3, 2)))


def test_group_weighted_anchor_by_hand_and_saved():
    """Group shifts averaged with weights exp(-|c - c_g|^2 / h), h a factor times the median
    squared distance between the groups' mean control cells, the factor chosen by
    leave-one-group-out on the groups' own shifts."""
    from celldit.cells.borrowing import BANDWIDTH_FACTORS

    ctrl, a, b = condition_key([]), condition_key(["A"]), condition_key(["B"])
    controls = {0: np.array([0.0, 0.0]), 1: np.array([1.0, 0.0]), 2: np.array([10.0, 0.0])}
    shifts = {(1, 0): np.array([1.0, 0.0]), (1, 1): np.array([3.0, 0.0]), (1, 2): np.array([0.0, 9.0])}
    anchors = np.array([[0, 0], [4 / 3, 3], [5, 5]], np.float32)
    plain = ConditionTable([ctrl, a, b], anchors, shifts, controls)  # the default: the median heuristic
    assert plain.bandwidth == 81.0 and plain.bandwidth_factor == 1.0  # median of 1, 100, 81
    table = ConditionTable([ctrl, a, b], anchors, shifts, controls, bandwidth_rule="leave_one_group_out")
    # leave-one-group-out by hand: each group's shift from the other two (d2 between controls)
    d2 = {(0, 1): 1.0, (0, 2): 100.0, (1, 2): 81.0}
    errors = []
    for factor in BANDWIDTH_FACTORS:
        err = 0.0
        for g in range(3):
            others = [o for o in range(3) if o != g]
            dist = np.array([d2[tuple(sorted((g, o)))] for o in others])
            w = np.exp(-(dist - dist.min()) / (81.0 * factor))  # 81: median of 1, 100, 81
            err += float(((w @ np.stack([shifts[(1, o)] for o in others]) / w.sum() - shifts[(1, g)]) ** 2).sum())
        errors.append(err)
    chosen = [f for f, e in zip(BANDWIDTH_FACTORS, errors) if e <= min(errors) * 1.01][-1]
    assert table.bandwidth_factor == chosen and table.bandwidth == 81.0 * chosen
    h = table.bandwidth
    c = np.array([0.5, 0.0])  # a new group's cells, between groups 0 and 1, far from 2
    w = np.exp(-np.array([0.25, 0.25, 90.25]) / h)
    want = (w[0] * shifts[(1, 0)] + w[1] * shifts[(1, 1)] + w[2] * shifts[(1, 2)]) / w.sum()
    np.testing.assert_allclose(table.anchor(a, c), want, rtol=1e-6)
    np.testing.assert_allclose(table.anchor(a), [4 / 3, 3])  # without cells: the plain anchor
    np.testing.assert_allclose(table.anchor(b, c), [5, 5])  # B: one group, its anchor
    # group 0 held out: groups 1 and 2 weighted by their distance to group 0's controls
    w0 = np.exp(-np.array([0.0, 99.0]) / h)
    np.testing.assert_allclose(table.held_out_anchor(1, 0), (w0[0] * shifts[(1, 1)] + w0[1] * shifts[(1, 2)]) / w0.sum(),
                               rtol=1e-6)
    assert table.held_out_anchor(2, 0) is None
    back = ConditionTable.from_dict(table.to_dict(), table.anchors, table.group_tensors(), "leave_one_group_out")
    assert back.bandwidth == table.bandwidth
    np.testing.assert_allclose(back.anchor(a, c), table.anchor(a, c))
    np.testing.assert_allclose(back.held_out_anchor(1, 0), table.held_out_anchor(1, 0))


def test_leave_one_group_out_bandwidth_follows_what_the_groups_shifts_show():
    """Two clusters of groups at baseline (a: 0-2, b: 10-12 on gene 0). When the shifts follow
    the clusters, a narrow kernel predicts each group from its own cluster and wins; when they
    alternate between neighbours, the plain mean (an infinite bandwidth) does. Two groups: the median heuristic."""
    ctrl, a = condition_key([]), condition_key(["A"])
    controls = {g: np.array([x, 0.0]) for g, x in enumerate([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])}
    rng = np.random.default_rng(0)
    clustered = {(1, g): np.array([0.0, 5.0 if g < 3 else -5.0]) + 0.1 * rng.standard_normal(2) for g in range(6)}
    logo = {"bandwidth_rule": "leave_one_group_out"}
    table = ConditionTable([ctrl, a], np.zeros((2, 2), np.float32), clustered, controls, **logo)
    assert table.bandwidth_factor <= 0.25
    assert table.group_weighted_anchor(1, np.array([0.5, 0.0]))[1] > 4.5  # borrowed from its own cluster
    unrelated = {(1, g): np.array([0.0, (-1.0) ** g]) for g in range(6)}  # neighbours at baseline differ most
    assert ConditionTable([ctrl, a], np.zeros((2, 2), np.float32), unrelated, controls, **logo).bandwidth_factor == np.inf
    two = {g: controls[g] for g in (0, 3)}
    pair = ConditionTable([ctrl, a], np.zeros((2, 2), np.float32), {(1, 0): np.ones(2), (1, 3): -np.ones(2)}, two,
                          **logo)
    assert pair.bandwidth_factor == 1.0 and pair.bandwidth == 100.0


def test_norman_toy_gears_labels():
    adata = ad.read_h5ad(shared_data("norman2019_toy_combos.h5ad"), backed="r")
    spec = PerturbationSpec("condition", control="ctrl")
    spec.validate(adata)
    labels = sorted(set(spec.labels(adata)))
    assert len(labels) == 42
    n_combos = 0
    for label in labels:
        parts = label.split("+")
        pset = spec.parse(label)
        assert pset == frozenset(p for p in parts if p != "ctrl")
        if "ctrl" not in parts:
            assert len(parts) == 2 and spec.is_combination(label) and len(pset) == 2
            n_combos += 1
        else:
            assert not spec.is_combination(label)
    assert n_combos == 10
    vocab = PerturbationVocab.from_adata(adata, spec)
    idx, _ = vocab.encode_conditions([spec.parse(label) for label in labels])
    assert ((idx >= 0).sum(1) == [len(spec.parse(label)) for label in labels]).all()


def test_group_bandwidth_setting_reaches_the_table_and_survives_save_load(tmp_path):
    adata = make_adata({"control": 90, "P": 90}, 12, effects={"P": {0: 1.0}}, obs={"cell_type": ["a", "b", "c"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = CellDiT(adata, covariate_keys=["cell_type"], hidden_size=16, depth=1, num_heads=2,
                        perturbation_features=None)
        logo = CellDiT(adata, covariate_keys=["cell_type"], group_bandwidth="leave_one_group_out", hidden_size=16,
                       depth=1, num_heads=2, perturbation_features=None)
    assert plain.conditions.bandwidth_rule == "median" and plain.conditions.bandwidth_factor == 1.0
    assert logo.conditions.bandwidth_rule == "leave_one_group_out"
    assert logo.conditions.bandwidth == plain.conditions.bandwidth * logo.conditions.bandwidth_factor
    logo.save(tmp_path / "m")
    back = CellDiT.load(tmp_path / "m")
    assert back.config.group_bandwidth == "leave_one_group_out" and back.conditions.bandwidth == logo.conditions.bandwidth
    with pytest.raises(ValueError, match="group_bandwidth"):
        CellDiT(adata, covariate_keys=["cell_type"], group_bandwidth="knn")
