"""The Lightning training plan: a network and a flow process, AdamW, warmup and EMA.

The split follows scvi-tools: the network (any ``nn.Module`` the flow can call) and the flow
process (:class:`celldit.flow.RectifiedFlow`) are built outside and passed in; the plan only
owns optimisation. Batches become a loss through one hook, :meth:`FlowTrainingPlan.batch_to_loss`,
which a data-specific plan (e.g. for cells with a control-cell source) overrides.

Time convention (fixed across celldit): ``t = 0`` is the source (noise or a control cell),
``t = 1`` is data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..flow import RectifiedFlow, integrate, velocity_fn
from .callbacks import NonFiniteLossError

LR_SCHEDULES = ("constant", "cosine")


class EMA(AveragedModel):
    """``AveragedModel`` with ``get_ema_multi_avg_fn(decay)``, picklable (for ``ddp_spawn``).

    The averaging function torch builds is a closure; it is dropped when pickling and rebuilt
    from ``decay`` when unpickling. ``ema.module`` is the averaged network.
    """

    def __init__(self, network: nn.Module, decay: float):
        super().__init__(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.decay = decay

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["multi_avg_fn"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.multi_avg_fn = get_ema_multi_avg_fn(self.decay)


class FlowTrainingPlan(L.LightningModule):
    """Train a velocity network with rectified flow.

    Parameters
    ----------
    network
        The model, called as ``network(x_t, t * flow.time_scale, **conditioning)``.
    flow
        The flow process; ``RectifiedFlow()`` (uniform times) when ``None``.
    lr
        Peak AdamW learning rate.
    weight_decay
        AdamW weight decay (DiT uses 0).
    betas
        AdamW betas.
    warmup_steps
        Linear learning-rate warmup from 0 over this many optimizer steps.
    lr_schedule
        ``"constant"`` after warmup (DiT's choice) or ``"cosine"`` decay to
        ``min_lr_ratio * lr`` at the trainer's last step.
    min_lr_ratio
        Final learning rate of the cosine schedule, as a fraction of ``lr``.
    ema_decay
        Decay of the exponential moving average of the weights (DiT: 0.9999). ``None`` or 0
        disables EMA. The EMA is updated after every optimizer step, is saved in the
        checkpoint, and is the network used by :meth:`sample`.

    Notes
    -----
    Gradient clipping, precision, accumulation and the distributed strategy are the
    ``lightning.Trainer``'s business (see :func:`celldit.train.build_trainer`). With DDP each
    rank's loss is the mean over its part of the batch; gradients are averaged across ranks,
    so with equal shares a step equals one on the global batch.
    """

    def __init__(
        self,
        network: nn.Module,
        flow: RectifiedFlow | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        ema_decay: float | None = 0.9999,
    ):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.network = network
        self.flow = flow if flow is not None else RectifiedFlow()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.lr_schedule, self.min_lr_ratio = warmup_steps, lr_schedule, min_lr_ratio
        self.ema_decay = ema_decay or None
        self.ema: EMA | None = None
        if self.ema_decay:
            self.ema = EMA(network, self.ema_decay)
            self.ema.requires_grad_(False)  # never trained; also keeps DDP from expecting its grads
        self.save_hyperparameters(ignore=["network", "flow"])

    # -- the hook a data-specific plan overrides ------------------------------------------
    def batch_to_loss(self, batch: Any) -> torch.Tensor:
        """Turn one batch into the scalar training loss.

        Accepted batches:

        * ``(x1, y)``: data and class labels (image latents); the source is Gaussian noise
          and times are drawn by the flow.
        * a mapping with ``"x1"`` and optionally ``"x0"`` (source at t = 0), ``"t"`` ((B,)
          times), ``"weight"`` ((B,) sample weights); every other key is passed to the
          network as conditioning (``"y"``, ``"context"`` ...).
        """
        if isinstance(batch, Mapping):
            batch = dict(batch)
            if "x1" not in batch:
                raise KeyError(f"a mapping batch needs the data under 'x1'; got keys {sorted(batch)}")
            x1 = batch.pop("x1")
            x0, t, weight = batch.pop("x0", None), batch.pop("t", None), batch.pop("weight", None)
            return self.flow.loss(self.network, x1, x0=x0, t=t, weight=weight, **batch)
        if isinstance(batch, Sequence) and len(batch) == 2:
            x1, y = batch
            return self.flow.loss(self.network, x1, y=y)
        raise TypeError(
            "batch_to_loss expects (x1, y) or a mapping with 'x1' (and optional 'x0', 't', "
            f"'weight', conditioning); got {type(batch).__name__}. Override batch_to_loss for other data."
        )

    # -- Lightning -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, **conditioning: Any) -> torch.Tensor:
        """The online network's velocity at flow times ``t`` in [0, 1]."""
        return self.flow.velocity(self.network, x, t, **conditioning)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.batch_to_loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the training loss became {loss.item()} at step {self.global_step}: lower the "
                                     "learning rate (lr) or check the input values; nothing was saved")
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=_batch_size(batch))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.batch_to_loss(batch)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=_batch_size(batch))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.network.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step``: linear warmup, then constant or cosine."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        total = self._total_steps()
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError("the cosine schedule needs the plan attached to a Trainer")
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the cosine schedule needs a finite run: set max_steps or max_epochs")
        return int(total)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the online weights into the EMA (the first call copies them); buffers are copied."""
        if self.ema is None:
            return
        self.ema.update_parameters(self.network)
        for b_ema, b in zip(self.ema.module.buffers(), self.network.buffers()):
            b_ema.copy_(b)

    # -- resuming: the training noise continues where it stopped --------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the global RNG draws training times, noise and condition dropout; saved at the end of
        # a step, it is what the next step of an uninterrupted run would start from
        checkpoint["celldit_rng"] = {"torch": torch.get_rng_state(),
                                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_rng = checkpoint.get("celldit_rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # applied right before the first resumed step: building the dataloader in between
        # draws from the global RNG too
        state = getattr(self, "_resume_rng", None)
        if state is not None:
            torch.set_rng_state(state["torch"])
            if state["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
            self._resume_rng = None

    # -- sampling ------------------------------------------------------------------------
    def sampling_network(self, use_ema: bool = True) -> nn.Module:
        """The network used to sample: the EMA weights when there are any (and ``use_ema``)."""
        return self.ema.module if (use_ema and self.ema is not None) else self.network

    @torch.no_grad()
    def sample(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        cfg_scale: float = 1.0,
        steps: int = 50,
        method: str = "euler",
        use_ema: bool = True,
        guidance_channels: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Integrate from the source ``x0`` at t = 0 to data at t = 1.

        Parameters
        ----------
        x0
            Source batch (e.g. ``torch.randn``) on the plan's device.
        cond, uncond
            Conditional and unconditional network kwargs (e.g. ``{"y": labels}`` and
            ``{"y": null labels}``); ``uncond`` is only needed for ``cfg_scale != 1``.
        cfg_scale
            Classifier-free guidance scale (1 = conditional velocity).
        steps, method
            Solver settings of :func:`celldit.flow.integrate`.
        use_ema
            Sample with the EMA weights (default) or the online ones.
        guidance_channels
            Guide only the first k channels (the original DiT's 3); ``None`` guides all.
        batch_size
            Split the work into chunks of this many samples (tensor kwargs are split too).
        """
        net = self.sampling_network(use_ema)
        was_training = net.training
        net.eval()
        try:
            n = x0.shape[0]
            step = batch_size or n
            chunks = []
            for s in range(0, n, step):
                sl = slice(s, s + step)
                c = {k: v[sl] if torch.is_tensor(v) and v.shape[:1] == (n,) else v for k, v in (cond or {}).items()}
                u = None if uncond is None else {
                    k: v[sl] if torch.is_tensor(v) and v.shape[:1] == (n,) else v for k, v in uncond.items()
                }
                v_fn = velocity_fn(net, self.flow, c, u, cfg_scale=cfg_scale, guidance_channels=guidance_channels)
                chunks.append(integrate(v_fn, x0[sl], 0.0, 1.0, steps=steps, method=method))
            return torch.cat(chunks, dim=0)
        finally:
            net.train(was_training)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Mapping):
        x = batch.get("x1")
    elif isinstance(batch, Sequence) and batch:
        x = batch[0]
    else:
        return None
    return int(x.shape[0]) if torch.is_tensor(x) else None
