"""Build a ``lightning.Trainer`` from a :class:`~celldit.train.config.TrainerConfig`, and fit a plan with it.

Everything distributed (DDP, FSDP, multi-node) comes from Lightning through the ``strategy``
string; celldit has no launcher of its own.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ..options import from_mapping
from .callbacks import CloseProcessGroup
from .config import TrainerConfig


def resolve_accelerator(accelerator: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; others unchanged."""
    if accelerator in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def default_precision(accelerator: str = "auto") -> str:
    """``"bf16-mixed"`` on CUDA, ``"32-true"`` otherwise."""
    return "bf16-mixed" if resolve_accelerator(accelerator) == "cuda" else "32-true"


def _loggers(config: TrainerConfig, run_dir: str | Path | None) -> list[Any]:
    if config.logger is None or run_dir is None:
        return []
    if config.logger == "tensorboard":
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            return [TensorBoardLogger(str(run_dir), name="logs", default_hp_metric=False)]
        except ModuleNotFoundError as err:  # tensorboard is an optional extra
            raise ValueError(f"trainer.logger='tensorboard' needs the tensorboard package ({err}); "
                             "pip install tensorboard, or use logger: csv") from None
    from lightning.pytorch.loggers import CSVLogger

    return [CSVLogger(str(run_dir), name="logs")]


# Lightning's start-up lines (devices found, an advert for a cloud logger) and warnings that do
# not apply to step-based training on a sharded stream (each worker's __len__ is its own share;
# runs shorter than the logging interval; a deprecation inside Lightning itself)
_NOT_FOR_USERS = (
    r".*`IterableDataset` has `__len__` defined.*",
    r".*smaller than the logging interval.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


def quiet_lightning() -> None:
    """Keep the terminal for celldit's own lines (loss, summary) and real warnings."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _NOT_FOR_USERS:
        warnings.filterwarnings("ignore", message=pattern)


def show_progress_bar(config: TrainerConfig) -> bool:
    """Whether Lightning's progress bar is on (``progress_bar=None``: when stderr is a terminal)."""
    return sys.stderr.isatty() if config.progress_bar is None else bool(config.progress_bar)


def build_trainer(
    config: TrainerConfig | Mapping[str, Any] | None = None,
    *,
    max_steps: int,
    run_dir: str | Path | None = None,
    seed: int | None = None,
    callbacks: Sequence[L.Callback] = (),
    val_check_interval: int | None = None,
) -> L.Trainer:
    """A ``lightning.Trainer`` for step-based flow training.

    Parameters
    ----------
    config
        A :class:`~celldit.train.config.TrainerConfig` (or a mapping of its fields).
    max_steps
        Optimizer steps to train for (the total, also when resuming).
    run_dir
        Run folder: Lightning loggers write under ``run_dir/logs`` and resumable checkpoints
        (``last.ckpt`` + step-named ones) go to ``run_dir/checkpoints``. ``None``: neither.
    seed
        If set, ``lightning.seed_everything(seed, workers=True)`` before building.
    callbacks
        Extra callbacks (a ``ModelCheckpoint`` is added when ``run_dir`` is set).
    val_check_interval
        Run the validation loop every this many training batches (None: no validation).
    """
    config = from_mapping(TrainerConfig, config, "trainer")
    quiet_lightning()
    if seed is not None:
        L.seed_everything(seed, workers=True, verbose=False)
    precision = config.precision or default_precision(config.accelerator)
    cbs = [*callbacks, CloseProcessGroup()]
    if run_dir is not None:
        cbs.append(
            ModelCheckpoint(
                dirpath=str(Path(run_dir) / "checkpoints"),
                filename="step{step:07d}",
                auto_insert_metric_name=False,
                every_n_train_steps=config.checkpoint_every_n_steps,
                save_top_k=config.save_top_k,
                monitor="step",
                mode="max",
                save_last=True,
            )
        )
    return L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        precision=precision,
        gradient_clip_val=config.gradient_clip_val or None,
        accumulate_grad_batches=config.accumulate_grad_batches,
        strategy=config.strategy,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        callbacks=cbs,
        enable_checkpointing=run_dir is not None,
        log_every_n_steps=config.log_every_n_steps,
        enable_progress_bar=show_progress_bar(config),
        enable_model_summary=False,
        logger=_loggers(config, run_dir) or False,
        deterministic=config.deterministic,
        default_root_dir=None if run_dir is None else str(run_dir),
        val_check_interval=val_check_interval,
        limit_val_batches=None if val_check_interval else 0,
        num_sanity_val_steps=0,
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
    config: TrainerConfig | Mapping[str, Any] | None = None,
    *,
    max_steps: int,
    run_dir: str | Path | None = None,
    seed: int | None = None,
    ckpt_path: str | Path | None = None,
    callbacks: Sequence[L.Callback] = (),
    train_dataloaders: Any = None,
    val_check_interval: int | None = None,
) -> L.Trainer:
    """Build a trainer (:func:`build_trainer`), compile when asked, and fit.

    ``ckpt_path`` resumes a ``.ckpt``: the weights, the EMA, the optimizer and scheduler
    states, the global step and the random state of the training noise are restored, and
    training continues up to ``max_steps`` in total.
    """
    config = from_mapping(TrainerConfig, config, "trainer")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {ckpt_path}")
    trainer = build_trainer(config, max_steps=max_steps, run_dir=run_dir, seed=seed, callbacks=callbacks,
                            val_check_interval=val_check_interval)
    maybe_compile(plan, config.compile, config.accelerator)
    trainer.fit(
        plan,
        datamodule=datamodule,
        train_dataloaders=train_dataloaders,
        ckpt_path=None if ckpt_path is None else str(ckpt_path),
    )
    return trainer


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads and limit BLAS to as many (None: leave both unchanged)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)
