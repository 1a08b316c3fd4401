"""Couplings: how a source x0 (t = 0) is paired with each data point x1 (t = 1).

Noise coupling draws x0 ~ N(0, I). Minibatch optimal-transport coupling re-pairs a batch
of sources with a batch of targets so paired points are close, which straightens the flow
(Tong et al. 2023, Pooladian et al. 2023).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def noise_like(x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gaussian source with the shape, device and dtype of ``x1``."""
    return torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Permutation ``perm`` of the sources so that ``(x0[perm], x1)`` solves the exact
    minibatch OT problem with squared Euclidean cost (equal batch sizes, uniform weights,
    where the optimal plan is a permutation: solved with the Hungarian algorithm).

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
    cost = torch.cdist(x1.flatten(1).float(), x0.flatten(1).float()).pow(2)
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    perm = torch.empty(x1.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(x0.device)
