"""Settings of a training run, shared by cell and image models.

:class:`FitConfig` holds how long and how to optimise (the arguments of ``fit``);
its ``trainer`` section, a :class:`TrainerConfig`, holds how Lightning runs it (hardware,
precision, strategy, logging). Both are the one source of their defaults: the Python API,
the ``celldit fit`` / ``celldit image train`` command lines (``--max-steps``,
``--trainer.accelerator`` ...) and ``--print-config`` are generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import check_options, from_mapping, option

__all__ = ["FitConfig", "TrainerConfig"]

LOGGERS = ("csv", "tensorboard")


@dataclass
class TrainerConfig:
    """How Lightning runs the training (the ``trainer`` section of a run's settings).

    Attributes
    ----------
    accelerator
        "auto" (CUDA when a GPU is visible, else CPU), "cpu", "gpu", "cuda" ... (Lightning).
    devices
        Devices per node: a count, a list of indices, or "auto" (Lightning).
    num_nodes
        Nodes of a multi-node run (Lightning).
    strategy
        "auto", "ddp", "ddp_spawn", "fsdp" ... (Lightning; celldit has no launcher of its own).
    precision
        Lightning precision ("32-true", "bf16-mixed" ...); null: bf16-mixed on CUDA, 32-true elsewhere.
    compile
        torch.compile the network (CUDA only; ignored elsewhere with a note).
    gradient_clip_val
        Clip the global gradient norm to this value (null or 0: no clipping).
    accumulate_grad_batches
        Batches whose gradients are summed before each optimizer step.
    deterministic
        Lightning's deterministic flag (null: Lightning's default).
    logger
        Where metrics are logged besides the model folder's losses.csv: "csv" (Lightning's
        CSVLogger), "tensorboard" (needs the tensorboard package) or null (none). Loggers
        write under the run folder (see fit's run_dir).
    log_every_n_steps
        Period, in steps, of logged metrics, and of the loss line printed on stderr when it is
        not a terminal (batch jobs).
    progress_bar
        Show Lightning's progress bar; null: only when stderr is a terminal.
    checkpoint_every_n_steps
        Period, in steps, of resumable .ckpt files (written when there is a run folder).
    save_top_k
        Step checkpoints kept besides last.ckpt (-1: all).
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    num_nodes: int = option(1, ge=1)
    strategy: str = "auto"
    precision: str | None = None
    compile: bool = False
    gradient_clip_val: float | None = option(1.0, ge=0)
    accumulate_grad_batches: int = option(1, ge=1)
    deterministic: bool | None = None
    logger: str | None = option("csv", choices=LOGGERS)
    log_every_n_steps: int = option(50, ge=1)
    progress_bar: bool | None = None
    checkpoint_every_n_steps: int = option(500, ge=1)
    save_top_k: int = option(1, ge=-1)

    def __post_init__(self) -> None:
        check_options(self)
        if isinstance(self.devices, int) and self.devices < 1:
            raise ValueError(f"TrainerConfig: devices={self.devices}: must be >= 1 (or 'auto', or a list of indices)")


@dataclass
class FitConfig:
    """How long and how to optimise: AdamW with warmup, an optional cosine decay and an EMA
    of the weights. The defaults are the original DiT's (images); cell models override some.

    Attributes
    ----------
    max_steps
        Optimizer steps (the total, also when resuming).
    batch_size
        Samples per step (per process).
    lr
        Peak learning rate of AdamW.
    weight_decay
        AdamW weight decay.
    betas
        AdamW betas.
    warmup_steps
        Linear learning-rate warmup from 0 over this many steps.
    lr_schedule
        "constant" after warmup, or "cosine" decay to min_lr_ratio * lr at the last step.
    min_lr_ratio
        Final learning rate of the cosine schedule, as a fraction of lr.
    ema_decay
        Decay of the exponential moving average of the weights, used to sample (null or 0: none).
    seed
        Seed of the data stream and the training noise (null: the model's seed).
    trainer
        How Lightning runs the training (see TrainerConfig).
    """

    max_steps: int = option(1000, ge=1)
    batch_size: int = option(256, ge=1)
    lr: float = option(1e-4, gt=0, le=10.0)
    weight_decay: float = option(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = option(0, ge=0)
    lr_schedule: str = option("constant", choices=("constant", "cosine"))
    min_lr_ratio: float = option(0.0, ge=0, le=1)
    ema_decay: float | None = option(0.9999, ge=0, lt=1)
    seed: int | None = option(0, ge=0, le=2**32 - 1)
    trainer: TrainerConfig = option(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.trainer = from_mapping(TrainerConfig, self.trainer, "trainer")
        check_options(self)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"FitConfig: betas={self.betas}: each must be in [0, 1)")
