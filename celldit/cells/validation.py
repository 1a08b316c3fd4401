"""Validation while a CellDiT trains: held-out cells, a cheap score, and early stopping.

With ``validation_fraction > 0`` (see :class:`~celldit.cells.config.CellFitConfig`), that
fraction of the cells of every (condition, pairing group), controls included, is kept out
of training. Every ``validation_every_n_steps`` steps the flow-matching loss on pairs of
those cells, at fixed times spread over [0, 1], is logged as ``val_loss`` (the same
batches each time, so the curve moves only with the model); with
``early_stopping_patience``, training stops when it has not improved for that many
validations.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np

__all__ = ["split_validation", "validation_callbacks"]


def split_validation(data: Any, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training cells, validation cells or None): ``fraction`` of each (condition, pairing
    group) stratum, at least one cell of a stratum with two or more, drawn with ``seed``."""
    n = len(data.cond_id)
    if not fraction:
        return np.arange(n), None
    rng = np.random.default_rng([seed, 7919])
    strata = data.cond_id.astype(np.int64) * (int(data.pair_group.max()) + 1) + data.pair_group
    val = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        k = int(round(fraction * len(members)))
        if len(members) >= 2:
            val.extend(rng.choice(members, max(1, min(k, len(members) - 1)), replace=False))
    val = np.sort(np.asarray(val, dtype=np.int64))
    if val.size == 0:
        raise ValueError(f"validation_fraction={fraction}: no condition has two cells to split; set it to 0")
    return np.setdiff1d(np.arange(n), val), val


def validation_callbacks(fit_config: Any) -> list[L.Callback]:
    """Early stopping on ``val_loss`` when asked (see the module notes)."""
    if not fit_config.validation_fraction or fit_config.early_stopping_patience is None:
        return []
    from lightning.pytorch.callbacks import EarlyStopping

    return [EarlyStopping(monitor="val_loss", mode="min", patience=fit_config.early_stopping_patience,
                          check_on_train_epoch_end=False)]
