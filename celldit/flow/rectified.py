"""Rectified flow: the straight-line interpolant, time sampling and the training loss.

Convention (fixed across celldit): ``t`` lies in [0, 1]; ``t = 0`` is the source (Gaussian
noise or a control cell), ``t = 1`` is data. ``x_t = (1 - t) x0 + t x1`` and the network
learns the velocity ``v = x1 - x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..options import check_options, option

TIME_SAMPLERS = ("uniform", "logit_normal")


@dataclass
class RectifiedFlow:
    """The rectified-flow process around any network ``model(x, t_scaled, **kwargs)``.

    Its fields are its settings (saved with a model, and the ``flow`` section of a run's
    config).

    Attributes
    ----------
    time_sampling
        Training times: "uniform" (t ~ U[0, 1]) or "logit_normal" (t = sigmoid(N(logit_mean,
        logit_std^2)), SD3's choice, which spends more steps at mid times).
    logit_mean
        Mean of the logit-normal time distribution.
    logit_std
        Standard deviation of the logit-normal time distribution.
    time_scale
        The network receives t * time_scale; 1000 puts flow time on the scale of DiT's
        diffusion steps, the range its sinusoidal timestep embedder was designed for.
    """

    time_sampling: str = option("uniform", choices=TIME_SAMPLERS)
    logit_mean: float = 0.0
    logit_std: float = option(1.0, gt=0)
    time_scale: float = option(1000.0, gt=0)

    def __post_init__(self) -> None:
        check_options(self)

    # -- the process ---------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw (n,) training times in [0, 1]."""
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    @staticmethod
    def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x0 + t x1`` with (B,) times broadcast over the other dims."""
        t = t.reshape(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
        return (1 - t) * x0 + t * x1

    @staticmethod
    def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The velocity of the straight path, ``x1 - x0``."""
        return x1 - x0

    # -- the network as a velocity field ---------------------------------------------
    def velocity(self, model: nn.Module | Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """The network's velocity at ``(x, t)``: ``model(x, t * time_scale, **model_kwargs)``.

        A model that predicts extra channels (DiT's ``learn_sigma``) has them dropped: the
        velocity is the first ``x.shape[1]`` channels.
        """
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = model(x, t * self.time_scale, **model_kwargs)
        if out.ndim == x.ndim and out.ndim > 2 and out.shape[1] != x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    def loss(
        self,
        model: nn.Module | Callable[..., torch.Tensor],
        x1: torch.Tensor,
        x0: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Mean squared error between the predicted and the straight-path velocity.

        Parameters
        ----------
        model
            The network.
        x1
            Data batch (t = 1).
        x0
            Source batch (t = 0); standard Gaussian noise when ``None``.
        t
            (B,) times; drawn with :meth:`sample_t` when ``None``.
        weight
            Optional (B,) per-sample weights (normalised by their sum).
        model_kwargs
            Conditioning passed to the network (labels, condition tokens ...).
        """
        if x0 is None:
            x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        if x0.shape != x1.shape:
            raise ValueError(f"source x0 {tuple(x0.shape)} and data x1 {tuple(x1.shape)} differ in shape")
        if t is None:
            t = self.sample_t(x1.shape[0], x1.device, generator)
        xt = self.interpolate(x0, x1, t)
        v_hat = self.velocity(model, xt, t, **model_kwargs)
        per_sample = (v_hat.float() - self.target_velocity(x0, x1).float()).pow(2).flatten(1).mean(1)
        if weight is None:
            return per_sample.mean()
        return (per_sample * weight).sum() / weight.sum().clamp_min(1e-12)
