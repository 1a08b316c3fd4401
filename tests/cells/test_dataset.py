"""Cell data: expression rows (in memory / backed), gene selection and paired batches.
Values, not shapes (the vocabulary and condition table: test_cell_conditions.py)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import ArrayRows, make_adata
from scipy.optimize import linear_sum_assignment

from celldit.cells.anchors import ConditionTable
from celldit.cells.dataset import PairedBatches
from celldit.cells.vocab import PAD
from celldit.data.gene_selection import select_genes
from celldit.data.rows import ExpressionRows


def condition_key(names, doses=None):
    """A condition key by hand: (sorted names, their doses)."""
    names = sorted(names)
    return tuple(names), tuple(float(d) for d in (doses or [1.0] * len(names)))


def gene_names(g: int) -> list[str]:
    return [f"g{i}" for i in range(g)]


def counts_adata(n: int = 40, g: int = 12, seed: int = 0, sparse: bool = True) -> AnnData:
    level = np.random.default_rng(seed + 1).uniform(0.5, 6.0, g)
    return make_adata(["control"] * n, g, level=level, sparse=sparse, seed=seed)


def by_hand(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64)
    return np.log1p(1e4 * c / c.sum(1, keepdims=True))


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


def quiet_rows(adata: AnnData, genes=None) -> ExpressionRows:
    """ExpressionRows of log-space floats (silences the 'used as given' warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ExpressionRows(adata, genes)


# -- ExpressionRows -----------------------------------------------------------------------
GENES = ["g5", "g0", "g9", "g3"]  # a subset in a custom order
IDX = np.array([7, 2, 2, 0, 11, 7, 39, 1])  # repeated and unsorted


def test_normalising_keeps_the_callers_torch_threads():
    """scanpy's numba kernels share torch's OpenMP runtime and would reset its thread count."""
    import torch

    from celldit.data.expression import log_normalize

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        adata = counts_adata(n=300, g=40)
        log_normalize(adata)
        assert torch.get_num_threads() == 1
        select_genes(adata, "hvg", n_top_genes=10)  # scanpy's highly_variable_genes
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_expression_rows_in_memory_and_backed_equal_hand_normalisation(tmp_path):
    adata = counts_adata()
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    expected = by_hand(dense(adata.X))[:, [5, 0, 9, 3]]
    mem = ExpressionRows(adata, GENES)
    backed = ExpressionRows(ad.read_h5ad(path, backed="r"), GENES)
    dense_mem = ExpressionRows(counts_adata(sparse=False), GENES)
    for rows in (mem, backed, dense_mem):
        assert rows.counts and rows.genes == GENES and rows.n_vars == 4
        np.testing.assert_allclose(rows.rows(IDX), expected[IDX], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rows.all_rows(IDX, chunk=3), expected[IDX], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rows.all_rows(), expected, rtol=1e-6, atol=1e-6)
    assert backed.backed and not mem.backed
    np.testing.assert_array_equal(mem.rows(IDX), dense_mem.rows(IDX))


def test_smallest_positive_reads_every_gene_of_the_source(tmp_path):
    """A log1p cell's first count level comes from all its genes, not only the model's: here
    the one-count value of cells 0 and 1 lies in a gene the model does not keep."""
    counts = np.array([[1, 0, 3, 6], [0, 2, 4, 0], [0, 0, 0, 0], [5, 5, 5, 5]], dtype=float)
    logged = np.log1p(1e4 * counts / np.maximum(counts.sum(1, keepdims=True), 1)).astype(np.float32)
    want = [np.log1p(1e4 / 10), np.log1p(2e4 / 6), 0.0, np.log1p(1e4 / 4)]
    var = pd.DataFrame(index=["a", "b", "c", "d"])
    path = tmp_path / "logged.h5ad"
    AnnData(sp.csr_matrix(logged), var=var).write_h5ad(path)
    for adata in (AnnData(sp.csr_matrix(logged), var=var), AnnData(logged, var=var), ad.read_h5ad(path, backed="r")):
        rows = ExpressionRows(adata, ["c", "d"], input_space="log1p")
        np.testing.assert_allclose(rows.smallest_positive(chunk=3), want, rtol=1e-6)
        model_genes_only = np.where(rows.all_rows() > 0, rows.all_rows(), np.inf).min(1)
        assert model_genes_only[0] > want[0] and model_genes_only[1] > want[1]  # what was read before


def test_cached_rows_are_normalised_once_and_equal_uncached_reads(tmp_path):
    """A training buffer holds its rows normalised; reads from it equal reads from the source
    bit for bit (sparse or dense, in memory or backed), and rows outside it still normalise."""
    adata = counts_adata()
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    held = np.array([0, 1, 2, 7, 11, 20, 39])
    for rows in (ExpressionRows(adata, GENES), ExpressionRows(counts_adata(sparse=False), GENES),
                 ExpressionRows(ad.read_h5ad(path, backed="r"), GENES)):
        fresh = rows.rows(IDX)
        rows.cache(held[::-1])  # any order
        assert rows._cached(IDX) is not None
        np.testing.assert_array_equal(rows.rows(IDX), fresh)
        assert rows._cached(np.array([3, 0])) is None  # 3 is not held: read from the source
        np.testing.assert_allclose(rows.rows(np.array([3, 0])), by_hand(dense(adata.X))[[3, 0]][:, [5, 0, 9, 3]],
                                   rtol=1e-6, atol=1e-6)
        rows.cache(np.array([], dtype=np.int64))
        assert rows._cached(IDX) is None
        np.testing.assert_array_equal(rows.rows(IDX), fresh)


def test_backed_rows_use_the_counts_layer_like_in_memory(tmp_path):
    """X log-normalised some other way + raw counts in layers['counts']: both paths normalise the counts."""
    adata = counts_adata()
    counts = dense(adata.X).copy()
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.X = sp.csr_matrix(np.log1p(counts / 3.0).astype(np.float32))  # not the model space
    path = tmp_path / "layer.h5ad"
    adata.write_h5ad(path)
    expected = by_hand(counts)[:, [5, 0, 9, 3]][IDX]
    for source in (adata, ad.read_h5ad(path, backed="r")):
        rows = ExpressionRows(source, GENES)
        assert rows.counts
        np.testing.assert_allclose(rows.rows(IDX), expected, rtol=1e-6, atol=1e-6)
    adata.layers["counts"] = sp.csr_matrix(counts + 0.5)  # not counts: refused, in memory or backed
    adata.write_h5ad(tmp_path / "bad_layer.h5ad")
    for source in (adata, ad.read_h5ad(tmp_path / "bad_layer.h5ad", backed="r")):
        with pytest.raises(ValueError, match="layers\\['counts'\\] holds non-integer"):
            ExpressionRows(source, GENES)


def test_normalised_x_warns_and_is_used_as_given(tmp_path):
    adata = counts_adata()
    adata.X = sp.csr_matrix(by_hand(dense(adata.X)).astype(np.float32))
    path = tmp_path / "norm.h5ad"
    adata.write_h5ad(path)
    expected = dense(adata.X)[:, [5, 0, 9, 3]][IDX]
    for source in (adata, ad.read_h5ad(path, backed="r")):
        with pytest.warns(UserWarning, match="non-integer"):
            rows = ExpressionRows(source, GENES)
        assert not rows.counts
        np.testing.assert_array_equal(rows.rows(IDX), expected)


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN"), (-1.0, "negative")])
def test_nan_and_negative_counts_raise(tmp_path, bad, match):
    adata = counts_adata(n=300)
    x = dense(adata.X).copy()
    x[3, 2] = bad
    with pytest.raises(ValueError, match=match):
        ExpressionRows(AnnData(x))
    with pytest.raises(ValueError, match=match):
        ExpressionRows(AnnData(sp.csr_matrix(x)))
    # backed: the whole file is checked in one chunked pass, so a bad value far down fails at once
    x[3, 2], x[290, 4] = 1.0, bad
    path = tmp_path / "bad.h5ad"
    AnnData(sp.csr_matrix(x)).write_h5ad(path)
    with pytest.raises(ValueError, match=match):
        ExpressionRows(ad.read_h5ad(path, backed="r"))


def test_missing_genes_are_named():
    with pytest.raises(ValueError) as err:
        ExpressionRows(counts_adata(), ["g1", "nope", "gone"])
    assert "'nope'" in str(err.value) and "'gone'" in str(err.value)


# -- select_genes -------------------------------------------------------------------------
def test_select_genes_all_and_list():
    adata = counts_adata()
    assert select_genes(adata, "all") == gene_names(12)
    assert select_genes(adata, ["g3", "g1"]) == ["g3", "g1"]
    with pytest.raises(ValueError, match="'missing'"):
        select_genes(adata, ["g3", "missing"])
    with pytest.raises(ValueError, match="genes="):
        select_genes(adata, "some")


def test_select_genes_hvg_finds_the_planted_variable_genes():
    """Poisson genes over a range of means (enough per mean bin of Seurat's normalised
    dispersion) plus 5 planted genes with the same mean but a bimodal, far wider spread."""
    rng = np.random.default_rng(0)
    n, g = 200, 600
    planted = [60, 180, 300, 400, 470]
    base = np.linspace(4.0, 12.0, g)
    rate = np.tile(base, (n, 1))
    rate[:, planted] = base[planted] * np.where(rng.random((n, len(planted))) < 0.5, 0.1, 1.9)
    adata = AnnData(rng.poisson(rate).astype(np.float32), var=pd.DataFrame(index=gene_names(g)))
    assert select_genes(adata, "hvg", n_top_genes=5) == [f"g{i}" for i in planted]
    top20 = select_genes(adata, "hvg", n_top_genes=20)
    assert len(top20) == 20 and set(top20) > {f"g{i}" for i in planted}
    assert select_genes(adata, "hvg", n_top_genes=g) == gene_names(g)


# -- PairedBatches ------------------------------------------------------------------------
PERT_IDX = np.array([[PAD, PAD], [0, PAD], [1, PAD], [0, 1]])  # control, A, B, A+B
PERT_SCALE = (PERT_IDX >= 0).astype(np.float32)


def paired_data(orphan_group: bool = False, seed: int = 0):
    """Cells with their id in gene 0 and a value distinctive of their pairing group in gene 1.

    Groups 0 and 1 have 30 controls, 20 A and 20 B cells; group 2 has 30 controls and 20 A+B
    cells; with ``orphan_group`` a group 3 has 20 A cells and no control.
    """
    rng = np.random.default_rng(seed)
    cond, group = [], []
    for g, conds in [(0, (1, 2)), (1, (1, 2)), (2, (3,))]:
        cond += [0] * 30
        group += [g] * 30
        for c in conds:
            cond += [c] * 20
            group += [g] * 20
    if orphan_group:
        cond += [1] * 20
        group += [3] * 20
    cond, group = np.array(cond), np.array(group)
    n = len(cond)
    x = (np.abs(rng.standard_normal((n, 6))) + 0.5 * cond[:, None]).astype(np.float32)
    x[:, 0] = np.arange(n)
    x[:, 1] = 10.0 * (group + 1)
    return ArrayRows(x), x, cond, group


def make_batches(expr, cond, group, **kwargs) -> PairedBatches:
    kw = {"batch_size": 64, "block_size": 16, "ot": False, "steps": 6, "seed": 0}
    kw.update(kwargs)
    return PairedBatches(expr, cond, group, np.arange(len(cond)), 0, PERT_IDX, PERT_SCALE, group[:, None], **kw)


def test_pairs_are_controls_of_the_target_group_in_single_condition_blocks():
    expr, x, cond, group = paired_data()
    anchors = np.zeros((4, 6), np.float32)
    anchors[:, 2:] = np.random.default_rng(5).standard_normal((4, 4))
    anchors[0] = 0.0
    for kwargs in ({}, {"anchors": anchors}, {"anchors": anchors, "ot": True}):
        seen_conds = set()
        for b in make_batches(expr, cond, group, **kwargs):
            x1, src = b["x1"].numpy(), b["source"].numpy()
            t_id, s_id = x1[:, 0].astype(int), src[:, 0].astype(int)
            assert x1.shape == (64, 6)
            np.testing.assert_array_equal(x1, x[t_id])
            assert (cond[s_id] == 0).all() and (cond[t_id] != 0).all()
            np.testing.assert_array_equal(src[:, 1], x1[:, 1])  # the group's distinctive value
            np.testing.assert_array_equal(group[s_id], group[t_id])
            np.testing.assert_array_equal(b["pert_idx"].numpy(), PERT_IDX[cond[t_id]])
            np.testing.assert_array_equal(b["pert_scale"].numpy(), PERT_SCALE[cond[t_id]])
            np.testing.assert_array_equal(b["cov_idx"].numpy()[:, 0], group[t_id])
            shift = anchors[cond[t_id]] if "anchors" in kwargs else 0.0
            np.testing.assert_allclose(src, x[s_id] + shift, rtol=0, atol=1e-6)
            for blk in range(4):  # every block of 16 holds one condition of one group
                sl = slice(16 * blk, 16 * blk + 16)
                assert len(set(cond[t_id[sl]])) == 1 and len(set(group[t_id[sl]])) == 1
                assert len(set(t_id[sl])) == 16  # targets drawn without replacement
            seen_conds |= set(cond[t_id])
        assert seen_conds == {1, 2, 3}


def test_hidden_covariate_blocks_get_the_unknown_code_and_the_held_out_anchor():
    """A block whose covariates are hidden starts from the anchor its group would get had it
    never been trained with the condition (the other groups' mean shift); the rest are as before."""
    expr, x, cond, group = paired_data()
    # per-group shifts: A in groups 0 and 1, B in groups 0 and 1, A+B in group 2 only
    shifts = {(1, 0): 1.0, (1, 1): 3.0, (2, 0): -2.0, (2, 1): 4.0, (3, 2): 7.0}
    genes = np.array([0, 0, 1, 1, 1, 1], np.float32)  # columns 0-1 carry ids: no shift there
    table = ConditionTable([condition_key(n) for n in ([], ["A"], ["B"], ["A", "B"])], np.zeros((4, 6), np.float32),
                           {k: v * genes for k, v in shifts.items()})
    anchors = np.array([[0.0], [2.0], [1.0], [7.0]], np.float32) * genes
    unknown = np.array([3])
    kw = {"anchors": anchors, "unknown_cov": unknown, "cov_group": group, "held_out_anchor": table.held_out_anchor}
    np.testing.assert_array_equal(table.held_out_anchor(1, 0), 3.0 * genes)
    assert table.held_out_anchor(3, 2) is None  # trained in one group only
    hidden = shown = 0
    for b in make_batches(expr, cond, group, covariate_dropout=0.5, steps=40, **kw):
        x1, src, cov = b["x1"].numpy(), b["source"].numpy(), b["cov_idx"].numpy()[:, 0]
        t_id, s_id = x1[:, 0].astype(int), src[:, 0].astype(int)
        for blk in range(4):
            sl = slice(16 * blk, 16 * blk + 16)
            c, g = cond[t_id[sl]][0], group[t_id[sl]][0]
            if (cov[sl] == 3).all():
                hidden += 1
                other = table.held_out_anchor(c, g)
                want = anchors[c] if other is None else other
            else:
                shown += 1
                np.testing.assert_array_equal(cov[sl], g)
                want = anchors[c]
            np.testing.assert_allclose(src[sl, 2:], x[s_id[sl], 2:] + want[2:], atol=1e-6)
    assert 0.35 < hidden / (hidden + shown) < 0.65
    for b in make_batches(expr, cond, group, covariate_dropout=0.0, **kw):  # off: every code shown
        np.testing.assert_array_equal(b["cov_idx"].numpy()[:, 0], group[b["x1"].numpy()[:, 0].astype(int)])


def block_cost(x1: np.ndarray, x0: np.ndarray) -> float:
    return float(((x1 - x0) ** 2).sum())


def test_ot_pairing_is_optimal_within_blocks():
    rng = np.random.default_rng(3)
    n = 200
    cond = np.repeat([0, 1], n // 2)
    group = np.zeros(n, dtype=int)
    x = np.abs(rng.standard_normal((n, 5))).astype(np.float32)
    expr = quiet_rows(AnnData(x))
    ot = make_batches(expr, cond, group, ot=True, seed=7, block_size=16)
    rnd = make_batches(expr, cond, group, ot=False, seed=7, block_size=16)
    improved = 0
    for b_ot, b_rnd in zip(ot, rnd):
        np.testing.assert_array_equal(b_ot["x1"], b_rnd["x1"])  # OT does not change the draws
        for blk in range(4):
            sl = slice(16 * blk, 16 * blk + 16)
            x1, s_ot, s_rnd = b_ot["x1"].numpy()[sl], b_ot["source"].numpy()[sl], b_rnd["source"].numpy()[sl]
            # the same sources, re-paired
            np.testing.assert_array_equal(np.sort(s_ot, axis=0), np.sort(s_rnd, axis=0))
            cost = ((x1[:, None] - s_rnd[None]) ** 2).sum(-1)
            r, c = linear_sum_assignment(cost)
            assert block_cost(x1, s_ot) == pytest.approx(cost[r, c].sum(), rel=1e-5)
            assert block_cost(x1, s_ot) <= block_cost(x1, s_rnd) + 1e-4
            improved += block_cost(x1, s_ot) < 0.9 * block_cost(x1, s_rnd)
    assert improved >= 20  # of 24 blocks: OT pays


def test_include_control_adds_control_targets():
    expr, _x, cond, group = paired_data()
    with_ctrl = [b for b in make_batches(expr, cond, group, include_control=True, steps=20)]
    without = [b for b in make_batches(expr, cond, group, steps=20)]
    ids_with = np.concatenate([b["x1"].numpy()[:, 0] for b in with_ctrl]).astype(int)
    ids_without = np.concatenate([b["x1"].numpy()[:, 0] for b in without]).astype(int)
    assert (cond[ids_with] == 0).mean() > 0.2  # controls are 90 of 250 cells
    assert (cond[ids_without] == 0).sum() == 0
    for b in with_ctrl:
        is_ctrl = (b["pert_idx"].numpy() == PAD).all(1)
        t_id, s_id = b["x1"].numpy()[:, 0].astype(int), b["source"].numpy()[:, 0].astype(int)
        np.testing.assert_array_equal(is_ctrl, cond[t_id] == 0)
        assert (cond[s_id] == 0).all() and (group[s_id] == group[t_id]).all()


def test_batches_are_reproducible_for_a_seed():
    expr, _x, cond, group = paired_data()

    def draw(seed):
        return [(b["x1"].numpy(), b["source"].numpy()) for b in make_batches(expr, cond, group, seed=seed, ot=True)]

    a, b, c = draw(1), draw(1), draw(2)
    for (x1a, sa), (x1b, sb) in zip(a, b):
        np.testing.assert_array_equal(x1a, x1b)
        np.testing.assert_array_equal(sa, sb)
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))
    data = make_batches(expr, cond, group, seed=1)
    first, second = [bb["x1"].numpy() for bb in data], [bb["x1"].numpy() for bb in data]
    assert len(first) == len(data) == 6
    assert not all(np.array_equal(p, q) for p, q in zip(first, second))  # a new epoch, new draws


def test_group_without_controls_warns_and_is_skipped():
    expr, _x, cond, group = paired_data(orphan_group=True)
    with pytest.warns(UserWarning, match="20 target cells have no control"):
        data = make_batches(expr, cond, group, steps=20)
    ids = np.concatenate([b["x1"].numpy()[:, 0] for b in data]).astype(int)
    assert (group[ids] != 3).all()
    assert set(cond[ids]) == {1, 2, 3}


def test_no_pairs_raise():
    expr, _x, cond, group = paired_data()
    only_ctrl = np.flatnonzero(cond == 0)
    with pytest.raises(ValueError, match="no perturbed cells"):
        PairedBatches(expr, cond, group, only_ctrl, 0, PERT_IDX, PERT_SCALE, group[:, None])
    # targets of group 0 with the controls of group 1 only
    cells = np.flatnonzero(((cond != 0) & (group == 0)) | ((cond == 0) & (group == 1)))
    with pytest.warns(UserWarning, match="no control cell"), pytest.raises(ValueError, match="no training pairs"):
        PairedBatches(expr, cond, group, cells, 0, PERT_IDX, PERT_SCALE, group[:, None])
