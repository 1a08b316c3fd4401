"""The cells :meth:`CellDiT.generate <celldit.cells.model.CellDiT.generate>` starts from.

A control-source model starts from cells of the bank of training controls saved with it,
drawn within the asked covariate group; a noise-source model starts from draws of its noise
prior around that group's mean control cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["StartCells"]


class StartCells:
    """Source cells of one covariate group, drawn ``m`` at a time.

    Parameters
    ----------
    model
        A fitted :class:`~celldit.cells.model.CellDiT`.
    cond
        The asked condition, with a value for each registered covariate key.

    Raises
    ------
    ValueError
        When the model has no training control cells of that group to start from.
    """

    def __init__(self, model: Any, cond: Mapping[str, Any]):
        self.model = model
        keys = model.spec.covariate_keys
        where = ", ".join(f"{k}={cond[k]!r}" for k in keys)
        self.pool = np.arange(len(model.bank_obs))
        self.prior_mean: torch.Tensor | None = None
        if model.config.source == "control":
            match = np.ones(len(model.bank_obs), dtype=bool)
            for k in keys:
                match &= model.bank_obs[k].astype(str).to_numpy() == str(cond[k])
            if not match.any():
                raise ValueError(f"no training control cells with {where} to start from; use counterfactual() "
                                 "with control cells of that group")
            self.pool = np.flatnonzero(match)
            return
        group = "\x1f".join(str(cond[k]) for k in keys)
        groups = model.covariate_groups or [""]
        if group not in groups:
            raise ValueError(f"no training control cells with {where}: the noise prior has no mean for that "
                             "group; use counterfactual() with control cells of it")
        self.prior_mean = (torch.from_numpy(model.prior_means()[groups.index(group)]) if model.noise_rank
                           else torch.zeros(len(model.genes)))

    def draw(self, m: int, generator: torch.Generator, need_library: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        """``m`` source cells (m, G) and the bank rows they take their library sizes from
        (the bank cells themselves; for noise draws, random bank cells when ``need_library``,
        else None)."""
        if self.prior_mean is not None:
            x0 = self.prior_mean + self.model.network.source_noise((m, len(self.model.genes)), generator=generator).cpu()
            pick = self.pool[torch.randint(len(self.pool), (m,), generator=generator).numpy()] if need_library else None
            return x0, pick
        pick = self.pool[torch.randint(len(self.pool), (m,), generator=generator).numpy()]
        return self.model.bank_x[pick], pick
