"""`CellDiT.effects()`: each trained condition's evidence of an effect and its anchor, so that a
user can tell the perturbations the model treats as without detectable effect."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import make_adata

from celldit.cells import CellDiT

TINY = {"hidden_size": 32, "depth": 1, "num_heads": 4, "perturbation_features": None}


def _screen(**obs):
    # P raises g1 and lowers g4 by far more than their noise; Q changes nothing
    return make_adata({"control": 300, "P": 200, "Q": 200}, 12, effects={"P": {1: 1.6, 4: -1.2}},
                      level=np.full(12, 5.0), sparse=False, seed=0, obs=obs or None)


def _model(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CellDiT(adata, perturbation_key="perturbation", control="control", **TINY, **kwargs)


def test_a_clear_effect_and_a_null_one_are_told_apart():
    model = _model(_screen())
    table = model.effects()
    assert list(table.index) == ["P", "Q"]  # clear effects first; the control is not a row
    p, q = table.loc["P"], table.loc["Q"]
    assert p["evidence"] == "clear" and p["gate"] == 1.0
    assert p["largest"] == "g4" and p["largest_change"] < -1.0 and p["up"].split(", ")[0] == "g1"
    assert p["down"].split(", ")[0] == "g4"
    assert q["evidence"] == "none detected" and q["gate"] == pytest.approx(model.config.shrinkage_floor)
    assert q["anchor_norm"] < 0.05 * p["anchor_norm"]
    # the table reads the model's anchors: P's norm is its anchor's length
    row = [i for i, (names, _) in enumerate(model.conditions.keys) if names == ("P",)][0]
    assert p["anchor_norm"] == pytest.approx(np.linalg.norm(model.conditions.anchors[row]), abs=1e-4)
    assert len(model.effects(top=1).loc["P", "up"].split(", ")) == 1
    with pytest.raises(ValueError, match="top"):
        model.effects(top=0)


def test_without_shrinkage_nothing_is_gated_and_doses_are_rows_of_their_own():
    assert set(_model(_screen(), anchor_shrinkage=None).effects()["evidence"]) == {"not gated"}
    adata = _screen()
    perturbed = (adata.obs["perturbation"] != "control").to_numpy()
    adata.obs["dose"] = np.where(perturbed, np.where(np.arange(adata.n_obs) % 2, 1.0, 10.0), 0.0)
    table = _model(adata, dose_key="dose").effects()
    assert sorted(zip(table.index, table["dose"])) == [("P", "1"), ("P", "10"), ("Q", "1"), ("Q", "10")]
    assert set(table.loc["P", "evidence"]) == {"clear"}


def test_the_table_survives_save_and_load(tmp_path):
    model = _model(_screen()).fit(max_steps=2, batch_size=64, trainer={"progress_bar": False, "logger": None})
    folder = model.save(tmp_path / "model")
    loaded = CellDiT.load(folder)
    assert loaded.effects().equals(model.effects())
    written = pd.read_csv(folder / "effects.csv", index_col=0)  # the table saved beside the model, for reading
    assert list(written.index) == ["P", "Q"] and list(written["evidence"]) == ["clear", "none detected"]


def test_summary_line_counts_each_level():
    from celldit.cells.effects import evidence_summary

    assert evidence_summary(_model(_screen()).effects()) == "1 clear, 1 none detected"


def test_summary_line_counts_conditions_split_by_escapers():
    from celldit.cells.effects import evidence_summary

    table = pd.DataFrame({"evidence": ["clear", "clear", "weak"], "escapers": [0.25, 0.0, 0.0]}, index=["A", "B", "C"])
    assert evidence_summary(table) == "2 clear, 1 weak; 1 with escapers"
    assert evidence_summary(table.assign(escapers=0.0)) == "2 clear, 1 weak"
