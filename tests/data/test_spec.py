"""PerturbationSpec parsing/validation and the log-normalisation helper."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import make_adata, shared_data

from celldit.data.expression import check_expression, log_normalize
from celldit.data.spec import PerturbationSpec


def _adata(labels, **obs):
    return make_adata(labels, 3, key="condition", obs=obs)


def test_parse_gears_labels():
    spec = PerturbationSpec("condition", control="ctrl")
    assert spec.parse("ctrl") == frozenset()
    assert spec.parse("A+ctrl") == frozenset({"A"})
    assert spec.parse("ctrl+B") == frozenset({"B"})
    assert spec.parse("A+B") == frozenset({"A", "B"})
    assert spec.parse(" A + B ") == frozenset({"A", "B"})
    assert spec.is_control("ctrl") and not spec.is_control("A+ctrl")
    assert spec.is_combination("A+B") and not spec.is_combination("A+ctrl")
    with pytest.raises(ValueError, match="empty part"):
        spec.parse("A+")


def test_several_control_labels_and_custom_delimiter():
    spec = PerturbationSpec("condition", control=["ctrl", "non-targeting"], delimiter="_")
    assert spec.control_labels == ("ctrl", "non-targeting")
    assert spec.parse("non-targeting") == frozenset()
    assert spec.parse("A_B") == frozenset({"A", "B"})
    assert PerturbationSpec.from_dict(spec.to_dict()) == spec


def test_validate_names_what_to_fix():
    adata = _adata(["ctrl", "A+ctrl", "A+B"], cell_type=["x", "x", "y"])
    PerturbationSpec("condition", control="ctrl", covariate_keys=["cell_type"]).validate(adata)
    with pytest.raises(ValueError, match="obs key 'perturbation'.*perturbation_key"):
        PerturbationSpec("perturbation", control="ctrl").validate(adata)
    with pytest.raises(ValueError, match="control label\\(s\\) 'control' not found"):
        PerturbationSpec("condition", control="control").validate(adata)
    with pytest.raises(ValueError, match="obs key 'donor'.*covariate_keys"):
        PerturbationSpec("condition", control="ctrl", covariate_keys=["donor"]).validate(adata)
    with pytest.raises(ValueError, match="dose_key"):
        PerturbationSpec("condition", control="ctrl", dose_key="dose").validate(adata)
    missing = _adata(["ctrl", None, "A+B"])
    with pytest.raises(ValueError, match="obs\\['condition'\\].* 1 missing \\(NaN\\) entries"):
        PerturbationSpec("condition", control="ctrl").validate(missing)
    # a NaN covariate is refused the same way (it would become a level 'nan' of its own)
    nan_type = _adata(["ctrl", "A+ctrl", "A+B"], cell_type=["x", None, "y"])
    with pytest.raises(ValueError, match="obs\\['cell_type'\\].*covariate_keys.* 1 missing"):
        PerturbationSpec("condition", control="ctrl", covariate_keys=["cell_type"]).validate(nan_type)
    # doses: perturbed cells need one (controls may have none), a number or one per perturbation
    doses = _adata(["ctrl", "A+ctrl", "A+B"], dose=[None, 1.0, "1+10"])
    PerturbationSpec("condition", control="ctrl", dose_key="dose").validate(doses)
    for bad, match in ((None, "1 missing"), ("x", "'x', not a number"), (-2.0, "finite non-negative")):
        spoilt = _adata(["ctrl", "A+ctrl", "A+B"], dose=[None, bad, "1+10"])
        with pytest.raises(ValueError, match=match):
            PerturbationSpec("condition", control="ctrl", dose_key="dose").validate(spoilt)


def test_control_mask_and_labels():
    adata = _adata(["ctrl", "A+ctrl", "ctrl"])
    spec = PerturbationSpec("condition", control="ctrl")
    assert spec.control_mask(adata).tolist() == [True, False, True]
    assert spec.labels(adata).tolist() == ["ctrl", "A+ctrl", "ctrl"]


# ---------------------------------------------------------------------- expression
def test_log_normalize_counts_hand_value():
    counts = np.array([[1, 3, 0], [2, 2, 4]], dtype=np.float32)
    adata = AnnData(sp.csr_matrix(counts))
    out = log_normalize(adata)
    expected = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-5)
    np.testing.assert_array_equal(out.layers["counts"].toarray(), counts)
    np.testing.assert_array_equal(adata.X.toarray(), counts)  # input untouched
    assert out.uns["celldit_expression"]["source"] == "X"


def test_log_normalize_uses_counts_layer_and_warns_on_log_input():
    counts = np.array([[1, 3], [2, 2]], dtype=np.float32)
    adata = AnnData(np.log1p(counts) * 0.37, layers={"counts": counts})
    out = log_normalize(adata)
    np.testing.assert_allclose(out.X, np.log1p(1e4 * counts / counts.sum(1, keepdims=True)),
                               rtol=1e-5)
    logged = AnnData(np.array([[0.5, 1.25]], dtype=np.float32))
    with pytest.warns(UserWarning, match="already"):
        same = log_normalize(logged)
    np.testing.assert_array_equal(same.X, logged.X)


@pytest.mark.parametrize("value,match", [(np.nan, "NaN"), (-1.0, "negative"),
                                         (np.inf, "infinite")])
def test_log_normalize_rejects_bad_values(value, match):
    x = np.array([[1.0, 2.0], [3.0, value]], dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        log_normalize(AnnData(x))
    with pytest.raises(ValueError, match=match):
        log_normalize(AnnData(sp.csr_matrix(x)))


def test_check_expression_allows_negative_when_asked():
    assert check_expression(np.array([[1.0, -0.5]]), allow_negative=True) is False
    assert check_expression(np.array([[1.0, 2.0]])) is True


def test_norman_toy_uses_counts_layer_and_gears_labels():
    adata = ad.read_h5ad(shared_data("norman2019_toy_combos.h5ad"))
    spec = PerturbationSpec("condition", control="ctrl")
    spec.validate(adata)
    out = log_normalize(adata)
    assert out.uns["celldit_expression"]["source"] == "layers['counts']"
    counts = adata.layers["counts"]
    counts = counts.toarray() if sp.issparse(counts) else counts
    x = out.X.toarray() if sp.issparse(out.X) else out.X
    np.testing.assert_allclose(x, np.log1p(1e4 * counts / counts.sum(1, keepdims=True)),
                               rtol=1e-4, atol=1e-5)
    sets = {spec.parse(l) for l in spec.labels(adata)}
    assert frozenset() in sets and any(len(s) == 2 for s in sets)


def test_log_normalize_rejects_a_non_integer_counts_layer():
    adata = AnnData(np.ones((2, 2), dtype=np.float32),
                    layers={"counts": np.array([[0.5, 1.0], [1.0, 2.0]], dtype=np.float32)})
    with pytest.raises(ValueError, match="layers\\['counts'\\] holds non-integer"):
        log_normalize(adata)
