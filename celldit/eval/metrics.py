"""Perturbation metrics, each defined once, on plain arrays.

Notation for one condition P: T are the true (real) cells under P, G the predicted cells,
C the real control cells with the same covariates, all in
``log1p(normalize_total(counts, 1e4))`` space; ``mean(.)`` is the per-gene mean over cells.

* ``delta_true = mean(T) - mean(C)``, ``delta_pred = mean(G) - mean(C)``.
* :func:`pearson_delta` - Pearson correlation of ``delta_pred`` and ``delta_true``.
* :func:`top_k_de_genes` - the k genes with the largest ``|delta_true|``.
* :func:`mse`, :func:`mae` - of ``mean(G)`` vs ``mean(T)`` on a gene subset.
* :func:`r2_mean` - squared Pearson of ``mean(G)`` vs ``mean(T)`` (scGen convention).
* :func:`energy_distance`, :func:`mmd_rbf`, :func:`sliced_wasserstein` - between two
  samples of cells (rows), used in a PCA space (see :mod:`celldit.eval.pca`).
* :func:`discrimination_scores` - per condition, the fraction of other conditions whose
  true delta is farther from the predicted delta than the condition's own true delta.

Inputs of the distribution metrics are dense ``(n, d)`` arrays (cells already reduced to
a few principal components); gene-space inputs are 1-D per-gene vectors.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import cdist, pdist
from scipy.stats import wasserstein_distance

__all__ = [
    "pearson",
    "pearson_delta",
    "top_k_de_genes",
    "mse",
    "mae",
    "r2_mean",
    "energy_distance",
    "median_bandwidth",
    "mmd_rbf",
    "sliced_wasserstein",
    "discrimination_scores",
    "mean_expression",
]


#: standard deviation at or below which a vector counts as constant in :func:`pearson`
CONSTANT_TOL = 1e-6


def _vec(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _select(x: np.ndarray, genes) -> np.ndarray:
    return x if genes is None else x[np.asarray(genes)]


def mean_expression(matrix) -> np.ndarray:
    """Per-gene mean over the rows of a dense or scipy sparse matrix (never densified),
    accumulated in float64."""
    if matrix.shape[0] == 0:
        raise ValueError("cannot take the mean of zero cells")
    if sp.issparse(matrix):  # scipy's mean(dtype=) still sums in the input dtype
        return np.asarray(matrix.astype(np.float64).mean(axis=0)).ravel()
    return np.asarray(matrix, dtype=np.float64).mean(axis=0).ravel()


def pearson(x, y) -> float:
    """Pearson correlation ``r = sum (x - x̄)(y - ȳ) / sqrt(sum (x - x̄)^2 · sum (y - ȳ)^2)``.

    Returns NaN when either vector is constant, i.e. its standard deviation is at most
    ``CONSTANT_TOL`` (1e-6; float32 rounding of an unchanged prediction must not yield a
    spurious correlation).
    """
    a, b = _vec(x, "x"), _vec(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"pearson: shapes differ ({a.shape} vs {b.shape})")
    if a.size < 2 or a.std() <= CONSTANT_TOL or b.std() <= CONSTANT_TOL:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0 or not np.isfinite(denom):
        return float("nan")
    return float(np.clip((a * b).sum() / denom, -1.0, 1.0))


def pearson_delta(delta_true, delta_pred, genes=None) -> float:
    """Pearson correlation of ``delta_pred`` and ``delta_true`` over ``genes`` (all if None).

    With ``delta_true = mean(T) - mean(C)`` and ``delta_pred = mean(G) - mean(C)``:
    ``pearson_delta_all`` uses all genes, ``pearson_delta_de20`` the indices from
    :func:`top_k_de_genes` with k = 20. Unitless, in [-1, 1]; NaN if a delta is constant.
    """
    return pearson(_select(_vec(delta_true, "delta_true"), genes),
                   _select(_vec(delta_pred, "delta_pred"), genes))


def top_k_de_genes(delta_true, k: int = 20) -> np.ndarray:
    """Indices of the ``k`` genes with the largest ``|delta_true|``, largest first.

    Ties keep gene order (stable sort). ``k`` larger than the number of genes takes all.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    d = _vec(delta_true, "delta_true")
    return np.argsort(-np.abs(d), kind="stable")[: min(k, d.size)]


def mse(mean_pred, mean_true, genes=None) -> float:
    """Mean squared error ``(1/|S|) sum_{j in S} (mean(G)_j - mean(T)_j)^2`` over genes S.

    ``mse_de20`` takes S = :func:`top_k_de_genes` (k = 20). Unit: (log1p expression)^2.
    """
    a = _select(_vec(mean_pred, "mean_pred"), genes)
    b = _select(_vec(mean_true, "mean_true"), genes)
    return float(np.mean((a - b) ** 2))


def mae(mean_pred, mean_true, genes=None) -> float:
    """Mean absolute error ``(1/|S|) sum_{j in S} |mean(G)_j - mean(T)_j|`` (log1p units)."""
    a = _select(_vec(mean_pred, "mean_pred"), genes)
    b = _select(_vec(mean_true, "mean_true"), genes)
    return float(np.mean(np.abs(a - b)))


def r2_mean(mean_pred, mean_true) -> float:
    """``r2_mean = pearson(mean(G), mean(T))^2`` over all genes (scGen convention).

    This is the squared correlation, not the coefficient of determination
    ``1 - SS_res / SS_tot``; it ignores offsets and scale. In [0, 1].
    """
    r = pearson(mean_pred, mean_true)
    return float(r * r) if np.isfinite(r) else float("nan")


def _cells(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (cells x dims), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def energy_distance(x, y) -> float:
    """Energy distance ``2·E|x - y| - E|x - x'| - E|y - y'|``.

    Each expectation is the mean Euclidean distance over **all** pairs, self-pairs included
    (so ``E|x - x'| = (1/n^2) sum_i sum_i' |x_i - x_i'|``), as pertpy does. Unit: those of
    the input space (here PCA coordinates of log1p expression). It is 0 for identical
    samples and grows with a shift between them.
    """
    a, b = _cells(x, "x"), _cells(y, "y")
    return float(2.0 * cdist(a, b).mean() - cdist(a, a).mean() - cdist(b, b).mean())


def median_bandwidth(x, y) -> float:
    """Median heuristic: median Euclidean distance over distinct pairs ``i < j`` of the
    pooled sample ``x ∪ y`` (self-pairs excluded). Returns 1.0 if that median is 0."""
    z = np.vstack([_cells(x, "x"), _cells(y, "y")])
    if z.shape[0] < 2:
        return 1.0
    med = float(np.median(pdist(z)))
    return med if med > 0 else 1.0


def mmd_rbf(x, y, bandwidth: float | None = None) -> float:
    """Squared maximum mean discrepancy with a Gaussian (RBF) kernel, biased V-statistic.

    ``MMD^2 = mean k(x_i, x_i') + mean k(y_j, y_j') - 2 mean k(x_i, y_j)`` with
    ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))`` and means over all pairs, self-pairs
    included (as in :func:`energy_distance`). ``sigma`` is ``bandwidth`` or, when None,
    :func:`median_bandwidth` of the pooled sample. Unitless, >= 0, 0 for identical samples.
    """
    a, b = _cells(x, "x"), _cells(y, "y")
    sigma = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    gamma = 1.0 / (2.0 * sigma * sigma)

    def k(p, q):
        return np.exp(-gamma * cdist(p, q, "sqeuclidean")).mean()

    return float(max(k(a, a) + k(b, b) - 2.0 * k(a, b), 0.0))


def sliced_wasserstein(x, y, n_projections: int = 100, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance.

    ``SW_1 = (1/L) sum_l W_1(<x, u_l>, <y, u_l>)`` for ``L = n_projections`` unit directions
    ``u_l`` drawn uniformly on the sphere (normalised standard normals, seeded by ``seed``)
    and ``W_1`` the 1-D Wasserstein-1 distance of the projected empirical distributions
    (:func:`scipy.stats.wasserstein_distance`). Unit: those of the input space.
    """
    a, b = _cells(x, "x"), _cells(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y have different dimensions ({a.shape[1]} vs {b.shape[1]})")
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = a @ dirs.T, b @ dirs.T
    return float(np.mean([wasserstein_distance(pa[:, l], pb[:, l]) for l in range(n_projections)]))


def discrimination_scores(pred_deltas, true_deltas) -> np.ndarray:
    """Per condition, how well its prediction singles out its own true condition.

    For conditions ``p = 1..N`` with predicted deltas ``d̂_p`` and true deltas ``d_q``
    (rows, one per condition, over all genes), let ``D_pq = |d̂_p - d_q|_2``. Then
    ``score_p = (1/(N-1)) sum_{q != p} ( [D_pq > D_pp] + 0.5·[D_pq = D_pp] )``:
    the fraction of the other conditions whose true delta is farther from the prediction
    than the own one. 1 = the prediction is closest to its own condition, 0.5 = chance,
    0 = farthest. NaN when N < 2.
    """
    pred = np.asarray(pred_deltas, dtype=np.float64)
    true = np.asarray(true_deltas, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred_deltas and true_deltas must be equal 2-D shapes, got "
                         f"{pred.shape} and {true.shape}")
    n = pred.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    dist = cdist(pred, true)
    own = np.diag(dist)[:, None]
    tie = np.abs(dist - own) <= 1e-12 * np.maximum(1.0, own)
    farther = ((dist > own) & ~tie).astype(float) + 0.5 * tie
    np.fill_diagonal(farther, 0.0)
    return farther.sum(axis=1) / (n - 1)
