"""The expression space celldit works in: ``log1p(normalize_total(counts, 1e4))``."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["log_normalize", "check_expression", "TARGET_SUM"]

#: counts per cell after :func:`scanpy.pp.normalize_total`
TARGET_SUM = 1e4


def _values(matrix) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no densification)."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def check_expression(matrix, where: str = "X", *, allow_negative: bool = False) -> bool:
    """Check a matrix for NaN, infinite and negative values; tell whether it holds integers.

    Parameters
    ----------
    matrix
        Dense array or scipy sparse matrix (cells x genes).
    where
        Name used in error messages, e.g. ``"X"`` or ``"layers['counts']"``.
    allow_negative
        Accept negative values (predictions such as control + shift may dip below 0).

    Returns
    -------
    bool
        ``True`` when every value is a whole number (raw counts), ``False`` otherwise.

    Raises
    ------
    ValueError
        Naming the matrix and the problem: NaN, infinite or negative values.
    """
    values = _values(matrix)
    if values.size == 0:
        return True
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{where} has non-numeric dtype {values.dtype}")
    n_nan = int(np.isnan(values).sum()) if np.issubdtype(values.dtype, np.floating) else 0
    if n_nan:
        raise ValueError(f"{where} contains {n_nan} NaN values; remove or impute them first")
    if not np.isfinite(values).all():
        raise ValueError(f"{where} contains infinite values")
    vmin = values.min()
    if vmin < 0 and not allow_negative:
        raise ValueError(
            f"{where} contains negative values (min {float(vmin):.4g}); expected raw counts or "
            "log1p-normalised expression (scaled or centred data cannot be evaluated)"
        )
    return bool(np.all(np.mod(values, 1) == 0))


def log_normalize(
    adata: AnnData,
    *,
    counts_layer: str = "counts",
    target_sum: float = TARGET_SUM,
) -> AnnData:
    """Return a copy of ``adata`` with ``X = log1p(normalize_total(counts, target_sum))``.

    The counts are taken from ``adata.layers[counts_layer]`` when that layer exists,
    otherwise from ``X``. For each cell i and gene j,
    ``X[i, j] = log(1 + target_sum * counts[i, j] / sum_j' counts[i, j'])``
    (:func:`scanpy.pp.normalize_total` then :func:`scanpy.pp.log1p`). The counts are kept
    in ``layers[counts_layer]`` of the copy.

    When the source holds non-integer values it is taken to be log-normalised already: the
    copy keeps ``X`` unchanged and a :class:`UserWarning` says so.

    Parameters
    ----------
    adata
        Cells x genes; dense or sparse; not modified.
    counts_layer
        Layer holding raw counts when present.
    target_sum
        Total counts per cell after normalisation (default 1e4).

    Returns
    -------
    AnnData
        A copy; ``uns['celldit_expression']`` records ``{"space", "source"}``.

    Raises
    ------
    ValueError
        If the source matrix has NaN, infinite or negative values.
    """
    import scanpy as sc

    out = adata.copy()
    if out.isbacked:  # pragma: no cover - backed copies are loaded by .copy() into memory
        out = out.to_memory()
    if counts_layer in out.layers:
        source = f"layers[{counts_layer!r}]"
        counts = out.layers[counts_layer]
        if not check_expression(counts, source):
            raise ValueError(
                f"{source} holds non-integer values, so it is not raw counts; drop or rename "
                "that layer to use X as given"
            )
        out.X = counts.copy()
    else:
        source = "X"
        if not check_expression(out.X, "X"):
            warnings.warn(
                "X holds non-integer values: assuming it is already "
                "log1p(normalize_total(counts, 1e4)) and leaving it unchanged",
                UserWarning,
                stacklevel=2,
            )
            out.uns["celldit_expression"] = {"space": "log1p_normalized", "source": "as_given"}
            return out
        out.layers[counts_layer] = out.X.copy()
    if sp.issparse(out.X):
        out.X = out.X.astype(np.float32)
    else:
        out.X = np.asarray(out.X, dtype=np.float32)
    import torch

    threads = torch.get_num_threads()
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    # scanpy's numba kernels run on the OpenMP runtime torch uses, and leave its thread
    # count at numba's: a torch.set_num_threads(n) of the caller would be silently undone
    torch.set_num_threads(threads)
    out.uns.pop("log1p", None)
    out.uns["celldit_expression"] = {"space": "log1p_normalized", "source": source}
    return out
