"""Callbacks used by the training helpers, and the loss curve they record."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch

__all__ = ["CloseProcessGroup", "LossHistory", "NonFiniteLossError", "write_loss_curve"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite, or exploded: the run stopped and nothing was saved."""


class CloseProcessGroup(L.Callback):
    """Destroy a gloo process group when training ends (each rank, after a barrier).

    Lightning destroys only NCCL's, at exit. A CPU (gloo) worker that exits with its group
    alive can abort in gloo's threads ("terminate called without an active exception"), which
    fails a ``ddp_spawn`` run that had finished; this happened in about one run in six on a
    2-core machine. A later ``fit`` in the same process sets up a new group.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.barrier()
            dist.destroy_process_group()


class LossHistory(L.Callback):
    """Record the training loss of every optimizer step (averaged over ranks), print a loss
    line every ``print_every`` steps, and stop a diverging run.

    Parameters
    ----------
    path
        Optional JSON file written by rank 0 at the end of training with ``losses``
        (one per step), ``steps`` (the global step after each) and ``wall_s``. Useful when
        the training runs in other processes (``ddp_spawn``).
    print_every
        Print ``step N/M  loss L  (elapsed s)`` on rank 0 every this many steps: batch jobs,
        whose stderr is not a terminal, see progress without a progress bar.
    stream
        Where the loss lines go (default ``sys.stderr``).
    explode_factor
        Stop with :class:`NonFiniteLossError` when the smoothed loss exceeds this multiple of
        the smallest smoothed loss seen (after 20 steps); a NaN or infinite loss always stops
        the run. None: only non-finite losses stop it.
    """

    def __init__(self, path: str | Path | None = None, print_every: int | None = None, stream: TextIO | None = None,
                 explode_factor: float | None = 1e4):
        self.path = None if path is None else Path(path)
        self.print_every = print_every
        self.stream = stream
        self.explode_factor = explode_factor
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.val_losses: list[tuple[int, float]] = []  # (step, val_loss) of each validation
        self._t0: float | None = None
        self._best = math.inf
        self.wall_s: float = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        value, step = float(loss), int(trainer.global_step)
        self.losses.append(value)
        self.steps.append(step)
        self._check(value, step)
        if self.print_every and step % self.print_every == 0 and trainer.is_global_zero:
            elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
            print(f"step {step}/{trainer.max_steps}  loss {self.smoothed(self.print_every):.4f}  ({elapsed:.1f} s)",
                  file=self.stream or sys.stderr, flush=True)

    def _check(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the training loss became {value} at step {step}: lower the learning rate "
                                     "(lr) or check the input values; nothing was saved")
        if self.explode_factor is None or len(self.losses) < 20:
            return
        smooth = self.smoothed(10)
        self._best = min(self._best, smooth)
        if smooth > self.explode_factor * max(self._best, 1e-12):
            raise NonFiniteLossError(f"the training loss exploded to {smooth:.3g} at step {step} (best "
                                     f"{self._best:.3g}): lower the learning rate (lr); nothing was saved")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if value is not None and not trainer.sanity_checking:
            self.val_losses.append((int(trainer.global_step), float(value)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is not None:
            self.wall_s = time.perf_counter() - self._t0
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"losses": self.losses, "steps": self.steps, "wall_s": self.wall_s}))

    # saved in checkpoints, so that a resumed run keeps the whole curve
    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "steps": list(self.steps), "val_losses": list(self.val_losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses, self.steps = list(state_dict["losses"]), list(state_dict["steps"])
        self.val_losses = [tuple(v) for v in state_dict.get("val_losses", [])]

    def smoothed(self, window: int = 50) -> float:
        """Mean of the last ``window`` recorded losses (NaN when none)."""
        tail = self.losses[-window:]
        return float(torch.tensor(tail).mean()) if tail else float("nan")


def write_loss_curve(folder: str | Path, steps: list[int], losses: list[float], title: str = "training loss") -> dict[str, Path]:
    """Write ``losses.csv`` (step, loss) and ``loss.png`` (raw and smoothed) into ``folder``."""
    folder = Path(folder)
    csv = folder / "losses.csv"
    csv.write_text("step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in zip(steps, losses)))
    files = {"losses_csv": csv}
    if losses:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        window = max(1, len(losses) // 50)
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist() if len(losses) >= window else losses
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        ax.plot(steps, losses, lw=0.6, alpha=0.4, color="tab:blue", label="per step")
        ax.plot(steps[window - 1:], smooth, lw=1.5, color="tab:blue", label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(folder / "loss.png")
        plt.close(fig)
        files["loss_png"] = folder / "loss.png"
    return files
