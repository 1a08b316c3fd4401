"""Callbacks used by the training helpers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class LossHistory(L.Callback):
    """Record the training loss of every optimizer step, averaged over ranks.

    Parameters
    ----------
    path
        Optional JSON file written by rank 0 at the end of training with ``losses``
        (one per step), ``steps`` (the global step after each) and ``wall_s``. Useful when
        the training runs in other processes (``ddp_spawn``).
    print_every
        Print ``step, mean loss of the last print_every steps, elapsed s`` on rank 0 every
        this many steps (a lightweight alternative to the progress bar in logs).
    """

    def __init__(self, path: str | Path | None = None, print_every: int | None = None):
        self.path = None if path is None else Path(path)
        self.print_every = print_every
        self.losses: list[float] = []
        self.steps: list[int] = []
        self._t0: float | None = None
        self.wall_s: float = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        self.losses.append(float(loss))
        self.steps.append(int(trainer.global_step))
        step = int(trainer.global_step)
        if self.print_every and step % self.print_every == 0 and trainer.is_global_zero:
            elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
            print(f"step {step}  loss {self.smoothed(self.print_every):.4f}  {elapsed:.1f}s", flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is not None:
            self.wall_s = time.perf_counter() - self._t0
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"losses": self.losses, "steps": self.steps, "wall_s": self.wall_s}))

    def smoothed(self, window: int = 50) -> float:
        """Mean of the last ``window`` recorded losses (NaN when none)."""
        tail = self.losses[-window:]
        return float(torch.tensor(tail).mean()) if tail else float("nan")
