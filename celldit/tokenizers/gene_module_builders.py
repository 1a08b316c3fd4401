"""Builders of gene modules for :class:`~celldit.tokenizers.gene_module.GeneModuleTokenizer`.

Each returns a list of modules (lists of gene indices, sorted) that partitions the genes;
a module larger than ``max_size`` is split into consecutive chunks of balanced sizes
(``ceil(n / max_size)`` chunks, sizes differing by at most one), which keeps the
tokenizer's padding small.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

#: cells used to estimate gene correlations (a random subsample beyond this)
MAX_CORRELATION_CELLS = 50_000
#: up to this many genes the squared-correlation affinity is formed and decomposed exactly;
#: beyond, modules are found in a reduced space (:func:`_reduced_spectral_embedding`)
EXACT_GENES = 1500


def split_module(genes: Sequence[int], max_size: int | None = None) -> list[list[int]]:
    """Split one module into ``ceil(n / max_size)`` consecutive chunks of balanced size."""
    genes = [int(g) for g in genes]
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if max_size is None or len(genes) <= max_size:
        return [genes]
    n_chunks = math.ceil(len(genes) / max_size)
    return [chunk.tolist() for chunk in np.array_split(np.asarray(genes, dtype=np.int64), n_chunks)]


def _is_missing(label: object) -> bool:
    return label is None or (isinstance(label, float) and math.isnan(label))


def modules_from_labels(labels: Sequence[Hashable], max_size: int | None = None) -> list[list[int]]:
    """One module per distinct label (e.g. a ``var`` column), in order of first appearance.

    Parameters
    ----------
    labels
        A label per gene; missing labels (``None``, NaN) form one module of their own.
    max_size
        Split modules larger than this into balanced consecutive chunks.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(None if _is_missing(label) else label, []).append(i)
    return [chunk for genes in groups.values() for chunk in split_module(genes, max_size)]


def modules_from_gene_sets(
    var_names: Sequence[str], gene_sets: Mapping[str, Sequence[str]], max_size: int | None = None
) -> list[list[int]]:
    """Modules from named gene sets (e.g. pathways), then the unassigned genes.

    Parameters
    ----------
    var_names
        Gene names of the data, in column order.
    gene_sets
        Set name -> gene names. A gene in several sets goes to the first set (in mapping
        order); names not in ``var_names`` are ignored; sets left empty are dropped.
    max_size
        Split modules larger than this; the genes in no set form chunks of at most
        ``max_size`` genes (one module when ``None``).

    Raises
    ------
    ValueError
        When no gene of any set is among ``var_names`` (names a few of the unknown genes).
    """
    index: dict[str, list[int]] = {}
    for i, name in enumerate(var_names):
        index.setdefault(str(name), []).append(i)
    assigned = np.zeros(len(var_names), dtype=bool)
    modules: list[list[int]] = []
    unknown: list[str] = []
    found = False
    for genes in gene_sets.values():
        genes = [genes] if isinstance(genes, str) else genes
        members = []
        for name in genes:
            hits = index.get(str(name))
            if hits is None:
                unknown.append(str(name))
                continue
            found = True
            members += [i for i in hits if not assigned[i]]
            assigned[hits] = True
        if members:
            modules += split_module(sorted(members), max_size)
    if not found:
        raise ValueError(
            f"no gene of the {len(gene_sets)} gene sets is among the {len(var_names)} var_names "
            f"(e.g. {', '.join(repr(g) for g in unknown[:5])} are unknown); check the gene naming "
            "(symbols vs Ensembl ids, case)"
        )
    rest = np.flatnonzero(~assigned).tolist()
    if rest:
        modules += split_module(rest, max_size)
    return modules


def gene_correlation(X, seed: int = 0) -> np.ndarray:
    """Pearson correlation (G, G) of the gene columns of X (cells x genes, dense or
    sparse); constant genes get zero rows and columns. At most
    ``MAX_CORRELATION_CELLS`` randomly chosen cells are used."""
    n = X.shape[0]
    if n > MAX_CORRELATION_CELLS:
        X = X[np.sort(np.random.default_rng(seed).choice(n, MAX_CORRELATION_CELLS, replace=False))]
        n = MAX_CORRELATION_CELLS
    if sp.issparse(X):  # the Gram matrix stays sparse-friendly; float64 limits cancellation
        X = sp.csr_matrix(X, dtype=np.float64)
        mu = np.asarray(X.mean(axis=0)).ravel()
        cov = (X.T @ X).toarray() / n - np.outer(mu, mu)
    else:
        Xc = np.asarray(X, dtype=np.float64)
        Xc = Xc - Xc.mean(axis=0)
        cov = Xc.T @ Xc / n
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    live = sd > 1e-8 * max(float(sd.max(initial=0.0)), 1e-300)
    inv = np.where(live, 1.0 / np.where(live, sd, 1.0), 0.0)
    return np.clip(cov * inv[:, None] * inv[None, :], -1.0, 1.0)


def modules_from_correlation(
    X, n_modules: int, max_size: int | None = None, seed: int = 0
) -> list[list[int]]:
    """Cluster genes into modules of co-varying genes.

    The affinity is the squared correlation, sign-invariant because a module's token is a
    linear map of its genes, which captures a shared factor whatever the sign of each
    gene's loading; being a Schur product of correlation matrices it is positive
    semi-definite. Genes are embedded by its top ``n_modules`` eigenvectors (scaled by
    the square root of the eigenvalues, rows normalised to unit length, as in spectral
    clustering) and clustered by k-means (10 restarts, seeded). Constant genes embed at
    the origin and join the nearest cluster.

    Parameters
    ----------
    X
        Expression (cells x genes), dense or scipy sparse.
    n_modules
        Number of clusters (fewer modules result if k-means finds fewer distinct ones).
    max_size
        Split modules larger than this into balanced consecutive chunks.
    seed
        Seed of the cell subsample, the eigensolver start and k-means.

    Returns
    -------
    Modules sorted within, ordered by their smallest gene index.
    """
    from sklearn.cluster import KMeans

    n_genes = X.shape[1]
    if not 1 <= n_modules <= n_genes:
        raise ValueError(f"n_modules={n_modules} must be in [1, n_genes={n_genes}]")
    r = n_modules
    if n_genes > EXACT_GENES:
        emb = _reduced_spectral_embedding(X, r, seed)
    else:
        affinity = gene_correlation(X, seed) ** 2  # (G, G)
        from scipy.linalg import eigh

        vals, vecs = eigh(affinity, subset_by_index=[n_genes - r, n_genes - 1])
        emb = vecs * np.sqrt(np.clip(vals, 0.0, None))  # (G, r)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 1e-12)
    with warnings.catch_warnings():  # few distinct points (constant genes) are fine
        warnings.simplefilter("ignore")
        labels = KMeans(n_clusters=n_modules, n_init=10 if n_genes <= EXACT_GENES else 3,
                        random_state=seed).fit_predict(emb)
    modules = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    modules.sort(key=lambda m: m[0])
    return [chunk for m in modules for chunk in split_module(m, max_size)]


def _reduced_spectral_embedding(X, r: int, seed: int, k: int = 32) -> np.ndarray:
    """(G, r) spectral embedding of the squared-correlation affinity without forming it.

    The top ``k`` principal axes of the standardised cells give gene loadings ``l_g``
    (G, k) with correlation ``r_gh ~ l_g . l_h``, so ``r_gh^2 ~ phi_g . phi_h`` with
    ``phi_g = vec(l_g l_g^T)`` (its upper triangle, off-diagonal entries times sqrt(2)):
    the affinity's leading eigenvectors are the leading left singular vectors of the
    (G, k(k+1)/2) matrix ``Phi``. Cost O(cells x G x k), memory O(G x k^2), instead of the
    G x G matrix and its eigensolver.
    """
    from sklearn.utils.extmath import randomized_svd

    n = X.shape[0]
    if n > MAX_CORRELATION_CELLS:
        X = X[np.sort(np.random.default_rng(seed).choice(n, MAX_CORRELATION_CELLS, replace=False))]
        n = MAX_CORRELATION_CELLS
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    Z = X.astype(np.float32) - X.mean(0, dtype=np.float64).astype(np.float32)
    sd = Z.std(0)
    Z /= np.where(sd > 0, sd, 1.0)
    k = int(min(k, n - 1, Z.shape[1] - 1))
    _, S, Vt = randomized_svd(Z, k, random_state=seed)
    loadings = (Vt.T * (S / np.sqrt(n))).astype(np.float64)  # (G, k)
    iu = np.triu_indices(k)
    weight = np.where(iu[0] == iu[1], 1.0, np.sqrt(2.0))
    phi = loadings[:, iu[0]] * loadings[:, iu[1]] * weight  # (G, k(k+1)/2)
    U, S2, _ = randomized_svd(phi, min(r, phi.shape[1]), random_state=seed)
    emb = U * S2  # scaled like the exact embedding (sqrt of the affinity's eigenvalues)
    if emb.shape[1] < r:
        emb = np.pad(emb, ((0, 0), (0, r - emb.shape[1])))
    return emb


def read_gmt(path) -> dict[str, list[str]]:
    """Gene sets from a GMT file (MSigDB's format): one set per line, tab-separated
    ``name``, ``description``, then the genes.

    Raises
    ------
    ValueError
        Naming the file and line of a malformed line (fewer than three fields), a duplicated
        set name, or a file without sets.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene-set file {str(path)!r} does not exist")
    sets: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 3:
            raise ValueError(f"{path}:{number}: a GMT line needs a name, a description and genes, tab-separated")
        if fields[0] in sets:
            raise ValueError(f"{path}:{number}: gene set {fields[0]!r} appears twice")
        sets[fields[0]] = [g for g in fields[2:] if g]
    if not sets:
        raise ValueError(f"{path} holds no gene sets")
    return sets
