"""Atomic writes of `celldit.io`: a file appears only when complete, and nothing a user saved
is overwritten unless asked."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from celldit.io import write_h5ad_atomic, write_text_atomic


class _Failing(ad.AnnData):
    """An AnnData whose write starts a file, then fails half way."""

    def write_h5ad(self, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")


def test_h5ad_written_complete_and_an_existing_file_kept(tmp_path):
    cells = ad.AnnData(np.arange(6, dtype=np.float32).reshape(2, 3))
    path = write_h5ad_atomic(cells, tmp_path / "sub" / "cells.h5ad")
    np.testing.assert_array_equal(ad.read_h5ad(path).X, cells.X)
    with pytest.raises(FileExistsError, match="already exists"):
        write_h5ad_atomic(ad.AnnData(np.zeros((1, 3), dtype=np.float32)), path)
    np.testing.assert_array_equal(ad.read_h5ad(path).X, cells.X)  # untouched
    write_h5ad_atomic(ad.AnnData(np.ones((1, 3), dtype=np.float32)), path, overwrite=True)
    assert ad.read_h5ad(path).n_obs == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["cells.h5ad"]  # no temporary left


def test_a_write_that_fails_half_way_leaves_nothing_behind(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        write_h5ad_atomic(_Failing(np.zeros((2, 2), dtype=np.float32)), tmp_path / "cells.h5ad")
    assert list(tmp_path.iterdir()) == []
    write_text_atomic("old\n", tmp_path / "report.json")
    with pytest.raises(OSError, match="disk full"):
        write_h5ad_atomic(_Failing(np.zeros((2, 2), dtype=np.float32)), tmp_path / "report.json", overwrite=True)
    assert (tmp_path / "report.json").read_text() == "old\n"  # the earlier file is kept whole
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
