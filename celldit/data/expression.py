"""The expression space celldit works in: ``log1p(normalize_total(counts, 1e4))``.

:func:`log_normalize` brings a whole AnnData there; :class:`~celldit.data.rows.ExpressionRows`
reads the rows of a batch there on demand; :func:`detect_space` tells what a matrix holds,
and :func:`~celldit.data.gene_selection.select_genes` picks the gene set a model works on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["keep_torch_threads", "INPUT_SPACES", "LOG1P_MAX", "TARGET_SUM", "check_expression", "detect_space", "gene_positions",
           "log_normalize"]

#: counts per cell after :func:`scanpy.pp.normalize_total`
TARGET_SUM = 1e4
#: the largest value log1p(normalize_total(counts, 1e4)) can take (one gene holds every count)
LOG1P_MAX = float(np.log1p(TARGET_SUM))
#: what a matrix can hold: raw counts, log1p-normalised values, or "auto" (decided from the values)
INPUT_SPACES = ("auto", "counts", "log1p")


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


@contextmanager
def keep_torch_threads():
    """Restore torch's CPU thread count after scanpy: its numba kernels run on the OpenMP
    runtime torch uses and leave its thread count at numba's, so a caller's
    ``torch.set_num_threads(n)`` would be silently undone (and idle threads spin)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    with keep_torch_threads():
        sc.pp.normalize_total(out, target_sum=target_sum)
        sc.pp.log1p(out)
    out.uns.pop("log1p", None)
    out.uns["celldit_expression"] = {"space": "log1p_normalized", "source": source}
    return out


def gene_positions(var_names: Sequence[str], genes: Sequence[str], what: str = "genes") -> np.ndarray:
    """Column index of each of ``genes`` in ``var_names``; ``ValueError`` listing missing ones."""
    lookup = {g: i for i, g in enumerate(map(str, var_names))}
    missing = [g for g in genes if g not in lookup]
    if missing:
        shown = ", ".join(map(repr, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{len(missing)} of the {what} are not in adata.var_names: {shown}")
    return np.array([lookup[g] for g in genes], dtype=np.int64)


def detect_space(blocks, where: str = "X", input_space: str = "auto", basis_columns: np.ndarray | None = None,
                 target_sum: float = TARGET_SUM) -> tuple[str, np.ndarray]:
    """What a matrix holds, checked over every value in one pass over its row blocks.

    Parameters
    ----------
    blocks
        The matrix (dense or scipy sparse, read in chunks of 8,192 rows), or an iterable of
        its consecutive row blocks (e.g. chunks read from a file on disk).
    where
        Its name in error messages (``"X"``, ``"layers['counts']"``).
    input_space
        ``"counts"``, ``"log1p"``, or ``"auto"``: counts when every value is a whole number,
        else log1p. A layer named ``counts`` must hold whole numbers.
    basis_columns
        Columns whose sum is a cell's library size (default: all).

    Returns
    -------
    ``(space, totals)``: ``"counts"`` or ``"log1p"``, and each row's sum over the basis columns.

    Raises
    ------
    ValueError
        Naming the matrix and the setting to fix: NaN, infinite or negative values; values
        above log1p(1e4) = 9.21 that are not whole numbers (neither counts nor log1p:
        e.g. scaled counts), with ``auto`` or ``log1p``; a ``counts`` layer that is not whole numbers.
    """
    if input_space not in INPUT_SPACES:
        raise ValueError(f"input_space={input_space!r} (--input-space): choose one of {list(INPUT_SPACES)}")
    if hasattr(blocks, "shape"):
        matrix = blocks
        blocks = (matrix[s: s + 8192] for s in range(0, matrix.shape[0], 8192))
    totals = []
    integer, vmax = True, 0.0
    for block in blocks:
        if hasattr(block, "to_memory"):
            block = block.to_memory()
        if not sp.issparse(block):
            block = np.asarray(block)
        values = block.data if sp.issparse(block) else block
        if values.size:
            check_expression(block, where)
            vmax = max(vmax, float(values.max()))
            integer = integer and bool(np.all(np.mod(values, 1) == 0))
        picked = block if basis_columns is None else block[:, basis_columns]
        totals.append(np.asarray(picked.sum(1), dtype=np.float64).ravel())
    totals = np.concatenate(totals) if totals else np.zeros(0)
    limit = float(np.log1p(target_sum)) + 1e-3
    if input_space == "auto":
        if where == "layers['counts']" and not integer:
            raise ValueError(f"{where} holds non-integer values, so it is not raw counts; pass layer='X' "
                             "(--layer X) or rename that layer")
        space = "counts" if integer else "log1p"
        if space == "log1p" and vmax > limit:
            raise ValueError(f"{where} holds non-integer values up to {vmax:.4g}: not raw counts, and above "
                             f"log1p({target_sum:g}) = {limit - 1e-3:.2f}, the largest log1p-normalised value (scaled "
                             "counts?). Give raw counts or log1p(normalize_total(counts, 1e4)), or declare "
                             "input_space (--input-space counts|log1p)")
        return space, totals
    if input_space == "log1p" and vmax > limit:
        raise ValueError(f"input_space='log1p' but {where} holds values up to {vmax:.4g}, above log1p({target_sum:g}) "
                         f"= {limit - 1e-3:.2f}: these are not log1p(normalize_total(counts, 1e4)) values")
    return input_space, totals
