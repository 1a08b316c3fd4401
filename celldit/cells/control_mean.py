"""A batch's mean control cell, pooled with the training batches' (``control_mean="pooled"``).

A counterfactual moves each control cell of a batch by the effect of P, so the predicted
population's mean is ``mean(controls) + effect``. The controls' mean is a sample mean: it
carries their sampling noise, and a real sample of the batch's cells under P would not
share that noise. So the *measured* change of real P cells against the same controls,
``mean(T) - mean(C)``, holds ``-(noise of mean(C))`` on top of the effect, in every P alike
(on Papalexi rep_3, 666 controls over 299 sparse genes: a squared norm of about 0.87, half
the squared distance between the rep_2 and rep_3 control means, 1.79).

With ``control_mean="pooled"`` the batch's population mean is estimated from its own
controls *and* the training batches' mean controls, as a random-effects meta-analysis would
(the method of moments, one variance ratio per reference):

* the batch's own mean ``m`` of ``n`` cells has per-gene variance ``s_g^2 / n``;
* a training batch ``k`` of mean ``r_k`` differs from the batch's population by its own
  sampling noise plus a batch effect, together of variance ``c_k s_g^2``, where
  ``c_k = sum_g (m - r_k)_g^2 / sum_g s_g^2 - 1 / n``, at least ``1 / n_k`` (its own noise);
* the pooled mean is ``(n m + sum_k r_k / c_k) / (n + sum_k 1 / c_k)``.

A far batch (another cell type, a replicate with a strong batch effect) has a large ``c_k``
and adds almost nothing; a batch alike at baseline takes a share set by the two sample
sizes (rep_3: itself 0.50, rep_2 0.47, rep_1 0.03). Cells seen in training (a held-out
cell type's own controls) find their own mean among the references and keep about it.

Each predicted cell then moves by ``pooling * (pooled - m)``, one vector per batch
(``pooling`` in [0, 1]: 1 the whole estimate, smaller a move that stays nearer the batch's own
mean, for the price of less of the correction): the cells' spread and
their own deviations are kept, and the prediction becomes the expected *measured* population
under P, the one a real experiment against these controls would see. It does not change the
estimate of P's effect; keep ``"observed"`` (the default) for a cell's own counterfactual,
and for one cell (a single cell has no variance to weigh it by: refused). On Papalexi rep_3
it raised pd_de20 from 0.43 to 0.62 (mean shift alike: 0.42 to 0.55) and left E-distance
where it was, but moved some weak knockouts away from no change (``docs/cells.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["CONTROL_MEANS", "DEFAULT_POOLING", "batch_labels", "check_control_mean", "pooled_control_mean", "pooled_shift"]

#: how the mean control cell of an input batch is taken (see the module notes)
CONTROL_MEANS = ("observed", "pooled")
#: the fraction of the pooled correction applied by default: the largest that kept every
#: perturbation without a clear effect within 0.01 of no change on a validation replicate
#: (Papalexi rep_2 held out, two seeds: 0.5 and 0.75; ``benchmarks/pooling_fraction.py``)
DEFAULT_POOLING = 0.5


def batch_labels(obs: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """(n,) batch of each cell: its values of those of ``keys`` that ``obs`` has, joined by "/"
    (one batch when it has none of them)."""
    keys = [k for k in keys if k in obs.columns]
    return obs[keys].astype(str).agg("/".join, axis=1).to_numpy() if keys else np.zeros(len(obs), dtype=object)


def check_control_mean(how: str, pooling: float = DEFAULT_POOLING) -> None:
    """Raise on an unknown ``control_mean`` value or a ``pooling`` fraction outside [0, 1]."""
    if how not in CONTROL_MEANS:
        raise ValueError(f"control_mean={how!r}: expected one of {CONTROL_MEANS}")
    if isinstance(pooling, bool) or not isinstance(pooling, (int, float, np.floating)) or not 0.0 <= pooling <= 1.0:
        raise ValueError(f"pooling={pooling!r}: expected a fraction in [0, 1] (1: the whole pooled estimate)")


def pooled_control_mean(x: np.ndarray, references: np.ndarray, sizes: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The batch's mean control cell pooled with the training batches' (module notes).

    Parameters
    ----------
    x
        (n, G) the batch's control cells in the model's space (uncentred), n >= 2.
    references
        (k, G) the training batches' mean control cells, in the same space.
    sizes
        (k,) their numbers of control cells.

    Returns
    -------
    ``(pooled (G,), weights (1 + k,))``: the estimate, and the shares of the batch itself
    (first) and of each training batch in it (they sum to 1).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        raise ValueError("control_mean='pooled' needs at least 2 control cells per batch (their spread weighs "
                         "the batch's own mean against the training batches'); use control_mean='observed'")
    own, spread = x.mean(0), float(x.var(0, ddof=1).sum())
    references, sizes = np.asarray(references, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    if not len(references) or spread <= 0:  # nothing to pool with, or constant cells: the own mean is exact
        return own, np.r_[1.0, np.zeros(len(references))]
    distance = ((references - own) ** 2).sum(1)  # (k,)
    ratio = np.maximum(distance / spread - 1.0 / n, 1.0 / np.maximum(sizes, 1.0))
    weights = np.r_[float(n), 1.0 / ratio]
    weights /= weights.sum()
    return weights[0] * own + weights[1:] @ references, weights


def pooled_shift(x: np.ndarray, batch: np.ndarray, references: np.ndarray, sizes: np.ndarray,
                 pooling: float = 1.0) -> np.ndarray:
    """(n, G) float32: for each cell of ``x`` (n, G), ``pooling`` times its batch's pooled mean
    control cell minus the batch's own mean (``batch`` (n,) labels; ``references``, ``sizes`` as
    in :func:`pooled_control_mean`)."""
    shift = np.zeros(np.shape(x), dtype=np.float32)
    for b in np.unique(batch):
        rows = np.flatnonzero(batch == b)
        cells = np.asarray(x[rows], dtype=np.float64)
        mean, _ = pooled_control_mean(cells, references, sizes)
        shift[rows] = (pooling * (mean - cells.mean(0))).astype(np.float32)
    return shift
