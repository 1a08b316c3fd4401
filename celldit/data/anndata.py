"""AnnData cells as flow training data: expression rows on demand and (source, target) pairs.

:class:`ExpressionRows` keeps the matrix sparse (in memory, or on disk for AnnData opened
with ``read_h5ad(backed="r")``) and densifies only the rows of a batch, in the model's
expression space (log1p of counts normalised to 1e4 per cell, by default).

:class:`PairedBatches` draws batches of (source control cell, target cell, condition):
each batch is made of blocks, a block holding target cells of one condition in one pairing
group (same covariates, and e.g. the same replicate) and as many control cells of that
group, optionally re-paired by exact minibatch optimal transport.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, IterableDataset

from .expression import TARGET_SUM, check_expression, log_normalize


def _dense(block) -> np.ndarray:
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)


def gene_positions(var_names: Sequence[str], genes: Sequence[str], what: str = "genes") -> np.ndarray:
    """Column index of each of ``genes`` in ``var_names``; ``ValueError`` listing missing ones."""
    lookup = {g: i for i, g in enumerate(map(str, var_names))}
    missing = [g for g in genes if g not in lookup]
    if missing:
        shown = ", ".join(map(repr, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{len(missing)} of the {what} are not in adata.var_names: {shown}")
    return np.array([lookup[g] for g in genes], dtype=np.int64)


def select_genes(adata: AnnData, genes: str | Sequence[str] = "all", n_top_genes: int = 2000) -> list[str]:
    """The gene set a model works on: ``"all"``, ``"hvg"`` (scanpy's Seurat-flavour highly
    variable genes of the log-normalised data, in ``var`` order) or an explicit list."""
    if isinstance(genes, str):
        if genes == "all":
            return list(map(str, adata.var_names))
        if genes != "hvg":
            raise ValueError(f"genes={genes!r}: use 'all', 'hvg' or a list of gene names")
        import scanpy as sc

        sample = adata if not adata.isbacked else adata[np.sort(np.random.default_rng(0).permutation(
            adata.n_obs)[:20000])].to_memory()
        norm = log_normalize(sample) if check_expression(sample.X) else sample
        if n_top_genes >= norm.n_vars:
            return list(map(str, adata.var_names))
        hvg = sc.pp.highly_variable_genes(norm, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
        return [g for g, keep in zip(map(str, norm.var_names), hvg["highly_variable"].to_numpy()) if keep]
    genes = [str(g) for g in genes]
    gene_positions(adata.var_names, genes)
    return genes


class ExpressionRows:
    """Cells of an AnnData in model space, densified a batch of rows at a time.

    Parameters
    ----------
    adata
        Cells x genes, in memory or backed. Raw counts (``layers['counts']`` or an
        integer ``X``) are log1p-normalised; non-integer ``X`` is taken as already
        log-normalised (a warning says so).
    genes
        Gene names to keep, in output column order (default: all).
    target_sum
        Counts per cell after normalisation.
    """

    def __init__(self, adata: AnnData, genes: Sequence[str] | None = None, target_sum: float = TARGET_SUM):
        self.genes = list(map(str, adata.var_names)) if genes is None else list(genes)
        self.columns = gene_positions(adata.var_names, self.genes)
        self.target_sum = float(target_sum)
        self.backed = bool(adata.isbacked)
        self.n_obs = adata.n_obs
        if self.backed:
            # like log_normalize: layers['counts'] when present, else X (normalised row by row in rows())
            self._where = "layers['counts']" if "counts" in adata.layers else "X"
            self._matrix = adata.layers.get("counts", adata.X)
            first = _dense(self._matrix[: min(256, self.n_obs)])
            self.counts = check_expression(first, self._where)
            if not self.counts and self._where != "X":
                raise ValueError(f"{self._where} holds non-integer values, so it is not raw counts; drop or "
                                 "rename that layer to use X as given")
            if not self.counts:
                warnings.warn("X holds non-integer values: assuming it is already "
                              "log1p(normalize_total(counts, 1e4)) and using it as given", UserWarning, stacklevel=2)
        else:
            norm = log_normalize(adata)
            self.counts = norm.uns["celldit_expression"]["source"] != "as_given"
            x = norm.X
            self._matrix = sp.csr_matrix(x[:, self.columns], dtype=np.float32) if sp.issparse(x) \
                else np.asarray(x[:, self.columns], dtype=np.float32)

    @property
    def n_vars(self) -> int:
        return len(self.genes)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), n_genes) float32 expression of the cells ``idx`` (any order, repeats allowed)."""
        idx = np.asarray(idx, dtype=np.int64)
        if not self.backed:
            return _dense(self._matrix[idx])
        uniq, inverse = np.unique(idx, return_inverse=True)  # h5 reads want sorted unique rows
        block = self._matrix[uniq]
        block = block.tocsr() if sp.issparse(block) else np.asarray(block)
        check_expression(block, self._where)  # NaN / negative values beyond the rows checked at start
        if self.counts:  # normalise over all genes, then keep the chosen ones (as scanpy does)
            totals = np.asarray(block.sum(1)).ravel()
            scale = np.where(totals > 0, self.target_sum / np.where(totals > 0, totals, 1), 0.0)
            block = sp.diags(scale.astype(np.float32)) @ block if sp.issparse(block) else block * scale[:, None]
            block = block.log1p() if sp.issparse(block) else np.log1p(block)
        return _dense(block[:, self.columns])[inverse]

    def all_rows(self, idx: np.ndarray | None = None, chunk: int = 8192) -> np.ndarray:
        """Dense rows ``idx`` (default all), read in chunks."""
        idx = np.arange(self.n_obs) if idx is None else np.asarray(idx)
        if idx.size == 0:
            return np.zeros((0, self.n_vars), np.float32)
        return np.concatenate([self.rows(idx[s: s + chunk]) for s in range(0, len(idx), chunk)])


class CenteredRows:
    """Expression rows minus the control mean of each cell's batch (``rows`` like :class:`ExpressionRows`).

    Replicates and batches of a screen differ mostly by an offset of the whole batch, which
    each batch's control cells measure. Working on ``x - mean(controls of its batch)`` puts
    cells of a new batch (centred on their own controls) where the model was trained.

    Parameters
    ----------
    expr
        The uncentred rows.
    centers
        (n_batches, G) control mean of each batch.
    batch
        (n_cells,) batch code of each cell.
    """

    def __init__(self, expr: ExpressionRows, centers: np.ndarray, batch: np.ndarray):
        self.expr, self.centers, self.batch = expr, centers.astype(np.float32), np.asarray(batch)
        self.genes, self.n_obs, self.counts = expr.genes, expr.n_obs, expr.counts

    @property
    def n_vars(self) -> int:
        return self.expr.n_vars

    def rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return self.expr.rows(idx) - self.centers[self.batch[idx]]

    all_rows = ExpressionRows.all_rows


class PairedBatches(IterableDataset):
    """Batches of (source control cell, target cell, condition) for flow matching.

    Parameters
    ----------
    expr
        Expression rows of the cells.
    cond_id, group_id
        (n_cells,) condition code (row of ``pert_idx``) and pairing group of each cell.
    cells
        Indices of the cells to train on (targets and controls).
    control_cond
        Condition code of control cells.
    pert_idx, pert_scale
        (n_conditions, K) perturbation rows and dose scales of each condition.
    cov_idx
        (n_cells, C) covariate codes.
    anchors
        Optional (n_conditions, G) shift added to each source (the condition's mean shift):
        the flow then learns what a mean shift misses.
    include_control
        Also train on control -> control pairs (needed by the noise source, which must
        generate control cells).
    batch_size, block_size
        Cells per batch, and per single-condition block.
    ot
        Re-pair each block's sources and targets by exact OT (squared Euclidean cost).
    ot_basis
        Optional (G, k) basis: the OT cost is measured on the projections ``x @ ot_basis``
        (e.g. the leading principal components, where cells differ in structure rather
        than in per-gene noise).
    steps
        Batches per epoch.
    seed
        Seed of the draws (re-seeded per epoch).
    covariate_dropout, unknown_cov, cov_group, held_out_anchor
        Hide the covariates of a block with probability ``covariate_dropout``: its cells
        get the ``unknown_cov`` codes (C,) and, where ``held_out_anchor(cond, group)``
        (``group`` from the (n_cells,) covariate-group codes ``cov_group``) gives one, the
        anchor a covariate group never trained with the condition would get. Training then
        poses the question asked of a held-out cell type.
    """

    def __init__(self, expr: ExpressionRows | CenteredRows, cond_id: np.ndarray, group_id: np.ndarray, cells: np.ndarray,
                 control_cond: int, pert_idx: np.ndarray, pert_scale: np.ndarray, cov_idx: np.ndarray,
                 anchors: np.ndarray | None = None, include_control: bool = False, batch_size: int = 256,
                 block_size: int = 64, ot: bool = True, steps: int = 100, seed: int = 0,
                 ot_basis: np.ndarray | None = None, covariate_dropout: float = 0.0,
                 unknown_cov: np.ndarray | None = None, cov_group: np.ndarray | None = None,
                 held_out_anchor=None):
        super().__init__()
        self.expr, self.cov_idx = expr, cov_idx
        self.pert_idx, self.pert_scale, self.anchors = pert_idx, pert_scale, anchors
        self.ot_basis = None if ot_basis is None else np.asarray(ot_basis, dtype=np.float32)
        self.batch_size, self.block_size, self.ot, self.steps, self.seed = batch_size, block_size, ot, steps, seed
        self.epoch = 0
        cells = np.asarray(cells)
        is_ctrl = cond_id[cells] == control_cond
        self.controls = {g: cells[is_ctrl & (group_id[cells] == g)] for g in np.unique(group_id[cells])}
        strata: dict[tuple[int, int], list[int]] = {}
        for c in cells if include_control else cells[~is_ctrl]:
            strata.setdefault((int(cond_id[c]), int(group_id[c])), []).append(c)
        orphan = [k for k in strata if self.controls.get(k[1], np.empty(0)).size == 0]
        if orphan:
            warnings.warn(f"{sum(len(strata[k]) for k in orphan)} target cells have no control cell "
                          "in their pairing group (same covariates / pairing keys) and are skipped", UserWarning,
                          stacklevel=2)
        self.strata = [(k, np.asarray(v)) for k, v in sorted(strata.items()) if k not in orphan]
        if not self.strata:
            raise ValueError("no training pairs: no target cell shares a pairing group with control cells")
        sizes = np.array([len(v) for _, v in self.strata], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.covariate_dropout = covariate_dropout if unknown_cov is not None and cov_idx.shape[1] else 0.0
        self.unknown_cov = unknown_cov
        self.hidden_anchor: dict[int, np.ndarray] = {}  # stratum -> anchor with its covariates hidden
        if self.covariate_dropout and anchors is not None and held_out_anchor is not None:
            for i, ((cond, _), members) in enumerate(self.strata):
                a = held_out_anchor(cond, int(cov_group[members[0]]))
                if a is not None:
                    self.hidden_anchor[i] = a

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for _ in range(self.steps):
            yield self.batch(rng)

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One batch: ``x1`` targets, ``source`` (control cells, plus anchor), conditioning."""
        tgt, src, conds, hidden = [], [], [], []
        n = 0
        while n < self.batch_size:
            stratum = rng.choice(len(self.strata), p=self.weights)
            (cond, group), members = self.strata[stratum]
            b = min(self.block_size, self.batch_size - n, len(members))
            t_idx = rng.choice(members, b, replace=False)
            pool = self.controls[group]
            s_idx = rng.choice(pool, b, replace=len(pool) < b)
            tgt.append(t_idx), src.append(s_idx), conds.append(np.full(b, cond))
            hidden.append(stratum if self.covariate_dropout and rng.random() < self.covariate_dropout else -1)
            n += b
        t_idx, s_idx, cond = np.concatenate(tgt), np.concatenate(src), np.concatenate(conds)
        x1, x0 = self.expr.rows(t_idx), self.expr.rows(s_idx)
        cov_idx = self.cov_idx[t_idx].copy()
        if self.anchors is not None:
            x0 = x0 + self.anchors[cond]
        start = 0
        for block, stratum in zip(tgt, hidden):
            sl = slice(start, start + len(block))
            start += len(block)
            if stratum >= 0:
                cov_idx[sl] = self.unknown_cov
                if stratum in self.hidden_anchor:
                    x0[sl] += self.hidden_anchor[stratum] - self.anchors[cond[sl.start]]
        if self.ot:
            p1, p0 = (x1, x0) if self.ot_basis is None else (x1 @ self.ot_basis, x0 @ self.ot_basis)
            start = 0
            for block in tgt:
                sl = slice(start, start + len(block))
                cost = ((p1[sl, None, :] - p0[None, sl, :]) ** 2).sum(-1)
                _, cols = linear_sum_assignment(cost)
                x0[sl] = x0[sl][cols]
                start += len(block)
        return {
            "x1": torch.from_numpy(x1),
            "source": torch.from_numpy(x0),
            "pert_idx": torch.from_numpy(self.pert_idx[cond]),
            "pert_scale": torch.from_numpy(self.pert_scale[cond]),
            "cov_idx": torch.from_numpy(cov_idx),
        }


class CellDataModule(L.LightningDataModule):
    """Lightning wrapper of a training :class:`PairedBatches` (batches are built in the main process)."""

    def __init__(self, train: PairedBatches):
        super().__init__()
        self.train_set = train

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=None)
