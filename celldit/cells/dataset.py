"""Training data of a CellDiT: cells relative to their batch, and (source, target, condition) batches.

:class:`CenteredRows` puts each cell relative to the control mean of its batch (e.g. its
replicate). :class:`PairedBatches` draws batches of (source control cell, target cell,
condition): each batch is made of blocks, a block holding target cells of one condition in
one pairing group (same covariates, and e.g. the same replicate) and as many control cells
of that group, moved by the condition's anchor and optionally re-paired by exact minibatch
optimal transport (both from :mod:`celldit.flow.coupling`). :class:`CellDataModule` hands
them to Lightning. Expression rows themselves come from
:class:`~celldit.data.rows.ExpressionRows`.
"""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.rows import ExpressionRows
from ..flow.coupling import gaussian_source, ot_pair_blocks


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
        self.library_sizes, self.cache, self.backed = expr.library_sizes, expr.cache, expr.backed

    @property
    def n_vars(self) -> int:
        return self.expr.n_vars

    def rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        x = self.expr.rows(idx)  # a fresh array: centred in place
        x -= self.centers[self.batch[idx]]
        return x

    all_rows = ExpressionRows.all_rows


class PairedBatches(IterableDataset):
    """Batches of (source control cell, target cell, condition) for flow matching.

    Batch ``i`` of an epoch is drawn from its own random stream, seeded by ``(seed, epoch,
    rank, i)``: the same batches whatever the number of DataLoader workers (worker ``w`` of
    ``W`` builds the batches ``i = w mod W``; from a disk buffer, the runs of batches of the
    buffers ``b = w mod W``, so that no two workers read the same buffer), distinct batches
    on every DDP rank, and a resumed run continues at its step without replaying the draws.

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
        Seed of the draws.
    fixed
        Draw the same batches every epoch, with times ``t`` on a fixed grid (validation).
    covariate_dropout, unknown_cov, cov_group, held_out_anchor
        Hide the covariates of a block with probability ``covariate_dropout``: its cells
        get the ``unknown_cov`` codes (C,) and, where ``held_out_anchor(cond, group)``
        (``group`` from the (n_cells,) covariate-group codes ``cov_group``) gives one, the
        anchor a covariate group never trained with the condition would get. Training then
        poses the question asked of a held-out cell type.
    group_anchors
        Optional ``{(cond, group): (G,)}``: a block of that condition in that pairing group
        starts from this anchor (its own batch's shift) instead of ``anchors[cond]``.
    escapers
        Optional (n_conditions,) shares of escapers: each target's source gets its anchor times
        0 with that probability, else times ``1 / (1 - share)`` (see :mod:`celldit.cells.escapers`).
    buffer_cells
        Data on disk (backed): draw each run of ``buffer_steps`` batches from a buffer of
        this many cells, read as contiguous chunks of ``chunk_rows`` rows (chunk-shuffled
        buffers, as annbatch does) instead of row by row. None: draw from every cell.
    chunk_rows
        Rows of a contiguous chunk of the buffer.
    prior_means, noise_prior
        Noise source: (n_covariate_groups, G) mean control cell of each covariate group, and
        ``(factor (G, k), sd (G,))`` of the control cells' covariance. A target's source is then
        drawn from the Gaussian of mean (its group's mean control cell + its block's anchor) and
        that covariance (:func:`~celldit.flow.coupling.gaussian_source`), and re-paired by OT
        within the block like control sources.
    """

    def __init__(self, expr: ExpressionRows | CenteredRows, cond_id: np.ndarray, group_id: np.ndarray, cells: np.ndarray,
                 control_cond: int, pert_idx: np.ndarray, pert_scale: np.ndarray, cov_idx: np.ndarray,
                 anchors: np.ndarray | None = None, include_control: bool = False, batch_size: int = 256,
                 block_size: int = 64, ot: bool = True, steps: int = 100, seed: int = 0,
                 ot_basis: np.ndarray | None = None, covariate_dropout: float = 0.0,
                 unknown_cov: np.ndarray | None = None, cov_group: np.ndarray | None = None,
                 held_out_anchor=None, fixed: bool = False, buffer_cells: int | None = None,
                 chunk_rows: int = 2048, prior_means: np.ndarray | None = None,
                 noise_prior: tuple[np.ndarray, np.ndarray] | None = None,
                 group_anchors: dict[tuple[int, int], np.ndarray] | None = None,
                 escapers: np.ndarray | None = None):
        super().__init__()
        self.expr, self.cov_idx = expr, cov_idx
        self.cond_id, self.group_id, self.control_cond = np.asarray(cond_id), np.asarray(group_id), control_cond
        self.include_control = include_control
        self.pert_idx, self.pert_scale, self.anchors = pert_idx, pert_scale, anchors
        self.ot_basis = None if ot_basis is None else np.asarray(ot_basis, dtype=np.float32)
        self.batch_size, self.block_size, self.ot, self.steps, self.seed = batch_size, block_size, ot, steps, seed
        self.epoch, self.fixed, self.rank = 0, fixed, 0
        self.start_step = 0  # batches of the epoch already trained (set when resuming)
        self.cells = np.sort(np.asarray(cells, dtype=np.int64))
        self.covariate_dropout = covariate_dropout if unknown_cov is not None and cov_idx.shape[1] else 0.0
        self.unknown_cov = unknown_cov
        self.cov_group, self.held_out_anchor_fn, self.group_anchors = cov_group, held_out_anchor, group_anchors or {}
        self.prior_means, self.noise_prior = prior_means, noise_prior
        # no draws without escapers: the batches are then those of a model without them
        self.escapers = None if escapers is None or not np.any(np.asarray(escapers) > 0) else np.asarray(escapers)
        self._set_strata(self.cells, warn=True)
        backed = getattr(expr, "backed", False)
        self.buffer_cells = buffer_cells if buffer_cells and backed and buffer_cells < len(self.cells) else None
        if buffer_cells and backed and self.buffer_cells is None:
            expr.cache(self.cells)  # every training cell fits in the buffer: read them once, in order
        self.chunk_rows = chunk_rows
        self.buffer_steps = max(1, 4 * (self.buffer_cells or 0) // batch_size)
        self._buffer_id: int | None = None

    # ------------------------------------------------------------------ strata
    def _set_strata(self, cells: np.ndarray, warn: bool = False) -> None:
        """Blocks are drawn from the strata (condition, pairing group) of ``cells``."""
        cond, group = self.cond_id[cells], self.group_id[cells]
        is_ctrl = cond == self.control_cond
        order = np.argsort(group[is_ctrl], kind="stable")
        ctrl_cells, ctrl_groups = cells[is_ctrl][order], group[is_ctrl][order]
        bounds = np.flatnonzero(np.diff(ctrl_groups)) + 1
        self.controls = {int(g[0]): c for g, c in zip(np.split(ctrl_groups, bounds), np.split(ctrl_cells, bounds))
                         if len(c)}
        targets = np.ones(len(cells), bool) if self.include_control else ~is_ctrl
        key = cond[targets].astype(np.int64) * (int(self.group_id.max()) + 1) + group[targets]
        order = np.argsort(key, kind="stable")
        t_cells, t_key = cells[targets][order], key[order]
        bounds = np.flatnonzero(np.diff(t_key)) + 1
        strata = [((int(self.cond_id[c[0]]), int(self.group_id[c[0]])), c)
                  for c in np.split(t_cells, bounds) if len(c)]
        orphan = [(k, c) for k, c in strata if k[1] not in self.controls]
        if orphan and warn:
            warnings.warn(f"{sum(len(c) for _, c in orphan)} target cells have no control cell "
                          "in their pairing group (same covariates / pairing keys) and are skipped", UserWarning,
                          stacklevel=3)
        self.strata = [(k, c) for k, c in strata if k[1] in self.controls]
        if not self.strata:
            if warn and not (~is_ctrl).any():
                raise ValueError("there are no perturbed cells to train on: every training cell is a control cell")
            raise ValueError("no training pairs: no target cell shares a pairing group with control cells")
        sizes = np.array([len(v) for _, v in self.strata], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self._cdf = np.cumsum(self.weights)  # strata drawn by one search per batch
        self.hidden_anchor: dict[int, np.ndarray] = {}  # stratum -> anchor with its covariates hidden
        if self.covariate_dropout and self.anchors is not None and self.held_out_anchor_fn is not None:
            for i, ((cond_i, _), members) in enumerate(self.strata):
                a = self.held_out_anchor_fn(cond_i, int(self.cov_group[members[0]]))
                if a is not None:
                    self.hidden_anchor[i] = a
        self.own_anchor: dict[int, np.ndarray] = {}  # stratum -> its batch's own anchor
        if self.anchors is not None:
            for i, (key, _) in enumerate(self.strata):
                if key in self.group_anchors:
                    self.own_anchor[i] = np.asarray(self.group_anchors[key], dtype=np.float32)

    def _use_buffer(self, step: int, worker: int) -> None:
        """Load the buffer of the run of batches ``step`` belongs to (contiguous chunks of cells)."""
        buffer_id = step // self.buffer_steps
        if buffer_id == self._buffer_id:
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1_000_003, buffer_id])
        n_chunks = -(-len(self.cells) // self.chunk_rows)
        take = rng.permutation(n_chunks)[: max(1, self.buffer_cells // self.chunk_rows)]
        cells = np.concatenate([self.cells[c * self.chunk_rows:(c + 1) * self.chunk_rows] for c in np.sort(take)])
        self.expr.cache(cells)
        self._set_strata(cells)
        self._buffer_id = buffer_id

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        self.epoch += 0 if self.fixed else 1
        for i in range(self.start_step, self.steps):
            # round robin over workers; from a disk buffer, whole runs of a buffer's batches, so
            # that each worker reads its own buffers (not every worker every buffer)
            if (i // self.buffer_steps if self.buffer_cells else i) % n_workers != worker:
                continue
            if self.buffer_cells:
                self._use_buffer(i, worker)
            yield self.load(self.draw(np.random.default_rng([self.seed, epoch, self.rank, i])))
        self.start_step = 0

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One batch: ``x1`` targets, ``source`` (control cells, plus anchor), conditioning."""
        return self.load(self.draw(rng))

    def draw(self, rng: np.random.Generator) -> tuple[list, list, list, list, list, list]:
        """The random part of a batch: per block, target and source cell indices, condition
        whether its covariates are hidden (its stratum, else -1), its stratum, and its sources'
        anchor multipliers (None without escapers)."""
        tgt, src, conds, hidden, blocks = [], [], [], [], []
        n = 0
        picks = iter(())
        while n < self.batch_size:
            stratum = next(picks, None)
            if stratum is None:  # strata in proportion to their cells, drawn a batch's worth at a time
                u = rng.random(-(-self.batch_size // self.block_size) + 1) * self._cdf[-1]
                picks = iter(np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.strata) - 1).tolist())
                stratum = next(picks)
            (cond, group), members = self.strata[stratum]
            b = min(self.block_size, self.batch_size - n, len(members))
            t_idx = rng.choice(members, b, replace=False)
            pool = self.controls[group]
            s_idx = rng.choice(pool, b, replace=len(pool) < b)
            tgt.append(t_idx), src.append(s_idx), conds.append(np.full(b, cond))
            hidden.append(stratum if self.covariate_dropout and rng.random() < self.covariate_dropout else -1)
            blocks.append(stratum)
            n += b
        scales = [None] * len(tgt)
        if self.escapers is not None:  # escapers keep the control state, the others move 1 / (1 - p)
            p = [float(self.escapers[c[0]]) if self.anchors is not None else 0.0 for c in conds]
            scales = [np.where(rng.random(len(c)) < q, 0.0, 1.0 / (1.0 - q)).astype(np.float32) if q > 0 else None
                      for c, q in zip(conds, p)]
        if self.noise_prior is not None:  # the noise source's draws, from the batch's own stream
            k = self.noise_prior[0].shape[1]
            src = [(rng.standard_normal((n, k), dtype=np.float32), rng.standard_normal((n, self.expr.n_vars),
                                                                                         dtype=np.float32))]
        return tgt, src, conds, hidden, blocks, scales

    def load(self, drawn: tuple[list, list, list, list, list, list]) -> dict[str, torch.Tensor]:
        """Read the drawn cells and build the batch (anchored sources, OT re-pairing)."""
        tgt, src, conds, hidden, blocks, scales = drawn
        t_idx, cond = np.concatenate(tgt), np.concatenate(conds)
        x1 = self.expr.rows(t_idx)
        x0 = None if self.noise_prior is not None else self.expr.rows(np.concatenate(src))
        cov_idx = self.cov_idx[t_idx]  # fancy indexing: a copy, changed below
        # each block's anchor: the condition's, its own batch's, or the one of a hidden covariate group
        block_anchors, start = [], 0
        for block, stratum, own, scale in zip(tgt, hidden, blocks, scales):
            sl = slice(start, start + len(block))
            start += len(block)
            a = None if self.anchors is None else self.own_anchor.get(own, self.anchors[cond[sl.start]])
            if stratum >= 0:
                cov_idx[sl] = self.unknown_cov
                a = self.hidden_anchor.get(stratum, a)  # a group never trained with the condition
            if a is not None and scale is not None:
                a = scale[:, None] * a[None]  # (b, G): escapers at 0
            block_anchors.append((sl, a))
        if self.noise_prior is not None:
            anchor = np.zeros_like(x1)
            for sl, a in block_anchors:
                if a is not None:
                    anchor[sl] = a
            (eps_low, eps), = src
            x0 = gaussian_source(self.prior_means[self.cov_group[t_idx]] + anchor, *self.noise_prior, eps_low, eps)
            x0 = x0.astype(np.float32)
        else:  # anchored sources (anchored_source), added block by block in place
            for sl, a in block_anchors:
                if a is not None:
                    x0[sl] += a
        if self.ot:
            x0 = ot_pair_blocks(x0, x1, [len(block) for block in tgt], self.ot_basis)
        batch = _as_tensors({"x1": x1, "source": x0, "pert_idx": self.pert_idx[cond],
                             "pert_scale": self.pert_scale[cond], "cov_idx": cov_idx})
        if self.fixed:  # times on a grid, so that the score moves only with the model
            n = len(x1)
            batch["t"] = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        return batch


def _as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The batch's arrays as tensors. In a DataLoader worker they are written into one block
    of shared memory, each a contiguous view of it: handing the batch to the main process
    then shares one block instead of one per tensor (each a new shared-memory file and a
    file descriptor passed over an authenticated socket), which at 256 cells per batch cost
    about as much as building the batch.
    """
    if get_worker_info() is None:
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
    offsets, nbytes = {}, 0
    for k, a in sorted(arrays.items(), key=lambda kv: -kv[1].dtype.itemsize):  # widest first: aligned views
        nbytes = -(-nbytes // a.dtype.itemsize) * a.dtype.itemsize
        offsets[k], nbytes = nbytes, nbytes + a.nbytes
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    out = {}
    for k, a in arrays.items():
        dtype = torch.from_numpy(a[:0]).dtype
        view = torch.empty(0, dtype=dtype).set_(storage, offsets[k] // a.dtype.itemsize, a.shape)
        view.numpy()[...] = a
        out[k] = view
    return out


def _share_by_name(worker_id: int) -> None:
    """Worker init: hand batches to the main process as named shared memory.

    The default strategy passes a file descriptor per block over an authenticated socket,
    served by a thread that takes the worker's GIL from the thread building batches; names
    cost neither. Set in the worker only, so the main process's own setting is untouched.
    """
    torch.multiprocessing.set_sharing_strategy("file_system")


def batch_loader(batches: PairedBatches, num_workers: int = 0) -> DataLoader:
    """The DataLoader of training batches (already batched; ``num_workers`` build them)."""
    return DataLoader(batches, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None,
                      worker_init_fn=_share_by_name if num_workers else None)


class CellDataModule(L.LightningDataModule):
    """Lightning wrapper of a training :class:`PairedBatches`.

    When Lightning resumes from a checkpoint, the global step is restored before the
    dataloader is built; the batches then continue the same stream where it stopped. Under
    DDP each rank draws its own batches; ``num_workers`` DataLoader workers build them in
    parallel (the same batches as without workers).
    """

    def __init__(self, train: PairedBatches, validation: PairedBatches | None = None, num_workers: int = 0):
        super().__init__()
        self.train_set, self.val_set, self.num_workers = train, validation, num_workers

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None:
            self.train_set.start_step = int(trainer.global_step) * int(trainer.accumulate_grad_batches)
            self.train_set.rank = int(trainer.global_rank)  # each DDP rank draws its own batches
        return batch_loader(self.train_set, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else DataLoader(self.val_set, batch_size=None)
