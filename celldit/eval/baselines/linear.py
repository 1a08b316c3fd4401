"""Linear baseline: ridge regression from perturbation embeddings to the mean shift, plus a
gene-wise linear response to the covariate group's baseline expression.

After Ahlmann-Eltze, Huber & Anders (2025, *Nature Methods*, "Deep-learning-based gene
perturbation effect prediction does not yet outperform simple linear baselines"): genes are
embedded by a PCA of the training expression matrix taken genes x cells, a perturbation is
embedded by its target genes' rows, and a ridge regression maps the embedding to the
perturbation's mean shift ``d(S, g)`` (see :mod:`celldit.eval.baselines.base`).

The predicted shift of perturbation set S in covariate group g is

``s(S, g) = f(e(S)) + b ⊙ (c(g) - c̄)``

* ``e(S) = sum_{a in S} e(a)`` (K values), with ``e(a)``

  1. the row of a user table (``embeddings``, indexed by perturbation name), else
  2. the gene-PCA row of ``a`` when ``a`` is a measured gene, else
  3. a *learned* embedding when ``{a}`` was seen in training: the coordinates of its mean
     training shift on the unit-normalised gene-PCA columns, ``e(a) = Ê^T d̄({a})``, else
  4. zeros (warned: the prediction then rests on the intercept).

* ``f`` is a ridge regression (features standardised, intercept fitted, penalty ``alpha``)
  fitted on the examples ``(S, g)`` of training with targets ``d(S, g) - b ⊙ (c(g) - c̄)``.

* Covariate term (only when the spec has covariate keys; else ``b = 0``): ``c(g)`` is the
  mean control expression of group g, ``c̄`` the unweighted mean of ``c(h)`` over the
  training groups, and per gene j a ridge slope (penalty ``covariate_penalty``) relates
  the shift's deviation from the perturbation's across-group mean to the group's baseline:
  ``b_j = sum_(S,h) x_hj (d_j(S, h) - d̄_j(S)) / (sum_(S,h) x_hj^2 + covariate_penalty)``
  with ``x_h = c(h) - c̄`` and ``d̄(S)`` the mean of ``d(S, h)`` over the groups where S
  was seen. For a held-out group (e.g. one cell type of Kang 2018), ``c(g)`` comes from the
  control cells the prediction starts from: genes expressed more highly at baseline get
  the response they got in similar training groups.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from celldit.data.spec import PerturbationSpec
from celldit.eval.cells import GroupedCells

from .base import Baseline

__all__ = ["Linear", "gene_pca_embedding"]


def gene_pca_embedding(train: AnnData | GroupedCells, n_components: int = 10, max_cells: int = 2000,
                       seed: int = 0) -> pd.DataFrame:
    """Embedding of each gene from a PCA of the training matrix taken genes x cells.

    With ``X`` the (subsampled, at most ``max_cells`` seeded) cells x genes matrix, the PCA
    treats each gene as a sample with one feature per cell: ``E = PCA_K(X^T)`` scores,
    ``(n_genes, K)`` with ``K = min(n_components, n_genes - 1, n_cells)`` (randomized SVD,
    ``random_state=seed``).
    """
    if isinstance(train, AnnData):
        x_all, genes = train.X, list(map(str, train.var_names))
        n = train.n_obs
    else:
        x_all, genes = None, train.genes
        n = train.rows.n_obs
    rows = np.arange(n) if n <= max_cells else np.sort(
        np.random.default_rng(seed).choice(n, max_cells, replace=False))
    if x_all is not None:
        x = x_all[rows]
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
    else:
        x = train.cells(rows)
    k = min(n_components, len(genes) - 1, len(rows))
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed)
    scores = pca.fit_transform(np.asarray(x.T, np.float64))
    return pd.DataFrame(scores, index=pd.Index(genes).astype(str), columns=[f"pc{i + 1}" for i in range(k)])


class Linear(Baseline):
    """Ridge regression from perturbation (+ covariate) embeddings to the mean shift.

    Parameters
    ----------
    embeddings
        Optional user table, one row per perturbation name (index) and K numeric columns.
        Without it, the gene-PCA embedding of :func:`gene_pca_embedding` is used.
    n_components
        K of the gene-PCA embedding.
    alpha
        Ridge penalty of ``f`` (on standardised features).
    covariate_penalty
        Ridge penalty of the gene-wise covariate slopes ``b_j``.
    max_cells, seed
        Cells (seeded subset) entering the gene PCA, and its seed.
    """

    name = "linear"

    def __init__(self, embeddings: pd.DataFrame | None = None, n_components: int = 10,
                 alpha: float = 1.0, covariate_penalty: float = 1.0, max_cells: int = 2000,
                 seed: int = 0) -> None:
        super().__init__()
        if embeddings is not None:
            if not isinstance(embeddings, pd.DataFrame) or embeddings.shape[1] < 1:
                raise ValueError("embeddings must be a DataFrame indexed by perturbation name")
            if not np.isfinite(embeddings.to_numpy(dtype=float)).all():
                raise ValueError("embeddings table contains NaN or infinite values")
            embeddings = embeddings.copy()
            embeddings.index = embeddings.index.astype(str)
        self.user_table = embeddings
        if alpha < 0 or covariate_penalty < 0:
            raise ValueError("alpha and covariate_penalty must be >= 0")
        self.n_components, self.alpha = n_components, alpha
        self.covariate_penalty, self.max_cells, self.seed = covariate_penalty, max_cells, seed
        self.sources: dict[str, str] = {}

    # ----------------------------------------------------------------- features
    def _fit_extra(self, train: GroupedCells, spec: PerturbationSpec) -> None:
        gene_table = gene_pca_embedding(train, self.n_components, self.max_cells, self.seed)
        self.gene_table = gene_table
        basis = gene_table.to_numpy()
        self._basis = basis / np.maximum(np.linalg.norm(basis, axis=0, keepdims=True), 1e-12)
        singles: dict[str, list[np.ndarray]] = {}
        for (s, _g), d in self.shifts.items():
            if len(s) == 1:
                singles.setdefault(next(iter(s)), []).append(d)
        self._single_shift = {a: np.mean(np.vstack(v), axis=0) for a, v in singles.items()}
        self._fit_covariate_slopes(spec)
        keys = sorted(self.shifts, key=lambda k: (sorted(k[0]), k[1]))
        feats = np.vstack([self._embed_set(pset) for pset, _g in keys])
        targets = np.vstack([self.shifts[(pset, g)] - self._covariate_term(self.control_means[g])
                             for pset, g in keys])
        self.model = make_pipeline(StandardScaler(), Ridge(alpha=self.alpha))
        self.model.fit(feats, targets)
        self.n_train_examples = len(keys)

    def _fit_covariate_slopes(self, spec: PerturbationSpec) -> None:
        """Gene-wise slopes ``b`` of the shift on the group's baseline (module docstring)."""
        n_genes = len(self.var_names)
        self.slopes = np.zeros(n_genes)
        groups = sorted(self.control_means)
        self.control_center = np.mean([self.control_means[g] for g in groups], axis=0)
        if not spec.covariate_keys or len(groups) < 2:
            return
        by_set: dict[frozenset, list[tuple[str, ...]]] = {}
        for pset, g in self.shifts:
            by_set.setdefault(pset, []).append(g)
        num, den = np.zeros(n_genes), np.zeros(n_genes)
        for pset, gs in by_set.items():
            mean_d = np.mean([self.shifts[(pset, g)] for g in gs], axis=0)
            for g in gs:
                x = self.control_means[g] - self.control_center
                num += x * (self.shifts[(pset, g)] - mean_d)
                den += x * x
        self.slopes = num / (den + self.covariate_penalty)

    def _covariate_term(self, control_mean: np.ndarray) -> np.ndarray:
        return self.slopes * (control_mean - self.control_center)

    def embed(self, perturbation: str) -> np.ndarray:
        """Embedding ``e(a)`` of one perturbation (sources in the module docstring)."""
        table = self.user_table
        if table is not None:
            if perturbation in table.index:
                self.sources[perturbation] = "user_table"
                return table.loc[perturbation].to_numpy(dtype=float)
            self.sources[perturbation] = "zero"
            self._note(f"{perturbation!r} not in the embeddings table: zero embedding")
            return np.zeros(table.shape[1])
        if perturbation in self.gene_table.index:
            self.sources[perturbation] = "gene_pca"
            return self.gene_table.loc[perturbation].to_numpy(dtype=float)
        if perturbation in self._single_shift:
            self.sources[perturbation] = "learned"
            return self._basis.T @ self._single_shift[perturbation]
        self.sources[perturbation] = "zero"
        self._note(f"{perturbation!r} is neither a measured gene nor seen in training: "
                   "zero embedding")
        return np.zeros(self.gene_table.shape[1])

    def _embed_set(self, pset: frozenset) -> np.ndarray:
        return np.sum([self.embed(a) for a in sorted(pset)], axis=0)

    # ----------------------------------------------------------------- predict
    def shift(self, label, covs, control_mean):
        pset = self.spec.parse(label)
        base = self.model.predict(self._embed_set(pset)[None, :])[0]
        return base + self._covariate_term(control_mean)
