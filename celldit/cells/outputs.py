"""Predicted cells as AnnData, in memory or streamed to an ``.h5ad`` file or ``.zarr`` store chunk by chunk.

Every block of predicted cells goes through the same steps:

* ``X`` (dense float32) is brought to the support of ``log1p`` expression: a control cell
  plus a negative shift can dip below 0, a positive shift lifts a gene the cell did not
  detect to a small value real data cannot hold (a detected gene is at least the cell's
  first count level ``log1p(1e4 / library size)``, about 3.9 on Papalexi), and cells generated
  from noise spread around 0 where the data has zeros.

  - ``support="discrete"`` (default of counterfactuals): ``"balance"``, then each value
    between 0 and its cell's first count level goes to 0 or to that level at random, up with
    probability ``value / level`` (systematic sampling over the block's cells, so that as many
    go up as the probabilities add to). The gene's mean is kept (in expectation, and to about
    one rounding in the block) and it is *detected* in as many cells as the shift implies: on
    Papalexi rep_3 the fraction of cells detecting a gene was off by 0.153 on average with
    ``"balance"``, 0.022 with ``"discrete"`` and 0.025 for the unperturbed controls
    (E-distance -0.002, three seeds; ``docs/cells.md``). It needs each cell's first count
    level: the source cell's (from its library size, or for log1p input its smallest positive
    value over all the input's genes, :meth:`~celldit.data.rows.ExpressionRows.smallest_positive`).
  - ``"balance"`` (default of ``generate``) sets each gene's negative values to 0 together
    with its smallest positive values, as many as balance the negative mass over the block,
    so that the gene's mean is unchanged and values away from 0 stay as they are;
  - ``"rescale"`` (the default before) sets negative values to 0 and scales all of the gene's
    positive values so that its mean is unchanged (every expressed value of a decreased gene
    shrinks; on Papalexi it cost E-distance 0.0095 against 0.0028 for ``"balance"`` on the same
    counterfactual cells, and 0.09 against 0.004 on cells generated from noise);
  - ``"clip"`` sets negative values to 0 (clipping alone raises the mean of every decreased
    gene); ``"none"`` keeps the flow output.

  The flow output itself goes to ``layers['flow']`` when asked (``raw_layer=True``);
* ``obs`` columns of labels (the perturbation key, covariates, ``celldit_source``) are
  categorical, as scanpy expects;
* ``var`` keeps the input's (or training data's) annotations of the model's genes;
* with ``counts=True``, ``layers['counts']`` holds counts sampled from the prediction,
  ``Poisson(expm1(x) * size / 1e4)`` with ``size`` the library size of the source cell;
* ``obsm['X_pca']`` holds the cells in the model's PCA space (30 components fitted on the
  training cells, the definition the evaluation uses) when the model has one.

:class:`OutputWriter` collects blocks in memory (``path=None``) or appends them to an
on-disk CSR matrix through anndata's sparse-dataset API, so that a million predicted cells
need the memory of one block (``X`` and ``obsm['X_pca']`` are resizable HDF5 datasets, the
counts layer an appended CSR matrix; the same in a ``.zarr`` store); the file is renamed into
place when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["OutputWriter", "SUPPORTS", "first_count_level", "to_support"]

TARGET_SUM = 1e4
SUPPORTS = ("discrete", "balance", "rescale", "clip", "none")


def first_count_level(x: np.ndarray | None, library: np.ndarray | None = None) -> np.ndarray:
    """(n,) each cell's first count level: the log1p value of one count, ``log1p(1e4 / library)``.

    ``x`` (cells x genes, uncentred log1p values) is read only without library sizes (log1p
    input): then the level is the cell's smallest positive value (a gene seen once
    in the cell, which sparse cells nearly always have); 0 for a cell with no count (nothing of
    it is rounded)."""
    if library is not None:
        library = np.asarray(library, dtype=np.float64)
        return np.where(library > 0, np.log1p(TARGET_SUM / np.where(library > 0, library, 1.0)), 0.0)
    x = np.asarray(x, dtype=np.float64)
    if not x.size:
        return np.zeros(len(x))
    smallest = np.where(x > 0, x, np.inf).min(1)
    return np.where(np.isfinite(smallest), smallest, 0.0)


def to_support(x: np.ndarray, how: str = "balance", *, first_level: np.ndarray | None = None,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """``x`` (cells x genes, log1p space) on the support of log1p expression (see the module notes).

    ``first_level`` (n,): each cell's first count level (:func:`first_count_level`), needed by
    ``"discrete"``, whose rounding draws from ``rng`` (default: a generator seeded 0)."""
    if how == "none":
        return x
    if how not in SUPPORTS:
        raise ValueError(f"support={how!r}: expected one of {SUPPORTS}")
    if how == "discrete":
        if first_level is None or len(first_level) != len(x):
            raise ValueError("support='discrete' needs first_level: each cell's first count level (one per cell, "
                             "from its source cell's library size); use support='balance' without source cells")
        return _round_to_first_level(to_support(x, "balance"), np.asarray(first_level, dtype=np.float32),
                                     np.random.default_rng(0) if rng is None else rng)
    positive = np.clip(x, 0.0, None)
    if how == "clip" or not len(x):
        return positive
    total = x.sum(0, dtype=np.float64)
    if how == "balance":
        positive = _zero_smallest(positive, (positive - x).sum(0, dtype=np.float64))
    kept = positive.sum(0, dtype=np.float64)
    scale = np.where(kept > 0, np.clip(total, 0.0, None) / np.where(kept > 0, kept, 1.0), 0.0)
    return (positive * scale.astype(np.float32)).astype(np.float32)


def _round_to_first_level(x: np.ndarray, level: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Values in (0, level) of each cell to 0 or to its ``level``, up with probability value / level.

    Systematic sampling per gene (cells in a random order, one uniform offset): each value goes
    up with exactly its probability, and the number that go up is within one of the sum of the
    probabilities, so a gene's mean over the block moves by about one rounding at most instead
    of by the sampling noise of independent draws."""
    level = level[:, None]
    small = (x > 0) & (x < level)
    p = np.where(small, x / np.where(level > 0, level, 1.0), 0.0).astype(np.float64)
    order = np.argsort(rng.random(x.shape), axis=0)  # a random order of the cells for each gene
    ordered = np.take_along_axis(p, order, axis=0)
    after = np.cumsum(ordered, axis=0) + rng.random(x.shape[1])[None, :]
    before = after - ordered
    up = np.empty(x.shape, dtype=bool)
    np.put_along_axis(up, order, np.floor(after) > np.floor(before), axis=0)  # a unit boundary crossed
    return np.where(small, np.where(up, level, 0.0), x).astype(np.float32)


def _zero_smallest(positive: np.ndarray, negative_mass: np.ndarray) -> np.ndarray:
    """Per gene (column), set to 0 the smallest positive values whose running sum stays within
    that gene's ``negative_mass`` (the values clipped away); ties at the cut are kept."""
    ordered = np.sort(positive, axis=0)  # zeros (clipped values) first: they add nothing
    running = np.cumsum(ordered, axis=0, dtype=np.float64)
    cut = (running <= negative_mass[None, :]).sum(0)  # entries removed per gene, zeros included
    n = len(positive)
    threshold = np.where(cut < n, ordered[np.minimum(cut, n - 1), np.arange(positive.shape[1])], np.inf)
    return np.where(positive < threshold[None, :], 0.0, positive).astype(np.float32)


class OutputWriter:
    """Collect blocks of predicted cells (see the module notes).

    Parameters
    ----------
    var
        ``var`` of the output (index: the model's genes).
    uns
        ``uns['celldit']`` of the output.
    categorical
        obs columns made categorical.
    pca
        Optional ``(mean (G,), components (G, k))`` of the model's PCA space.
    counts
        Sample a counts layer (blocks must then come with library sizes).
    raw_layer
        Keep the flow output, before ``support``, in ``layers['flow']``.
    support
        ``"discrete"``, ``"balance"`` (default), ``"rescale"``, ``"clip"`` or ``"none"`` (see
        the module notes); a block is the cells of one condition integrated together.
        ``"discrete"`` needs each block's first count levels (:meth:`add`).
    path
        Stream to this ``.h5ad`` file or ``.zarr`` store (must not exist unless ``overwrite``);
        None: in memory.
    seed
        Seed of the counts sampling.
    """

    def __init__(self, var: pd.DataFrame, uns: dict[str, Any], categorical: list[str], *,
                 pca: tuple[np.ndarray, np.ndarray] | None = None, counts: bool = False, raw_layer: bool = False,
                 path: str | Path | None = None, overwrite: bool = False, seed: int = 0, support: str = "balance"):
        if support not in SUPPORTS:
            raise ValueError(f"support={support!r}: choose one of {list(SUPPORTS)}")
        self.support = support
        self.var, self.uns, self.categorical = var, uns, categorical
        self.pca, self.counts, self.raw_layer = pca, counts, raw_layer
        self.rng = np.random.default_rng([seed, 2])  # counts
        self.support_rng = np.random.default_rng([seed, 3])  # the rounding of "discrete"
        self.obs: list[pd.DataFrame] = []
        self.n_obs = 0
        self.path = None if path is None else Path(path)
        self._blocks: dict[str, list] = {"X": [], "counts": [], "flow": [], "pca": []}
        self._file = None
        if self.path is not None:
            if self.path.exists() and not overwrite:
                raise FileExistsError(f"{self.path} already exists: choose another file (or overwrite)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.zarr = self.path is not None and self.path.suffix == ".zarr"

    # ------------------------------------------------------------------ blocks
    def add(self, x: np.ndarray, obs: pd.DataFrame, library: np.ndarray | None = None,
            first_level: np.ndarray | None = None) -> None:
        """Add predicted cells ``x`` (n, G) with their ``obs`` (and library sizes for counts, and
        first count levels for ``support="discrete"``: :func:`first_count_level` of the source cells)."""
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise FloatingPointError("the model produced non-finite values: check the guidance scale and the "
                                     "solver settings")
        valid = to_support(x, self.support, first_level=first_level, rng=self.support_rng)
        parts = {"X": valid}
        if self.raw_layer:
            parts["flow"] = x
        if self.counts:
            if library is None:
                raise ValueError("counts=True needs the library size of each source cell (counts input, or a "
                                 "size-factor column)")
            rate = np.expm1(np.clip(valid, 0.0, None)).astype(np.float64) * (np.asarray(library, float)[:, None] / TARGET_SUM)
            parts["counts"] = sp.csr_matrix(self.rng.poisson(rate).astype(np.float32))
        if self.pca is not None:
            mean, components = self.pca
            parts["pca"] = ((valid - mean) @ components).astype(np.float32)
        self.obs.append(obs)
        self.n_obs += len(x)
        if self.path is None:
            for key, value in parts.items():
                self._blocks[key].append(value)
        else:
            self._append(parts)

    def _append(self, parts: dict[str, Any]) -> None:
        from anndata.io import sparse_dataset, write_elem

        if self._file is None:
            self._file = _open_store(self._tmp, self.zarr)
            _new_array(self._file, "X", parts["X"])
            layers = self._file.create_group("layers")
            layers.attrs["encoding-type"], layers.attrs["encoding-version"] = "dict", "0.1.0"
            for key in ("counts", "flow"):
                if key in parts:
                    write_elem(layers, key, parts[key] if sp.issparse(parts[key]) else sp.csr_matrix(parts[key]))
            obsm = self._file.create_group("obsm")
            obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
            if "pca" in parts:
                _new_array(obsm, "X_pca", parts["pca"])
            return
        _extend(self._file["X"], parts["X"])
        for key in ("counts", "flow"):
            if key in parts:
                value = parts[key] if sp.issparse(parts[key]) else sp.csr_matrix(parts[key])
                sparse_dataset(self._file["layers"][key]).append(value)
        if "pca" in parts:
            _extend(self._file["obsm"]["X_pca"], parts["pca"])

    # ------------------------------------------------------------------ finish
    def _obs(self) -> pd.DataFrame:
        obs = pd.concat(self.obs) if self.obs else pd.DataFrame(index=pd.Index([], dtype=str))
        for key in self.categorical:
            if key in obs.columns:
                obs[key] = pd.Categorical(obs[key].astype(str))
        return obs

    def finish(self) -> AnnData:
        """The output AnnData (in memory), or the written file opened backed (streaming)."""
        obs = self._obs()
        if self.path is None:
            b = self._blocks
            x = np.concatenate(b["X"]) if b["X"] else np.zeros((0, len(self.var)), np.float32)
            out = AnnData(x, obs=obs, var=self.var.copy())
            if b["counts"]:
                out.layers["counts"] = sp.vstack(b["counts"]).tocsr()
            if b["flow"]:
                out.layers["flow"] = np.concatenate(b["flow"])
            if b["pca"]:
                out.obsm["X_pca"] = np.concatenate(b["pca"])
            out.uns["celldit"] = self.uns
            return out
        return self._close(obs)

    def _close(self, obs: pd.DataFrame) -> AnnData:
        from anndata.io import write_elem

        from ..data.files import read_cells

        try:
            if self._file is None:  # no cell at all
                empty = AnnData(obs=obs, var=self.var)
                empty.write_zarr(self._tmp) if self.zarr else empty.write_h5ad(self._tmp)
            else:
                f = self._file
                write_elem(f, "obs", obs)
                write_elem(f, "var", self.var)
                write_elem(f, "uns", {"celldit": self.uns})
                for key in ("varm", "obsp", "varp"):
                    write_elem(f, key, {})
                f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
                _close_store(f)
                self._file = None
            _replace(self._tmp, self.path)
        finally:
            if self._file is not None:
                _close_store(self._file)
            _remove(self._tmp)
        return read_cells(self.path, "out", backed=True)

    def abort(self) -> None:
        """Drop a half-written file (an error while predicting)."""
        if self._file is not None:
            _close_store(self._file)
            self._file = None
        if self.path is not None:
            _remove(self._tmp)


# ---------------------------------------------------------------------- h5py files and zarr stores alike
def _open_store(path: Path, zarr_store: bool) -> Any:
    """A new HDF5 file, or a zarr store (in the zarr format anndata writes)."""
    if zarr_store:
        import anndata as ad
        import zarr

        return zarr.open_group(str(path), mode="w", zarr_format=ad.settings.zarr_write_format)
    import h5py

    return h5py.File(path, "w")


def _new_array(group: Any, name: str, data: np.ndarray) -> None:
    """A dense (n, k) array that grows along rows, encoded as anndata expects."""
    chunks = (min(1024, max(1, len(data))), data.shape[1])
    if hasattr(group, "create_dataset") and type(group).__module__.startswith("h5py"):
        d = group.create_dataset(name, data=data, maxshape=(None, data.shape[1]), chunks=chunks)
    else:
        d = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
        d[:] = data
    d.attrs["encoding-type"], d.attrs["encoding-version"] = "array", "0.2.0"


def _extend(array: Any, data: np.ndarray) -> None:
    n = array.shape[0]
    array.resize((n + len(data), array.shape[1]))
    array[n:] = data


def _close_store(store: Any) -> None:
    if hasattr(store, "close"):
        store.close()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _replace(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` onto ``path``; an existing store (overwrite) is moved aside first
    and deleted only once the new one is in place."""
    if path.is_dir():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def check_output_size(n_cells: int, n_genes: int, out: Any) -> None:
    """Refuse an output of ``n_cells`` x ``n_genes`` that cannot fit: in memory (``out=None``)
    or on ``out``'s disk (float32 X at 80% of what there is; layers add to it)."""
    from ..io import physical_memory

    need = n_cells * n_genes * 4
    if out is None:
        have, where, hint = physical_memory(), "in memory", "; write them to a file with out= (--out)"
    else:
        have, where, hint = shutil.disk_usage(Path(out).resolve().parent).free, f"on the disk of {str(out)!r}", ""
    if have and need > 0.8 * have:
        raise ValueError(f"{n_cells:,} cells x {n_genes:,} genes need at least {need / 2**30:.1f} GiB "
                         f"{where}, which has {have / 2**30:.1f} GiB{hint}; ask for fewer cells")
