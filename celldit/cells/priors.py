"""Prior features of perturbations: what lets a model embed a perturbation it never saw.

Two sources, both a table indexed by perturbation name (rows) with numeric columns:

* a user table (gene embeddings, drug fingerprints ...), a DataFrame or a CSV/TSV/parquet
  file whose first column is the name;
* :func:`expression_gene_features`: for a target gene that is measured, its expression
  profile across control cells, reduced by PCA. Genes that co-vary in the unperturbed
  state get nearby features, so a knockout of an unseen gene borrows from seen ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


def expression_gene_features(x_control, gene_names, n_components: int = 16, seed: int = 0) -> pd.DataFrame:
    """Gene features from control cells: each gene's standardised profile across cells, by PCA.

    Parameters
    ----------
    x_control
        (cells, genes) log-normalised expression of control cells (dense or sparse).
    gene_names
        Names of the columns.
    n_components
        Feature width (capped by the number of cells and genes).
    seed
        Seed of the randomised PCA.

    Returns
    -------
    DataFrame (genes x n_components), unit-norm rows (constant genes get zeros).
    """
    from sklearn.decomposition import PCA

    x = x_control.toarray() if sp.issparse(x_control) else np.asarray(x_control, dtype=np.float64)
    x = x.astype(np.float64)
    sd = x.std(0)
    z = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)  # (cells, genes)
    k = int(min(n_components, z.shape[0] - 1, z.shape[1] - 1))
    if k < 1:
        raise ValueError("expression_gene_features needs at least 2 control cells and 2 genes")
    feats = PCA(k, random_state=seed, svd_solver="randomized" if min(z.shape) > 500 else "full").fit(z.T).transform(z.T)
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    feats = np.where(norm > 0, feats / np.where(norm > 0, norm, 1.0), 0.0)
    feats[sd == 0] = 0.0
    return pd.DataFrame(feats.astype(np.float32), index=[str(g) for g in gene_names],
                        columns=[f"expr_pc{i + 1}" for i in range(k)])


def read_feature_table(source: pd.DataFrame | str | Path) -> pd.DataFrame:
    """A user prior table: a DataFrame, or a ``.csv``/``.tsv``/``.parquet`` path (first column = name).

    Raises
    ------
    ValueError
        If the table is empty, has duplicated names, or non-numeric / non-finite values.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"perturbation feature table {path} does not exist")
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if path.suffix in {".tsv", ".txt"} else ",", index_col=0)
    else:
        table = source.copy()
    table.index = table.index.astype(str)
    if table.empty:
        raise ValueError("the perturbation feature table is empty")
    if table.index.duplicated().any():
        dup = table.index[table.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"the perturbation feature table has duplicated names: {dup}")
    try:
        values = table.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the perturbation feature table must be numeric: {err}") from None
    if not np.isfinite(values).all():
        raise ValueError("the perturbation feature table has NaN or infinite values")
    return pd.DataFrame(values, index=table.index, columns=[str(c) for c in table.columns])


def align_features(table: pd.DataFrame | None, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``table`` for ``names`` -> ``(features (V, F), has_prior (V,))``; missing rows are 0."""
    if table is None:
        return np.zeros((len(names), 0), np.float32), np.zeros(len(names), bool)
    feats = np.zeros((len(names), table.shape[1]), np.float32)
    has = np.array([n in table.index for n in names], dtype=bool)
    if has.any():
        feats[has] = table.loc[[n for n, h in zip(names, has) if h]].to_numpy(np.float32)
    return feats, has
