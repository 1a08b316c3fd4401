"""Anchors of perturbations never trained, borrowed from trained ones alike in prior features.

An unseen perturbation ``u`` with prior features ``f_u`` gets the kernel-weighted mean of
the trained single perturbations' anchors,

    a_u = lam * sum_j w_j a_j,   w_j = exp(-|f_u - f_j|^2 / h) / sum_k exp(-|f_u - f_k|^2 / h),

where the bandwidth ``h`` and the scale ``lam`` in [0, 1] are chosen by leave-one-out on
the trained perturbations themselves: each trained anchor is predicted from the others, and
(h, lam) minimise the squared error (the widest kernel within 1% of the least error wins).
Features that predict the effects keep ``lam`` near 1 and a narrow kernel; features that do
not leave the uniform kernel, the mean effect of the trained perturbations (what the
``train_mean`` baseline moves by). When only some trained perturbations have features and
the uniform kernel wins, the unseen one gets the unscaled mean of *all* trained anchors:
each is shrunk already by its own evidence (:mod:`celldit.cells.shrinkage`), and a second
shrinking cost E-distance and mse over every Papalexi knockout held out in turn
(``benchmarks/borrowing_scale.py``). Without the leave-one-out check a median-heuristic
kernel lends a weak knockout the full effect of a strong neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# bandwidths tried, as multiples of the median squared distance between trained features
BANDWIDTH_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, np.inf)


def _loo_fit(anchors: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(squared error, scale) of the scale in [0, 1] that best fits ``anchors`` by ``scale * pred``."""
    denom = float((pred ** 2).sum())
    lam = float(np.clip((pred * anchors).sum() / denom, 0.0, 1.0)) if denom > 0 else 0.0
    return float(((anchors - lam * pred) ** 2).sum()), lam


def _kernel(d2: np.ndarray, h: float) -> np.ndarray:
    """Row-normalised kernel weights of squared distances ``d2`` (..., n); ``h = inf``: uniform."""
    if np.isinf(h):
        w = np.where(np.isfinite(d2), 1.0, 0.0)
    else:
        w = np.exp(-(d2 - np.min(d2, axis=-1, keepdims=True)) / h)
    return w / w.sum(-1, keepdims=True)


@dataclass
class PriorBorrowing:
    """The leave-one-out fit of the borrowing kernel over the trained perturbations.

    Parameters
    ----------
    features
        (n, F) prior features of the trained single perturbations (rows of those without
        prior features are ignored).
    has_prior
        (n,) which of them have prior features.
    anchors
        (n, G) their anchors.
    gates
        (n,) their shrinkage gates (1 without shrinkage).

    Kernels of every bandwidth over the perturbations with prior features are fitted, each
    with its leave-one-out scale. When the uniform kernel wins (the features tell effects
    apart no better than chance), the perturbations with features are just a sample: the
    unseen one gets the mean of *all* trained perturbations (what the ``train_mean``
    baseline moves by), unscaled: the anchors are shrunk already.
    """

    features: np.ndarray
    has_prior: np.ndarray
    anchors: np.ndarray
    gates: np.ndarray

    def __post_init__(self) -> None:
        self.has_prior = np.asarray(self.has_prior, bool)
        self.features = np.asarray(self.features, np.float64)[self.has_prior]
        self.all_anchors = np.asarray(self.anchors, np.float64)
        self.all_gates = np.asarray(self.gates, np.float64)
        self.anchors, self.gates = self.all_anchors[self.has_prior], self.all_gates[self.has_prior]
        n = len(self.features)
        d2 = ((self.features[:, None] - self.features[None]) ** 2).sum(-1)
        pair = d2[np.triu_indices(n, 1)]
        median = float(np.median(pair)) if pair.size and np.median(pair) > 0 else 1.0
        self.bandwidth, self.scale, self.loo_error, self.use_all = median, 1.0, None, False
        if n < 3:  # too few to check the features: one neighbour, or two that predict each other
            return
        np.fill_diagonal(d2, np.inf)  # leave each one out of its own prediction
        fits = []
        for factor in BANDWIDTH_FACTORS:
            pred = _kernel(d2, median * factor) @ self.anchors  # (n, G) each anchor from the others
            fits.append((*_loo_fit(self.anchors, pred), median * factor))
        # the widest kernel within 1% of the best error: a narrow one must clearly earn its place
        least = min(f[0] for f in fits)
        self.loo_error, self.scale, self.bandwidth = [f for f in fits if f[0] <= least * 1.01][-1]
        count = len(self.all_anchors)
        if np.isinf(self.bandwidth) and count > n:
            # the features tell the perturbations apart no better than chance: those with features
            # are then just a sample, and the mean effect of all trained ones the better estimate
            # (unscaled: see the module notes)
            pred = (self.all_anchors.sum(0) - self.all_anchors) / (count - 1)
            self.loo_error = float(((self.all_anchors - pred) ** 2).sum())
            self.scale, self.use_all = 1.0, True

    def weights(self, feature: np.ndarray) -> np.ndarray:
        """(n,) weights of all the trained perturbations for an unseen one; they sum to ``scale``."""
        w = np.zeros(len(self.has_prior))
        if self.use_all:
            w[:] = self.scale / len(w)
        else:
            d2 = ((self.features - np.asarray(feature, np.float64)) ** 2).sum(1)
            w[self.has_prior] = self.scale * _kernel(d2, self.bandwidth)
        return w

    def gate(self, feature: np.ndarray) -> float:
        """Velocity gate of an unseen perturbation: its neighbours' gates, weighted as its
        anchor (so a borrowed effect is trusted as much as what it borrows from)."""
        return float(self.weights(feature) @ self.all_gates)
