"""Shared test settings.

The suite's models are tiny: one intra-op thread is as fast as two and does not stall
when another process holds the second core (CI machines have two).
"""

from pathlib import Path

import torch

torch.set_num_threads(1)

#: the real data sets beside the repository (``../shared/data``)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
