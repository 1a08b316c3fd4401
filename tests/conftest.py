"""Shared test settings and the real data sets.

The suite's models are tiny: one intra-op thread is as fast as two and does not stall
when another process holds the second core (CI machines have two).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

#: the real data sets beside the repository (``../shared/data``)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    """Path of a real data file in ``../shared/data``.

    Outside CI a checkout without that folder skips the test, saying where the file was
    looked for; under CI (``CI`` set) a missing file fails, so real-data tests never pass
    by being skipped.
    """
    path = SHARED_DATA / name
    if not path.is_file():
        message = f"real data file {path} not found (the shared data folder sits beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_diffusers():
    """Import diffusers (the ``parity`` extra). Without it the test is skipped, saying how
    to install it; under CI, which installs the extra, a failed import fails the test."""
    try:
        import diffusers
    except ImportError as err:
        message = f"diffusers is the parity reference: pip install 'celldit[parity]' ({err})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return diffusers
