"""Baselines that predict cells, so they are scored exactly like a model.

:data:`BASELINES` maps a name to its class; a new baseline is one class (a ``shift``
method on :class:`~celldit.eval.baselines.base.Baseline`) and one line here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from anndata import AnnData

from ...data.spec import PerturbationSpec
from .base import Baseline, prediction_requests
from .linear import Linear, gene_pca_embedding
from .shifts import Additive, MeanShift, NoChange, TrainMean

__all__ = ["BASELINES", "Additive", "Baseline", "Linear", "MeanShift", "NoChange", "TrainMean",
           "gene_pca_embedding", "make_baseline", "prediction_requests", "run_baselines"]

BASELINES: dict[str, type[Baseline]] = {
    "no_change": NoChange,
    "train_mean": TrainMean,
    "mean_shift": MeanShift,
    "additive": Additive,
    "linear": Linear,
}


def make_baseline(name: str, **kwargs) -> Baseline:
    """A baseline by name (one of :data:`BASELINES`); kwargs go to its constructor."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    return BASELINES[name](**kwargs)


def run_baselines(train: AnnData, control: AnnData, requests: pd.DataFrame,
                  spec: PerturbationSpec, names: Sequence[str], seed: int = 0,
                  options: Mapping[str, dict] | None = None) -> dict[str, AnnData]:
    """Fit each named baseline on ``train`` and predict ``requests`` from ``control``."""
    options = options or {}
    return {name: make_baseline(name, **options.get(name, {})).fit(train, spec)
            .predict(control, requests, seed=seed) for name in names}
