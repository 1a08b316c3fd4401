"""The cells :meth:`CellDiT.generate <celldit.cells.model.CellDiT.generate>` starts from.

A control-source model starts from cells of the bank of training controls saved with it,
drawn within the asked covariate group; a noise-source model starts from draws of its noise
prior around that group's mean control cell.

Bank cells are drawn without repeats while the group has cells left (a generated sample made
of repeated cells is narrower than the population: on Papalexi, real controls plus the mean
shift scored 0.01-0.03 worse in E-distance when drawn with repeats than each once). When ``generate`` is
given control cells of the batch to generate in, the bank's batches are weighted by how alike
their mean control cell is to those cells' mean (the kernel of the batch anchors, see
:class:`~celldit.cells.anchors.ConditionTable`), so that a new replicate starts mostly from the
training replicates it resembles.

For a centred model (cells relative to their batch's mean control cell) the drawn cells are
then moved together so that their mean is exactly the batch's, as the real controls of a
counterfactual are: a control variate that removes the sampling noise of the sources' mean
(which, with the same seed for every label, would move every label's mean alike). On Papalexi
rep_3 it lifted the pd_de20 of ``generate`` from 0.31 to 0.43 and lowered its E-distance by
0.006-0.021 (two seeds; ``docs/measured/papalexi_rep3.md``). With ``n = 1`` the one drawn cell is kept as it is. A noise source's
prior draws are centred the same way on the prior's mean, block by block (``generate`` draws
``batch_size`` cells at a time), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .anchors import likeness_weights, median_bandwidth

__all__ = ["StartCells", "batch_weights"]


def batch_weights(means: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(B,) weights of batches whose mean control cells are ``means`` (B, G) for cells of mean
    ``target`` (G,): the batch anchors' kernel (:func:`~celldit.cells.anchors.likeness_weights`
    at the median heuristic's bandwidth; all alike when there is one batch)."""
    return likeness_weights(((means - target[None]) ** 2).sum(1), median_bandwidth(list(means)))


class StartCells:
    """Source cells of one covariate group for ``n`` generated cells, drawn ``m`` at a time.

    Parameters
    ----------
    model
        A fitted :class:`~celldit.cells.model.CellDiT`.
    cond
        The asked condition, with a value for each registered covariate key.
    n
        Cells to generate in all (bank cells are drawn without repeats up to the group's size).
    seed
        Seed of the draws (and of the noise, for a noise source).
    batch_mean
        Mean control cell (G,) of the batch generated in (``generate(controls=...)``), which
        weights the bank's batches by likeness; None draws the group's bank cells alike.

    Raises
    ------
    ValueError
        When the model has no training control cells of that group to start from.
    """

    def __init__(self, model: Any, cond: Mapping[str, Any], n: int, seed: int = 0,
                 batch_mean: np.ndarray | None = None):
        self.model, self.n = model, n
        self.generator = torch.Generator().manual_seed(seed)
        keys = model.spec.covariate_keys
        where = ", ".join(f"{k}={cond[k]!r}" for k in keys)
        self.pool = np.arange(len(model.bank_obs))
        self.prior_mean: torch.Tensor | None = None
        if model.config.source == "control":
            match = np.ones(len(model.bank_obs), dtype=bool)
            for k in keys:
                match &= model.bank_obs[k].astype(str).to_numpy() == str(cond[k])
            if not match.any():
                raise ValueError(f"no training control cells with {where} to start from; use counterfactual() "
                                 "with control cells of that group")
            self.pool = np.flatnonzero(match)
            self.order = self._bank_order(n, seed, batch_mean)
            self.taken = 0
            self.centre = torch.zeros(len(model.genes))
            if model.config.centred and n >= 2:  # the drawn cells' mean is the batch's (module notes)
                counts = np.bincount(self.order, minlength=len(model.bank_obs)).astype(np.float32)
                self.centre = torch.from_numpy(counts / n) @ model.bank_x
            return
        group = "\x1f".join(str(cond[k]) for k in keys)
        groups = model.covariate_groups or [""]
        if group not in groups:
            raise ValueError(f"no training control cells with {where}: the noise prior has no mean for that "
                             "group; use counterfactual() with control cells of it")
        self.prior_mean = (torch.from_numpy(model.prior_means()[groups.index(group)]) if model.noise_rank
                           else torch.zeros(len(model.genes)))

    def _bank_order(self, n: int, seed: int, batch_mean: np.ndarray | None) -> np.ndarray:
        """(n,) bank rows: distinct while the pool lasts (then it is drawn again), each batch's
        cells weighted by its likeness to ``batch_mean``."""
        rng = np.random.default_rng(seed)
        p = np.full(len(self.pool), 1.0 / len(self.pool))
        batch, batches = self.model.bank_batch, self.model.control_batches
        if batch_mean is not None and batch is not None and batches is not None:
            rows = batch[self.pool]
            present = np.unique(rows)
            w = dict(zip(present, batch_weights(batches[0][present].astype(np.float64), np.asarray(batch_mean))))
            counts = dict(zip(*np.unique(rows, return_counts=True)))
            p = np.array([w[r] / counts[r] for r in rows])
            p /= p.sum()
        order = []
        while len(order) < n:
            take = min(n - len(order), int((p > 0).sum()))
            order.extend(rng.choice(self.pool, size=take, replace=False, p=p))
        return np.asarray(order, dtype=np.int64)

    def draw(self, m: int, need_library: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        """The next ``m`` source cells (m, G) and the bank rows they take their library sizes from
        (the bank cells themselves; for noise draws, random bank cells when ``need_library``,
        else None)."""
        gen = self.generator
        if self.prior_mean is not None:
            noise = self.model.network.source_noise((m, len(self.model.genes)), generator=gen).cpu()
            if self.n >= 2 and m >= 2:  # the draws' mean is the prior's, block by block (module notes)
                noise = noise - noise.mean(0)
            x0 = self.prior_mean + noise
            pick = self.pool[torch.randint(len(self.pool), (m,), generator=gen).numpy()] if need_library else None
            return x0, pick
        pick = self.order[self.taken: self.taken + m]
        self.taken += m
        return self.model.bank_x[pick] - self.centre, pick
