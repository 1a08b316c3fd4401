"""Couplings: how a source x0 (t = 0) is paired with each data point x1 (t = 1).

* Noise coupling: x0 ~ N(0, I) (:func:`noise_like`), or a Gaussian with a given mean and a
  low-rank-plus-diagonal covariance (:func:`gaussian_source`): for cells, each condition's
  mean control cell plus its anchor, with the control cells' covariance.
* Anchored control coupling: x0 is a control cell moved by its condition's anchor, the
  mean-shift estimate of the effect (:func:`anchored_source`), so that a network that
  predicts zero velocity already predicts the mean shift. Training batches and sampling
  build their sources with the same function.
* Minibatch optimal transport re-pairs a batch of sources with a batch of targets so that
  paired points are close, which straightens the flow (Tong et al. 2023, Pooladian et al.
  2023): :func:`ot_pairing` for one batch, :func:`ot_pair_blocks` for a batch made of
  independent blocks (one condition each), optionally with the cost measured in a basis.

Plain arrays and tensors only: no AnnData here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def noise_like(x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gaussian source with the shape, device and dtype of ``x1``."""
    return torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)


def gaussian_source(mean, factor, sd, eps_low, eps):
    """``mean + eps_low @ factor^T + eps * sd``: a Gaussian source with covariance
    ``factor factor^T + diag(sd^2)`` from standard normal draws (arrays or tensors alike).

    Parameters
    ----------
    mean
        (B, G) means.
    factor, sd
        (G, k) low-rank factor and (G,) per-gene standard deviation of the rest.
    eps_low, eps
        (B, k) and (B, G) standard normal draws.
    """
    return mean + eps_low @ factor.T + eps * sd


def anchored_source(x_control, anchor):
    """Source of the anchored control coupling: ``x_control + anchor``.

    Parameters
    ----------
    x_control
        (B, G) control cells (array or tensor).
    anchor
        (B, G) or (G,) anchors: the mean-shift estimate of each cell's condition.
    """
    return x_control + anchor


def ot_permutation(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Indices ``cols`` such that ``(x0[cols], x1)`` solves the exact OT problem with squared
    Euclidean cost between two equal-size point sets (uniform weights: the optimal plan is
    a permutation, found by the Hungarian algorithm).

    Parameters
    ----------
    x0, x1
        (B, d) sources and targets.
    """
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"OT pairing needs equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}")
    cost = ((x1[:, None, :] - x0[None, :, :]) ** 2).sum(-1)  # (B, B)
    _, cols = linear_sum_assignment(cost)
    return cols


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Permutation ``perm`` of the sources so that ``(x0[perm], x1)`` is an exact minibatch
    OT pairing (see :func:`ot_permutation`).

    Parameters
    ----------
    x0, x1
        (B, ...) sources and targets.

    Returns
    -------
    (B,) long tensor of source indices, one per target.
    """
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"OT pairing needs equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}")
    a = x0.detach().flatten(1).float().cpu().numpy()
    b = x1.detach().flatten(1).float().cpu().numpy()
    return torch.as_tensor(ot_permutation(a, b), dtype=torch.long, device=x0.device)


def ot_pair_blocks(x0: np.ndarray, x1: np.ndarray, sizes: Sequence[int],
                   basis: np.ndarray | None = None) -> np.ndarray:
    """Re-pair the sources of a batch made of consecutive blocks, each block on its own.

    Parameters
    ----------
    x0, x1
        (B, G) sources and targets; block ``i`` holds the next ``sizes[i]`` rows of both.
    sizes
        Block sizes (summing to B).
    basis
        Optional (G, k) basis: the cost is measured on ``x @ basis`` (e.g. leading principal
        components, where cells differ in structure rather than per-gene noise).

    Returns
    -------
    The re-ordered sources (B, G): row ``j`` of a block is paired with target ``j``.
    """
    p1, p0 = (x1, x0) if basis is None else (x1 @ basis, x0 @ basis)
    perm = np.arange(len(x0))
    start = 0
    for size in sizes:
        if size > 1:  # a single pair is its own optimal plan
            sl = slice(start, start + size)
            perm[sl] = start + ot_permutation(p0[sl], p1[sl])
        start += size
    return x0[perm]  # one gather of the whole batch
