"""The spread along each perturbation's shift: a split prediction against an unsplit one."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import make_adata

from celldit.bench.shift_axis import split_along_shift
from celldit.data.expression import log_normalize
from celldit.data.spec import PerturbationSpec

SPEC = PerturbationSpec("perturbation", control="control")
GENES = 16


def _screen(seed: int) -> ad.AnnData:
    """Counts: P raises genes 0-3 eightfold in 60% of its cells (the rest escape); Q in all."""
    return make_adata({"control": 300, "P": 300, "Q": 300}, GENES, level=6.0, seed=seed, sparse=False,
                      effects={"P": dict.fromkeys(range(4), 2.1), "Q": dict.fromkeys(range(4), 1.2)},
                      penetrance={"P": 0.6})


def _as_prediction(cells: ad.AnnData, label: str) -> ad.AnnData:
    x = np.asarray(log_normalize(cells).X, dtype=np.float32)
    return ad.AnnData(x, obs={"perturbation": [label] * cells.n_obs}, var=cells.var)


def test_a_split_prediction_scores_near_the_real_profile_and_mean_shift_does_not():
    train, test = _screen(0), _screen(1)
    lab = test.obs["perturbation"].astype(str).to_numpy()
    # P predicted by fresh cells of the same mixture; Q by the held-out controls (no change)
    real_like = _screen(2)
    pred = ad.concat([_as_prediction(real_like[real_like.obs["perturbation"] == "P"], "P"),
                      _as_prediction(test[lab == "control"], "Q")], index_unique="-")
    out = split_along_shift(test, pred, SPEC, train, ["P", "Q"])
    p, q = out["per_condition"]["P"], out["per_condition"]["Q"]
    assert out["split"] == ["P"]  # Q moves every cell: spread as the controls
    assert p["sd_real"] > 1.25 * p["sd_controls"]
    assert p["sd_mean_shift"] == pytest.approx(p["sd_controls"], rel=1e-3)  # controls moved together
    assert abs(p["sd_model"] / p["sd_real"] - 1) < 0.15
    assert p["w1_model"] < 0.1 < p["w1_mean_shift"]
    assert q["w1_model"] == pytest.approx(1.0, abs=0.1)  # no change: off by the whole shift
    assert out["summary"]["w1_model"] == p["w1_model"]
    assert out["summary"]["sd_controls_over_real"] < 0.8


def test_held_out_cells_without_controls_are_refused():
    train, test = _screen(0), _screen(1)
    no_ctrl = test[test.obs["perturbation"] != "control"].copy()
    pred = _as_prediction(no_ctrl[:10], "P")
    with pytest.raises(ValueError, match="no control cells"):
        split_along_shift(no_ctrl, pred, SPEC, train, ["P"])
