"""Training: the Lightning plan (network + flow, AdamW, EMA), callbacks and the trainer helper."""

from .callbacks import LossHistory
from .module import FlowTrainingPlan
from .trainer import TrainerSettings, build_trainer, default_precision, fit, maybe_compile

__all__ = ["FlowTrainingPlan", "LossHistory", "TrainerSettings", "build_trainer", "default_precision", "fit", "maybe_compile"]
