"""Training: settings, the Lightning plan (network + flow, AdamW, EMA), callbacks and the trainer helper."""

from .callbacks import LossHistory
from .config import FitConfig, TrainerConfig
from .plan import FlowTrainingPlan
from .trainer import build_trainer, default_precision, fit, maybe_compile, resolve_accelerator

__all__ = ["FitConfig", "FlowTrainingPlan", "LossHistory", "TrainerConfig", "build_trainer", "default_precision",
           "fit", "maybe_compile", "resolve_accelerator"]
