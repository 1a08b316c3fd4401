"""Predicted cells as AnnData, in memory or streamed to an ``.h5ad`` file chunk by chunk.

Every block of predicted cells goes through the same steps:

* ``X`` (dense float32) is brought to the support of ``log1p`` expression (>= 0): a control
  cell plus a negative shift can dip below it. ``support="rescale"`` (default) sets negative
  values to 0 and scales each gene's positive values over the block so that its mean is
  unchanged (mean-preserving: clipping alone would raise the mean of every decreased gene);
  ``"clip"`` sets them to 0; ``"none"`` keeps the flow output. The flow output itself goes to
  ``layers['flow']`` when asked (``raw_layer=True``);
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
counts layer an appended CSR matrix); the file is renamed into place when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["OutputWriter", "SUPPORTS", "to_support"]

TARGET_SUM = 1e4
SUPPORTS = ("rescale", "clip", "none")


def to_support(x: np.ndarray, how: str = "rescale") -> np.ndarray:
    """``x`` (cells x genes, log1p space) on the support [0, inf) (see the module notes)."""
    if how == "none":
        return x
    positive = np.clip(x, 0.0, None)
    if how == "clip" or not len(x):
        return positive
    total, kept = x.sum(0, dtype=np.float64), positive.sum(0, dtype=np.float64)
    scale = np.where(kept > 0, np.clip(total, 0.0, None) / np.where(kept > 0, kept, 1.0), 0.0)
    return (positive * scale.astype(np.float32)).astype(np.float32)


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
        ``"rescale"``, ``"clip"`` or ``"none"`` (see the module notes); a block is the cells of
        one condition integrated together.
    path
        Stream to this ``.h5ad`` (must not exist unless ``overwrite``); None: in memory.
    seed
        Seed of the counts sampling.
    """

    def __init__(self, var: pd.DataFrame, uns: dict[str, Any], categorical: list[str], *,
                 pca: tuple[np.ndarray, np.ndarray] | None = None, counts: bool = False, raw_layer: bool = False,
                 path: str | Path | None = None, overwrite: bool = False, seed: int = 0, support: str = "rescale"):
        if support not in SUPPORTS:
            raise ValueError(f"support={support!r}: choose one of {list(SUPPORTS)}")
        self.support = support
        self.var, self.uns, self.categorical = var, uns, categorical
        self.pca, self.counts, self.raw_layer = pca, counts, raw_layer
        self.rng = np.random.default_rng([seed, 2])
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

    # ------------------------------------------------------------------ blocks
    def add(self, x: np.ndarray, obs: pd.DataFrame, library: np.ndarray | None = None) -> None:
        """Add predicted cells ``x`` (n, G) with their ``obs`` (and library sizes for counts)."""
        x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise FloatingPointError("the model produced non-finite values: check the guidance scale and the "
                                     "solver settings")
        valid = to_support(x, self.support)
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
        import h5py
        from anndata.io import sparse_dataset, write_elem

        if self._file is None:
            self._file = h5py.File(self._tmp, "w")
            g = parts["X"].shape[1]
            d = self._file.create_dataset("X", data=parts["X"], maxshape=(None, g), chunks=(min(1024, max(1, len(parts["X"]))), g))
            d.attrs["encoding-type"], d.attrs["encoding-version"] = "array", "0.2.0"
            layers = self._file.create_group("layers")
            layers.attrs["encoding-type"], layers.attrs["encoding-version"] = "dict", "0.1.0"
            for key in ("counts", "flow"):
                if key in parts:
                    write_elem(layers, key, parts[key] if sp.issparse(parts[key]) else sp.csr_matrix(parts[key]))
            obsm = self._file.create_group("obsm")
            obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
            if "pca" in parts:
                k = parts["pca"].shape[1]
                d = obsm.create_dataset("X_pca", data=parts["pca"], maxshape=(None, k), chunks=True)
                d.attrs["encoding-type"], d.attrs["encoding-version"] = "array", "0.2.0"
            return
        d = self._file["X"]
        d.resize(d.shape[0] + len(parts["X"]), axis=0)
        d[-len(parts["X"]):] = parts["X"]
        for key in ("counts", "flow"):
            if key in parts:
                value = parts[key] if sp.issparse(parts[key]) else sp.csr_matrix(parts[key])
                sparse_dataset(self._file["layers"][key]).append(value)
        if "pca" in parts:
            d = self._file["obsm"]["X_pca"]
            d.resize(d.shape[0] + len(parts["pca"]), axis=0)
            d[-len(parts["pca"]):] = parts["pca"]

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
        import anndata as ad
        from anndata.io import write_elem

        try:
            if self._file is None:  # no cell at all
                self.path is not None and AnnData(obs=obs, var=self.var).write_h5ad(self._tmp)
            else:
                f = self._file
                write_elem(f, "obs", obs)
                write_elem(f, "var", self.var)
                write_elem(f, "uns", {"celldit": self.uns})
                for key in ("varm", "obsp", "varp"):
                    write_elem(f, key, {})
                f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
                f.close()
                self._file = None
            os.replace(self._tmp, self.path)
        finally:
            if self._file is not None:
                self._file.close()
            if self._tmp.exists():
                self._tmp.unlink()
        return ad.read_h5ad(self.path, backed="r")

    def abort(self) -> None:
        """Drop a half-written file (an error while predicting)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None and self._tmp.exists():
            self._tmp.unlink()
