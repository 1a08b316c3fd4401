"""Build a ``lightning.Trainer`` from a few settings, and fit a plan with it.

Everything distributed (DDP, FSDP, multi-node) comes from Lightning through the ``strategy``
string; celldit has no launcher of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


@dataclasses.dataclass
class TrainerSettings:
    """Settings of :func:`build_trainer` (also readable from a config mapping).

    Attributes
    ----------
    max_steps
        Optimizer steps to train for (the total, also when resuming).
    precision
        Lightning precision string; ``None`` picks ``"bf16-mixed"`` on CUDA and
        ``"32-true"`` elsewhere.
    compile
        ``torch.compile`` the network in place (only on CUDA; ignored elsewhere with a note).
    gradient_clip_val
        Clip the global gradient norm to this value (``None`` or 0: no clipping).
    accumulate_grad_batches
        Gradient accumulation.
    strategy
        Passed to Lightning as is: ``"auto"``, ``"ddp"``, ``"ddp_spawn"``, ``"fsdp"`` ...
    accelerator, devices, num_nodes
        Passed to Lightning as is.
    checkpoint_dir
        Where ``ModelCheckpoint`` writes ``.ckpt`` files (``last.ckpt`` + step-named ones);
        ``None`` disables checkpointing.
    checkpoint_every_n_steps
        Checkpoint period in optimizer steps.
    save_top_k
        How many step checkpoints to keep (-1: all).
    log_every_n_steps
        Logging period.
    progress_bar
        Show Lightning's progress bar.
    logger
        Log metrics as CSV under ``checkpoint_dir`` (or the working directory).
    seed
        If set, ``lightning.seed_everything(seed, workers=True)`` before building.
    deterministic
        Passed to Lightning.
    """

    max_steps: int = 1000
    precision: str | None = None
    compile: bool = False
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    devices: int | str | Sequence[int] = "auto"
    num_nodes: int = 1
    checkpoint_dir: str | None = None
    checkpoint_every_n_steps: int = 1000
    save_top_k: int = 1
    log_every_n_steps: int = 50
    progress_bar: bool = True
    logger: bool = False
    seed: int | None = None
    deterministic: bool | str | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrainerSettings:
        """Build from a mapping; unknown keys raise a ``KeyError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise KeyError(f"unknown trainer settings {unknown}; known: {sorted(names)}")
        return cls(**dict(config))


def resolve_accelerator(accelerator: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; others unchanged."""
    if accelerator in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def default_precision(accelerator: str = "auto") -> str:
    """``"bf16-mixed"`` on CUDA, ``"32-true"`` otherwise."""
    return "bf16-mixed" if resolve_accelerator(accelerator) == "cuda" else "32-true"


def build_trainer(
    settings: TrainerSettings | Mapping[str, Any] | None = None,
    callbacks: Sequence[L.Callback] = (),
    **overrides: Any,
) -> L.Trainer:
    """A ``lightning.Trainer`` for step-based flow training.

    Parameters
    ----------
    settings
        A :class:`TrainerSettings` or a mapping of its fields.
    callbacks
        Extra callbacks (a ``ModelCheckpoint`` is added when ``checkpoint_dir`` is set).
    overrides
        Field overrides, e.g. ``max_steps=10``.
    """
    if settings is None:
        settings = TrainerSettings()
    elif isinstance(settings, Mapping):
        settings = TrainerSettings.from_dict(settings)
    settings = dataclasses.replace(settings, **overrides)
    if settings.seed is not None:
        L.seed_everything(settings.seed, workers=True, verbose=False)
    precision = settings.precision or default_precision(settings.accelerator)
    cbs = list(callbacks)
    if settings.checkpoint_dir is not None:
        cbs.append(
            ModelCheckpoint(
                dirpath=settings.checkpoint_dir,
                filename="step{step:07d}",
                auto_insert_metric_name=False,
                every_n_train_steps=settings.checkpoint_every_n_steps,
                save_top_k=settings.save_top_k,
                monitor="step",
                mode="max",
                save_last=True,
            )
        )
    logger: Any = False
    if settings.logger:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(settings.checkpoint_dir or ".", name="logs")
    return L.Trainer(
        max_steps=settings.max_steps,
        max_epochs=-1,
        precision=precision,
        gradient_clip_val=settings.gradient_clip_val or None,
        accumulate_grad_batches=settings.accumulate_grad_batches,
        strategy=settings.strategy,
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        callbacks=cbs,
        enable_checkpointing=settings.checkpoint_dir is not None,
        log_every_n_steps=settings.log_every_n_steps,
        enable_progress_bar=settings.progress_bar,
        enable_model_summary=False,
        logger=logger,
        deterministic=settings.deterministic,
        default_root_dir=settings.checkpoint_dir,
    )


def maybe_compile(plan: L.LightningModule, enabled: bool, accelerator: str = "auto") -> bool:
    """``torch.compile`` ``plan.network`` in place (state-dict keys unchanged) on CUDA only.

    Returns whether it compiled. The EMA copy is not compiled (it only runs at sampling).
    """
    if not enabled:
        return False
    if resolve_accelerator(accelerator) != "cuda":
        import warnings

        warnings.warn("compile=True is only applied on CUDA; training uncompiled", stacklevel=2)
        return False
    plan.network.compile()
    return True


def fit(
    plan: L.LightningModule,
    datamodule: L.LightningDataModule | None = None,
    settings: TrainerSettings | Mapping[str, Any] | None = None,
    ckpt_path: str | Path | None = None,
    callbacks: Sequence[L.Callback] = (),
    train_dataloaders: Any = None,
    **overrides: Any,
) -> L.Trainer:
    """Build a trainer, compile when asked, and fit; ``ckpt_path`` resumes a ``.ckpt``.

    Resuming restores the weights, the EMA, the optimizer and scheduler states and the
    global step; training continues up to ``max_steps`` in total.
    """
    if isinstance(settings, Mapping):
        settings = TrainerSettings.from_dict(settings)
    settings = dataclasses.replace(settings or TrainerSettings(), **overrides)
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {ckpt_path}")
    trainer = build_trainer(settings, callbacks=callbacks)
    maybe_compile(plan, settings.compile, settings.accelerator)
    trainer.fit(
        plan,
        datamodule=datamodule,
        train_dataloaders=train_dataloaders,
        ckpt_path=None if ckpt_path is None else str(ckpt_path),
    )
    return trainer
