"""The PCA space the distribution metrics are computed in."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

__all__ = ["PCASpace"]

# fit on a dense copy when cells x genes is at most this many values; sparse otherwise
_DENSE_LIMIT = 60_000_000


class PCASpace:
    """First principal components of log1p expression, fitted on real (training) cells.

    ``z = (x - mu) W`` where ``mu`` is the per-gene mean of the fit cells and the columns of
    ``W`` the top ``n_components`` principal axes (scikit-learn
    :class:`~sklearn.decomposition.PCA`, no scaling of genes). Dense inputs and small
    sparse inputs are fitted exactly (``svd_solver="covariance_eigh"`` up to 2,000 genes,
    ``"full"`` beyond); large sparse inputs with ARPACK and implicit centring, so the
    matrix is never densified. At most ``max_cells`` cells (a seeded random subset) enter
    the fit.

    Parameters
    ----------
    n_components
        Number of components (30 in the DESIGN metrics); reduced to
        ``min(n_components, n_cells - 1, n_genes)`` when the data are smaller.
    max_cells
        Cap on the number of cells used for the fit.
    seed
        Seed of the subset when ``max_cells`` is exceeded.
    """

    def __init__(self, n_components: int = 30, max_cells: int = 50_000, seed: int = 0) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = int(n_components)
        self.max_cells = int(max_cells)
        self.seed = int(seed)
        self._pca: PCA | None = None
        self.n_fit_cells: int = 0

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run."""
        return self._pca is not None

    def fit(self, matrix) -> PCASpace:
        """Fit on a cells x genes matrix (dense or scipy sparse)."""
        n_cells, n_genes = matrix.shape
        if n_cells < 2:
            raise ValueError(f"the PCA space needs at least 2 cells to fit, got {n_cells}")
        rows = np.arange(n_cells)
        if n_cells > self.max_cells:
            rows = np.sort(np.random.default_rng(self.seed).choice(n_cells, self.max_cells,
                                                                   replace=False))
        data = matrix[rows]
        k = min(self.n_components, len(rows) - 1, n_genes)
        if sp.issparse(data) and data.shape[0] * data.shape[1] > _DENSE_LIMIT:
            k = min(k, min(data.shape) - 1)
            pca = PCA(n_components=k, svd_solver="arpack", random_state=self.seed)
            pca.fit(sp.csr_matrix(data, dtype=np.float64))
        else:
            dense = np.asarray(data.toarray() if sp.issparse(data) else data, dtype=np.float64)
            # exact either way: eigh of the gene covariance is much faster for few genes
            solver = "covariance_eigh" if n_genes <= 2000 else "full"
            pca = PCA(n_components=k, svd_solver=solver)
            pca.fit(dense)
        self._pca = pca
        self.n_fit_cells = len(rows)
        return self

    def fit_rows(self, rows) -> PCASpace:
        """Fit on cells read on demand (``rows.rows(idx)``, ``n_obs``): the same seeded subset
        of at most ``max_cells`` cells as :meth:`fit`, read in chunks into a sparse matrix."""
        n = rows.n_obs
        if n < 2:
            raise ValueError(f"the PCA space needs at least 2 cells to fit, got {n}")
        idx = np.arange(n)
        if n > self.max_cells:
            idx = np.sort(np.random.default_rng(self.seed).choice(n, self.max_cells, replace=False))
        parts = [rows.rows(idx[s: s + 4096]) for s in range(0, len(idx), 4096)]
        if len(idx) * rows.n_vars > _DENSE_LIMIT:
            matrix = sp.vstack([sp.csr_matrix(p) for p in parts]).tocsr()
        else:
            matrix = np.concatenate(parts)
        saved, self.max_cells = self.max_cells, len(idx)  # the subset is drawn already
        try:
            return self.fit(matrix)
        finally:
            self.max_cells = saved

    def transform(self, matrix) -> np.ndarray:
        """Project cells (dense or sparse rows) to ``(n_cells, n_components)`` coordinates."""
        if self._pca is None:
            raise RuntimeError("PCASpace.transform called before fit")
        dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
        return self._pca.transform(np.asarray(dense, dtype=np.float64))

    @property
    def components(self) -> np.ndarray:
        """Principal axes, ``(n_components, n_genes)``."""
        if self._pca is None:
            raise RuntimeError("PCASpace not fitted")
        return self._pca.components_

    def describe(self) -> dict[str, Any]:
        """Settings and fit facts, for reports."""
        out: dict[str, Any] = {"n_components": self.n_components, "max_cells": self.max_cells,
                               "seed": self.seed, "n_fit_cells": self.n_fit_cells}
        if self._pca is not None:
            out["n_components_fitted"] = int(self._pca.n_components_)
            out["explained_variance_ratio"] = float(self._pca.explained_variance_ratio_.sum())
        return out
