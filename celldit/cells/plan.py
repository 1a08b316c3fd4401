"""Training plan of a CellDiT: the flow plan plus the choice of source (control cell or noise)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..train.plan import FlowTrainingPlan

__all__ = ["CellTrainingPlan"]


class CellTrainingPlan(FlowTrainingPlan):
    """:class:`~celldit.train.plan.FlowTrainingPlan` for :class:`~celldit.cells.module.CellFlowNet` batches.

    Batches come from :class:`~celldit.cells.dataset.PairedBatches`: ``x1`` (target cells),
    ``source`` (paired control cells, anchor included) and the conditioning tensors.

    Parameters
    ----------
    network
        The cell velocity network.
    source
        ``"control"`` or ``"noise"``: the coupling, whose source the batch carries (a control
        cell plus its anchor, or a draw of the noise prior; see
        :class:`~celldit.cells.dataset.PairedBatches`).
    **kwargs
        Passed to :class:`~celldit.train.plan.FlowTrainingPlan` (flow, lr, ema_decay, ...).
    """

    def __init__(self, network: torch.nn.Module, source: str = "control", **kwargs: Any):
        if source not in ("control", "noise"):
            raise ValueError(f"source={source!r}: use 'control' or 'noise'")
        super().__init__(network, **kwargs)
        self.source = source

    def batch_to_loss(self, batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "source" not in batch:
            return super().batch_to_loss(batch)
        batch = dict(batch)
        source = batch.pop("source")
        return super().batch_to_loss({**batch, "x0": source})
