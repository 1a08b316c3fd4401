"""Opening cell files: ``.h5ad`` (in memory or backed) and ``.zarr`` stores, with errors that
name the argument.

On disk ("backed"), nothing but ``obs`` and ``var`` is read on opening: an ``.h5ad`` opens
with anndata's ``backed="r"``; a ``.zarr`` store gets its matrices as anndata sparse datasets
(``anndata.io.sparse_dataset``) or zarr arrays, read in row chunks by
:class:`~celldit.data.rows.ExpressionRows` like a backed ``.h5ad``.
"""

from __future__ import annotations

from pathlib import Path

from anndata import AnnData

__all__ = ["is_zarr", "read_cells"]


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` names a zarr store (``.zarr``, or a folder holding ``.zgroup`` / ``zarr.json``)."""
    path = Path(path)
    return path.suffix == ".zarr" or (path.is_dir() and any((path / n).exists() for n in (".zgroup", "zarr.json")))


def read_cells(path: str | Path, what: str = "DATA", backed: bool = False) -> AnnData:
    """Open the AnnData at ``path`` (``.h5ad`` file or ``.zarr`` store).

    Parameters
    ----------
    path
        The file or store.
    what
        Its name in error messages (an argument: ``"DATA"``, ``"--input"`` ...).
    backed
        Leave the matrices on disk (see the module notes).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    ValueError
        It is not a readable AnnData file or store.
    """
    import anndata as ad

    path = Path(path)
    zarr_store = is_zarr(path)
    if not path.exists() or (path.is_dir() and not zarr_store):
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist" if not path.exists()
                                else f"{what} {str(path)!r} is a folder, not an .h5ad file or a .zarr store")
    kind = ".zarr store" if zarr_store else ".h5ad file"
    try:
        if not zarr_store:
            return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)
        return _open_zarr(path) if backed else ad.read_zarr(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        reason = " ".join(str(err).split())
        if "unable to lock file" in reason:  # HDF5's lock: another process has it open for writing
            reason = "another process has it open for writing (close it there first); " + reason
        raise ValueError(f"{what} {str(path)!r} is not a readable {kind}: {reason}") from None


def _open_zarr(path: Path) -> AnnData:
    """A zarr store with its matrices left on disk."""
    import zarr
    from anndata.io import read_elem, sparse_dataset

    group = zarr.open_group(str(path), mode="r")

    def lazy(elem):
        return sparse_dataset(elem) if isinstance(elem, zarr.Group) else elem

    layers = {k: lazy(group["layers"][k]) for k in group["layers"]} if "layers" in group else {}
    adata = AnnData(X=lazy(group["X"]) if "X" in group else None, obs=read_elem(group["obs"]),
                    var=read_elem(group["var"]), layers=layers)
    if "raw" in group and "X" in group["raw"]:
        raw = AnnData(X=lazy(group["raw"]["X"]), obs=adata.obs[[]], var=read_elem(group["raw"]["var"]))
        adata.raw = raw
    return adata
