"""The flow process, separate from the network: interpolant, loss, couplings, solvers.

Time runs from ``t = 0`` (source: noise or a control cell) to ``t = 1`` (data).
"""

from .coupling import noise_like, ot_pairing
from .rectified import TIME_SAMPLERS, RectifiedFlow
from .sampling import ADAPTIVE_SOLVERS, FIXED_STEP_SOLVERS, integrate, invert, velocity_fn

__all__ = [
    "ADAPTIVE_SOLVERS", "FIXED_STEP_SOLVERS", "TIME_SAMPLERS", "RectifiedFlow",
    "integrate", "invert", "noise_like", "ot_pairing", "velocity_fn",
]
