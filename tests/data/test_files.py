"""Opening cell files: what is not an AnnData, or is held open for writing, is named."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from celldit.data.files import read_cells


def test_not_an_h5ad_and_a_file_held_for_writing_are_named(tmp_path):
    bogus = tmp_path / "bogus.h5ad"
    bogus.write_bytes(b"not an hdf5 file" * 8)
    with pytest.raises(ValueError, match=r"DATA '.*bogus.h5ad' is not a readable .h5ad file"):
        read_cells(bogus)
    good = tmp_path / "cells.h5ad"
    ad.AnnData(np.ones((3, 2), np.float32)).write_h5ad(good)
    assert read_cells(good).shape == (3, 2)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); time.sleep(60)", str(good)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ValueError, match="another process has it open for writing"):
            read_cells(good, "--input", backed=True)
    finally:
        holder.kill()
        holder.wait()
    assert read_cells(good, backed=True).shape == (3, 2)
