"""Integrating a learned velocity field: fixed-step solvers, adaptive ODE, CFG, inversion.

A velocity function has the signature ``v(x, t) -> dx/dt`` with ``t`` a (B,) tensor of flow
times in [0, 1] (``t = 0`` source, ``t = 1`` data). Generation integrates from 0 to 1;
inversion integrates the same field from 1 back to 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .rectified import RectifiedFlow

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _euler(v: VelocityFn, x: torch.Tensor, t: torch.Tensor, dt: float) -> torch.Tensor:
    return x + dt * v(x, t)


def _midpoint(v: VelocityFn, x: torch.Tensor, t: torch.Tensor, dt: float) -> torch.Tensor:
    return x + dt * v(x + 0.5 * dt * v(x, t), t + 0.5 * dt)


def _heun(v: VelocityFn, x: torch.Tensor, t: torch.Tensor, dt: float) -> torch.Tensor:
    k1 = v(x, t)
    k2 = v(x + dt * k1, t + dt)
    return x + 0.5 * dt * (k1 + k2)


def _rk4(v: VelocityFn, x: torch.Tensor, t: torch.Tensor, dt: float) -> torch.Tensor:
    k1 = v(x, t)
    k2 = v(x + 0.5 * dt * k1, t + 0.5 * dt)
    k3 = v(x + 0.5 * dt * k2, t + 0.5 * dt)
    k4 = v(x + dt * k3, t + dt)
    return x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


# name -> (one step, velocity evaluations per step); a new solver is one function + one line
FIXED_STEP_SOLVERS: dict[str, tuple[Callable[..., torch.Tensor], int]] = {
    "euler": (_euler, 1),
    "midpoint": (_midpoint, 2),
    "heun": (_heun, 2),
    "rk4": (_rk4, 4),
}
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
# every name `integrate(method=)` accepts ("adaptive": dopri5)
SOLVERS = (*FIXED_STEP_SOLVERS, "adaptive", *ADAPTIVE_SOLVERS)


def integrate(
    velocity: VelocityFn,
    x: torch.Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    steps: int = 50,
    method: str = "euler",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t0`` to ``t1``.

    Parameters
    ----------
    velocity
        ``v(x, t)`` with ``t`` a (B,) tensor.
    x
        State at ``t0``.
    t0, t1
        Start and end times; ``t1 < t0`` integrates backwards (inversion).
    steps
        Number of fixed steps (ignored by adaptive solvers).
    method
        ``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"``, or an adaptive torchdiffeq
        solver (``"dopri5"``, ``"dopri8"``, ``"bosh3"``, ``"adaptive_heun"``; ``"adaptive"``
        means ``"dopri5"``).
    rtol, atol
        Tolerances of adaptive solvers.
    return_trajectory
        Return the list of states at every step (fixed-step solvers) instead of the end state.
    """
    if method == "adaptive":
        method = "dopri5"
    if method in ADAPTIVE_SOLVERS:
        from torchdiffeq import odeint

        def f(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            return velocity(state, t.expand(state.shape[0]).to(state.dtype))

        times = torch.tensor([t0, t1], dtype=torch.float32, device=x.device)
        out = odeint(f, x, times, method=method, rtol=rtol, atol=atol)
        return list(out) if return_trajectory else out[-1]
    if method not in FIXED_STEP_SOLVERS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {list(FIXED_STEP_SOLVERS) + list(ADAPTIVE_SOLVERS)}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step, _ = FIXED_STEP_SOLVERS[method]
    dt = (t1 - t0) / steps
    trajectory = [x]
    for i in range(steps):
        t = torch.full((x.shape[0],), t0 + i * dt, device=x.device, dtype=torch.float32)
        x = step(velocity, x, t, dt)
        if return_trajectory:
            trajectory.append(x)
    return trajectory if return_trajectory else x


def invert(velocity: VelocityFn, x1: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Map data at ``t = 1`` back to its source at ``t = 0`` along the same field."""
    return integrate(velocity, x1, t0=1.0, t1=0.0, **kwargs)


def _concat_kwargs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    if set(a) != set(b):
        raise ValueError(f"conditional and unconditional kwargs differ: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k]], dim=0) if torch.is_tensor(a[k]) else a[k] for k in a}


def velocity_fn(
    model: torch.nn.Module | Callable[..., torch.Tensor],
    flow: RectifiedFlow,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    cfg_scale: float = 1.0,
    guidance_channels: int | None = None,
) -> VelocityFn:
    """Wrap a network as a velocity function, with optional classifier-free guidance.

    ``v = v_uncond + cfg_scale * (v_cond - v_uncond)``, evaluated in one batched forward
    (conditional half first). ``guidance_channels=None`` guides every channel; ``3``
    reproduces the original DiT, which guides only the first three latent channels and
    keeps the conditional prediction on the others. ``cfg_scale == 1`` (or no ``uncond``)
    is the plain conditional velocity.
    """
    cond = dict(cond or {})
    if uncond is None or cfg_scale == 1.0:
        return lambda x, t: flow.velocity(model, x, t, **cond)
    both = _concat_kwargs(cond, uncond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = flow.velocity(model, torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **both)
        v_cond, v_uncond = out.chunk(2, dim=0)
        k = v_cond.shape[1] if guidance_channels is None else guidance_channels
        guided_part = v_uncond[:, :k] + cfg_scale * (v_cond[:, :k] - v_uncond[:, :k])
        return torch.cat([guided_part, v_cond[:, k:]], dim=1)

    return guided
