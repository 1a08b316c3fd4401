"""Rows of an AnnData in celldit's expression space, read a batch at a time, on a fixed basis.

:class:`ExpressionRows` never copies or densifies a whole matrix. It decides once, in one
chunked pass, where the counts come from (:func:`counts_source`), which space they are in
(:func:`~celldit.data.expression.detect_space`) and each cell's library size, the
*normalisation basis*; then :meth:`ExpressionRows.rows` reads any rows (from memory, or in
sorted runs from a backed ``.h5ad``), keeps the model's genes and returns
``log1p(target_sum * counts / library size)``.

The basis is what makes a cell's values the same wherever it comes from. By default the
library size is the cell's total count over the *basis genes*: all genes of the training
data (recorded with a model, :attr:`ExpressionRows.basis`). An input that lacks some of
them cannot be normalised like the training cells from its own columns; it then needs a
per-cell size-factor column (``size_factor_key``, e.g. ``obs['n_counts']`` written by the
lab's pipeline) or log-normalised values, and otherwise gets an error that says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .expression import TARGET_SUM, detect_space, gene_positions

__all__ = ["ExpressionRows", "counts_source", "group_sums", "size_factors"]

CHUNK = 8192  # rows read at once by the passes over a whole matrix
MERGE_GAP = 64  # on disk, asked rows closer than this are read with the rows between them, in one slice


def counts_source(adata: AnnData, layer: str | None = None) -> tuple[Any, Sequence[str], str]:
    """``(matrix, its var names, description)`` of the expression values to read.

    ``layer``: a layer name, ``"X"``, ``"raw"`` (``adata.raw.X``, with ``adata.raw.var_names``)
    or None, the default rule: ``layers['counts']`` when present, else ``X``. ``X`` is not
    touched when a layer is used (a backed view would load it).
    """
    if layer is None:
        layer = "counts" if "counts" in adata.layers else "X"
    if layer == "X":
        matrix, names, where = adata.X, adata.var_names, "X"
    elif layer == "raw":
        if adata.raw is None:
            raise ValueError("layer='raw' (--layer raw): this AnnData has no .raw; choose X or a layer "
                             f"({', '.join(adata.layers.keys()) or 'none present'})")
        matrix, names, where = adata.raw.X, adata.raw.var_names, "raw.X"
    elif layer not in adata.layers:
        raise ValueError(f"layer={layer!r} (--layer): not in adata.layers (present: "
                         f"{', '.join(adata.layers.keys()) or 'none'}); use X, raw or one of those")
    else:
        matrix, names, where = adata.layers[layer], adata.var_names, f"layers[{layer!r}]"
    return matrix, check_var_names(names, "adata.raw.var_names" if layer == "raw" else "adata.var_names"), where


def check_var_names(var_names: Sequence[str], what: str = "adata.var_names") -> list[str]:
    """Gene names as strings; ``ValueError`` when there are none or some repeat.

    Genes are matched by name (between training data, inputs and checkpoints), so a repeated
    name would be ambiguous: scanpy's ``var_names_make_unique()`` appends ``-1``, ``-2``, ...
    """
    names = [str(g) for g in var_names]
    if not names:
        raise ValueError(f"{what} is empty: the data have 0 genes")
    counts = pd.Series(names).value_counts()
    repeated = counts[counts > 1]
    if len(repeated):
        shown = ", ".join(f"{g!r} x{n}" for g, n in repeated.head(8).items()) + (" ..." if len(repeated) > 8 else "")
        raise ValueError(f"{what} has {len(repeated)} repeated gene name(s): {shown}; make them unique first "
                         "(adata.var_names_make_unique())")
    return names


def size_factors(adata: AnnData, key: str) -> np.ndarray:
    """Library sizes from ``obs[key]`` (positive and finite, else a ``ValueError`` naming the key)."""
    if key not in adata.obs.columns:
        raise ValueError(f"size_factor_key={key!r} (--size-factor-key) is not a column of adata.obs "
                         f"(columns: {list(adata.obs.columns)[:20]})")
    values = np.asarray(adata.obs[key], dtype=np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        raise ValueError(f"obs[{key!r}] (size_factor_key) has {int(bad.sum())} cells with a zero, negative or NaN "
                         "library size; every cell needs a positive one")
    return values


class ExpressionRows:
    """Cells of an AnnData in model space, densified a batch of rows at a time.

    A backed AnnData (or a view of one) is read from its file: rows in sorted runs, each run
    as one contiguous slice, so that nothing is ever read row by row; :meth:`cache` holds a
    chosen set of rows (e.g. a training buffer of contiguous chunks) in memory. The object
    pickles without its open file (DataLoader workers reopen it).

    Parameters
    ----------
    adata
        Cells x genes, in memory or backed.
    genes
        Gene names to keep, in output column order (default: all of the source's).
    layer
        Where the values come from (see :func:`counts_source`).
    input_space
        ``"counts"``, ``"log1p"`` (``log1p(normalize_total(counts, 1e4))`` already) or
        ``"auto"`` (see :func:`~celldit.data.expression.detect_space`).
    size_factor_key
        obs column of library sizes (counts): used instead of totals over the basis genes.
    basis_genes
        Genes whose total count is a cell's library size (default: every gene of the
        source). A model passes its training genes; an input lacking some of them needs
        ``size_factor_key`` (or log1p values).
    target_sum
        Counts per cell after normalisation.
    warn_log1p
        Warn when ``auto`` takes non-integer values as log1p.

    Attributes
    ----------
    space
        ``"counts"`` or ``"log1p"``: what the source holds.
    basis
        How library sizes were computed: ``{"kind": "total_counts", "n_genes": ...}``,
        ``{"kind": "size_factor_key", "key": ...}`` or ``{"kind": "none"}`` (log1p input).
    """

    def __init__(self, adata: AnnData, genes: Sequence[str] | None = None, *, layer: str | None = None,
                 input_space: str = "auto", size_factor_key: str | None = None,
                 basis_genes: Sequence[str] | None = None, target_sum: float = TARGET_SUM, warn_log1p: bool = True):
        root = adata._adata_ref if adata.is_view else adata
        self._layer = layer
        self._path = str(adata.filename) if adata.isbacked else None  # a backed .h5ad: reopened by workers
        self.backed = self._path is not None or on_disk(counts_source(root, layer)[0])
        if self.backed:  # the file's own matrix, and where this AnnData's rows lie in it
            file_rows = _rows_in_file(adata)
            adata = _open(self._path) if self._path else root
        else:
            file_rows = None
        self._matrix, source_genes, self.where = counts_source(adata, layer)
        self._file_rows = file_rows
        self.n_obs = len(file_rows) if file_rows is not None else adata.n_obs
        self.genes = list(source_genes) if genes is None else list(map(str, genes))
        self.columns = gene_positions(source_genes, self.genes)
        # every source gene in order (genes="all"): reads skip the column selection, which on a
        # sparse block costs a third of a training buffer's fill
        self._all_columns = np.array_equal(self.columns, np.arange(len(source_genes)))
        self.target_sum = float(target_sum)
        basis_cols, missing = None, []
        if basis_genes is not None:
            lookup = {g: i for i, g in enumerate(source_genes)}
            missing = [g for g in basis_genes if g not in lookup]
            basis_cols = None if missing else np.array([lookup[g] for g in basis_genes], dtype=np.int64)
        blocks = (self._source_block(np.arange(s, min(self.n_obs, s + CHUNK))) for s in range(0, self.n_obs, CHUNK))
        self.space, totals = detect_space(blocks, self.where, input_space, basis_cols)
        if self.space == "log1p" and input_space == "auto" and warn_log1p:
            warnings.warn(f"{self.where} holds non-integer values: taking it as log1p(normalize_total(counts, 1e4)) "
                          "(declare input_space='log1p' to silence this, or 'counts')", UserWarning, stacklevel=2)
        if missing and self.space == "counts" and size_factor_key is None:
            shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"the input lacks {len(missing)} of the {len(basis_genes)} genes the model's library "
                             f"sizes were counted over ({shown}), so its counts cannot be normalised as in training; "
                             "give each cell's library size in an obs column (size_factor_key=..., --size-factor-key) "
                             "or log1p(normalize_total(counts, 1e4)) values computed on the full gene set")
        obs_adata = adata if file_rows is None else None
        self.library: np.ndarray | None = None
        if size_factor_key is not None:
            sizes = size_factors(obs_adata if obs_adata is not None else adata, size_factor_key)
            self.library = sizes if file_rows is None else sizes[file_rows]
        if self.space == "log1p":
            self.basis: dict[str, Any] = {"kind": "none"}
        elif size_factor_key is not None:
            self.basis = {"kind": "size_factor_key", "key": size_factor_key}
        else:
            self.library = totals
            self.basis = {"kind": "total_counts", "n_genes": len(source_genes) if basis_cols is None else len(basis_cols)}
        if not self.backed and sp.issparse(self._matrix) and not isinstance(self._matrix, sp.csr_matrix):
            self._matrix = sp.csr_matrix(self._matrix)  # row reads
        self._cache_index: np.ndarray | None = None
        self._cache: Any = None

    # ------------------------------------------------------------------ pickling (DataLoader workers)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._path is not None:
            state["_matrix"] = None  # an open file does not pickle: reopened on first read
        return state

    def _source(self):
        if self._matrix is None:
            self._matrix = counts_source(_open(self._path), self._layer)[0]
        return self._matrix

    # ------------------------------------------------------------------ reading
    @property
    def counts(self) -> bool:
        """Whether the source holds raw counts (normalised on read)."""
        return self.space == "counts"

    @property
    def n_vars(self) -> int:
        return len(self.genes)

    def library_sizes(self, idx: np.ndarray) -> np.ndarray | None:
        """(len(idx),) library sizes of the cells ``idx`` (None for log1p input without size factors)."""
        return None if self.library is None else self.library[np.asarray(idx, dtype=np.int64)]

    def _source_block(self, idx: np.ndarray):
        """All columns of the source rows ``idx`` (sorted, unique), read in contiguous runs."""
        matrix = self._source()
        if not self.backed:
            return matrix[idx]
        rows = self._file_rows[idx]
        # runs of rows separated by small gaps are read as one slice (then the asked rows kept)
        runs = np.split(rows, np.flatnonzero(np.diff(rows) > MERGE_GAP) + 1)
        parts = []
        for run in runs:
            lo, hi = int(run[0]), int(run[-1]) + 1
            block = matrix[lo:hi]
            block = block.to_memory() if hasattr(block, "to_memory") else block
            if hi - lo != len(run):
                block = block[run - lo]
            parts.append(block)
        if sp.issparse(parts[0]):
            return sp.vstack(parts).tocsr()
        return np.concatenate([np.asarray(p) for p in parts])

    def _read(self, idx: np.ndarray):
        """The rows ``idx`` (any order) of the source, model genes only, as stored."""
        if not self.backed:
            block = self._matrix[idx]
            return self._model_genes(block if sp.issparse(block) else np.asarray(block))
        uniq, inverse = np.unique(idx, return_inverse=True)
        return self._model_genes(self._source_block(uniq))[inverse]

    def _model_genes(self, block):
        """The model's genes (columns) of a block of source rows."""
        return block if self._all_columns else block[:, self.columns]

    def _cached(self, idx: np.ndarray) -> np.ndarray | None:
        """Positions of the rows ``idx`` in the cache, or None when some are not held."""
        if self._cache_index is None:
            return None
        pos = np.searchsorted(self._cache_index, idx)
        pos = np.minimum(pos, len(self._cache_index) - 1)
        return pos if np.array_equal(self._cache_index[pos], idx) else None

    def _scale(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx),) float32 ``target_sum / library size`` of the cells ``idx`` (0 for an empty cell)."""
        lib = self.library[idx]
        return np.where(lib > 0, self.target_sum / np.where(lib > 0, lib, 1.0), 0.0).astype(np.float32)

    def _normalise(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``log1p(x / library * target_sum)`` of the float32 rows ``x`` of cells ``idx``, in place."""
        x *= self._scale(idx)[:, None]
        return np.log1p(x, out=x)

    def cache(self, idx: np.ndarray) -> None:
        """Hold the rows ``idx`` (model genes, normalised) in memory; later reads of them come
        from there. Replaces the previous cache; an empty ``idx`` clears it.

        Counts are normalised once here rather than at every read: a training buffer's cells
        are each read about eight times. Sparse rows stay sparse (``log1p(0) = 0``).
        """
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        self._cache_index, self._cache = None, None
        if idx.size == 0:
            return
        block = self._source_block(idx) if self.backed else self._matrix[idx]
        block = self._model_genes(block)
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float32)
            block.sum_duplicates()
            if self.space == "counts":  # the same float32 operations as on a dense read: identical values
                block.data *= np.repeat(self._scale(idx), np.diff(block.indptr))
                np.log1p(block.data, out=block.data)
        else:
            block = np.array(block, dtype=np.float32)
            if self.space == "counts":
                self._normalise(block, idx)
        self._cache, self._cache_index = block, idx

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), n_genes) float32 expression of the cells ``idx`` (any order, repeats allowed)."""
        idx = np.asarray(idx, dtype=np.int64)
        pos = self._cached(idx)
        block = self._read(idx) if pos is None else self._cache[pos]
        if sp.issparse(block):
            x = block.toarray().astype(np.float32, copy=False)
        else:
            x = np.array(block, dtype=np.float32)  # a copy: changed in place below, and by callers
        if pos is None and self.space == "counts":
            self._normalise(x, idx)
        return x

    def smallest_positive(self, chunk: int = CHUNK) -> np.ndarray:
        """(n_obs,) each cell's smallest positive value over *every* gene of the source (not only
        the model's), as stored; 0 for a cell without one. For log1p input it is the value of one
        count in that cell (a gene seen once, which sparse cells nearly always have somewhere)."""
        out = np.zeros(self.n_obs)
        for start in range(0, self.n_obs, chunk):
            block = self._source_block(np.arange(start, min(self.n_obs, start + chunk)))
            if sp.issparse(block):
                block = sp.csr_matrix(block, dtype=np.float64)
                data = np.where(block.data > 0, block.data, np.inf)
                nnz = np.diff(block.indptr) > 0
                smallest = np.full(block.shape[0], np.inf)
                if nnz.any():
                    smallest[nnz] = np.minimum.reduceat(data, block.indptr[:-1][nnz])
            else:
                x = np.asarray(block, dtype=np.float64)
                smallest = np.where(x > 0, x, np.inf).min(1) if x.shape[1] else np.full(len(x), np.inf)
            out[start: start + len(smallest)] = np.where(np.isfinite(smallest), smallest, 0.0)
        return out

    def all_rows(self, idx: np.ndarray | None = None, chunk: int = CHUNK) -> np.ndarray:
        """Dense rows ``idx`` (default all), read in chunks."""
        idx = np.arange(self.n_obs) if idx is None else np.asarray(idx)
        if idx.size == 0:
            return np.zeros((0, self.n_vars), np.float32)
        return np.concatenate([self.rows(idx[s: s + chunk]) for s in range(0, len(idx), chunk)])


def on_disk(matrix: Any) -> bool:
    """Whether ``matrix`` is read from disk on indexing (a backed or zarr sparse dataset, an
    HDF5 dataset or a zarr array) rather than held in memory."""
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(matrix, (CSRDataset, CSCDataset)):
        return True
    module = type(matrix).__module__
    return module.startswith("h5py") or module.startswith("zarr")


def _open(path: str) -> AnnData:
    import anndata as ad

    return ad.read_h5ad(path, backed="r")


def _rows_in_file(adata: AnnData) -> np.ndarray:
    """Row positions, in its file, of a backed AnnData or of a view of one."""
    if not adata.is_view:
        return np.arange(adata.n_obs)
    index = adata._oidx
    n_file = adata._adata_ref.n_obs
    rows = np.arange(n_file)[index]
    return np.asarray(rows, dtype=np.int64)


def group_sums(rows: Any, groups: np.ndarray, n_groups: int, chunk: int = CHUNK, squares: bool = False
               ) -> tuple[np.ndarray, ...]:
    """Per-group sums (n_groups, G) and sizes (n_groups,) of ``rows`` (anything with ``rows(idx)``,
    ``n_obs`` and ``n_vars``), in one chunked pass: a sparse indicator product per chunk, so the
    means of every condition cost one read of the data and ``chunk`` rows of memory
    (``groups[i] < 0``: row i is skipped). ``squares``: also the per-group sums of squares
    (n_groups, G), returned third (variances in the same pass)."""
    groups = np.asarray(groups, dtype=np.int64)
    sums = np.zeros((n_groups, rows.n_vars), np.float64)
    sq = np.zeros_like(sums) if squares else None
    sizes = np.bincount(groups[groups >= 0], minlength=n_groups).astype(np.float64)
    for start in range(0, rows.n_obs, chunk):
        g = groups[start: start + chunk]
        keep = np.flatnonzero(g >= 0)
        if keep.size == 0:
            continue
        x = rows.rows(start + keep)
        indicator = sp.csr_matrix((np.ones(len(keep)), (g[keep], np.arange(len(keep)))), shape=(n_groups, len(keep)))
        x = x.astype(np.float64)
        sums += indicator @ x
        if squares:
            sq += indicator @ (x * x)
    return (sums, sizes, sq) if squares else (sums, sizes)
