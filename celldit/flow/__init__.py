"""The flow process, separate from the network: interpolant, loss, couplings, solvers.

Time runs from ``t = 0`` (source: noise or a control cell) to ``t = 1`` (data).
"""

from .coupling import anchored_source, gaussian_source, noise_like, ot_pair_blocks, ot_pairing, ot_permutation
from .rectified import TIME_SAMPLERS, RectifiedFlow
from .sampling import ADAPTIVE_SOLVERS, FIXED_STEP_SOLVERS, integrate, invert, velocity_fn

__all__ = [
    "ADAPTIVE_SOLVERS", "FIXED_STEP_SOLVERS", "TIME_SAMPLERS", "RectifiedFlow", "anchored_source", "gaussian_source",
    "integrate", "invert", "noise_like", "ot_pair_blocks", "ot_pairing", "ot_permutation", "velocity_fn",
]
