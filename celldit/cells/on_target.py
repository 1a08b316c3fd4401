"""The on-target effect of a gene perturbation never trained.

A knockout (CRISPR-KO, CRISPRi) lowers its own target's expression and an activation
(CRISPRa) raises it. In Papalexi's screen the target is the largest change of 8 of the 9
knockouts whose target is measured, by 15-70% of its control level. An unseen
perturbation's borrowed anchor (:mod:`celldit.cells.borrowing`) is an average of the other
perturbations' effects: it cannot say which gene is targeted. :class:`OnTargetRule`
supplies that part from what training shows:

    fraction = median over trained perturbations p named after a measured gene j_p of
               anchor_p[j_p] / c[j_p]          (c: the training controls' mean)

and an untrained perturbation named after a measured gene ``j`` gets
``anchor[j] = fraction * c'[j]``, ``c'`` the mean of the cells being carried (the borrowed
value of that one gene is replaced; every other gene keeps its borrowed anchor). Fitted on
fewer than :data:`MIN_PERTURBATIONS` such perturbations, the rule is absent, and so it is
for drugs or any label that is not a gene name.

The same prior keeps a *trained* perturbation's own target out of anchor shrinkage
(``target_columns`` of :func:`~celldit.cells.anchors.build_condition_table`): shrinkage
assumes no effect until the evidence says otherwise, and for the target the evidence is in
the design. Without it, a weak knockout's clear drop of its own target (Papalexi's CMTM6:
-0.69 in rep_1, the largest change) is shrunk with the noise of its other genes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OnTargetRule", "MIN_PERTURBATIONS", "MIN_LEVEL"]

#: trained perturbations named after a measured gene needed to fit the fraction
MIN_PERTURBATIONS = 3
#: a target whose mean control level is below this (log1p units) gives no usable ratio
MIN_LEVEL = 0.05


@dataclass(frozen=True)
class OnTargetRule:
    """The fitted on-target fraction (see the module notes).

    Attributes
    ----------
    fraction
        Median relative change of a trained perturbation's own target (negative for
        knockouts), in [-1, inf).
    ratios
        ``{perturbation: its anchor[target] / control level}``: what the median is over.
    """

    fraction: float
    ratios: Mapping[str, float]

    @classmethod
    def fit(cls, names: Mapping[int, str], anchors: np.ndarray, genes: Sequence[str],
            control_mean: np.ndarray) -> OnTargetRule | None:
        """Fit from the trained single perturbations.

        Parameters
        ----------
        names
            ``{condition row: perturbation name}`` of the trained single perturbations.
        anchors
            (n_conditions, G) their anchors (rows indexed by ``names``' keys).
        genes
            The model's genes (columns of ``anchors``).
        control_mean
            (G,) mean of the training control cells (log1p units, uncentred).

        Returns
        -------
        The rule, or None with fewer than :data:`MIN_PERTURBATIONS` usable perturbations.
        """
        column = {g: j for j, g in enumerate(genes)}
        ratios = {}
        for row, name in names.items():
            j = column.get(name)
            if j is not None and control_mean[j] >= MIN_LEVEL:
                ratios[name] = float(max(anchors[row, j] / control_mean[j], -1.0))
        if len(ratios) < MIN_PERTURBATIONS:
            return None
        return cls(float(np.median(list(ratios.values()))), ratios)

    def set_targets(self, anchors: np.ndarray, names: Sequence[str], genes: Sequence[str], x: np.ndarray,
                    batches: tuple[np.ndarray, Mapping[Any, np.ndarray]] | None = None) -> np.ndarray:
        """Set the target column of each untrained perturbation in ``names`` that is a gene.

        Parameters
        ----------
        anchors
            (n, G) anchors of the ``n`` cells being carried; changed in place and returned.
        names
            The condition's members never trained alone.
        genes
            The model's genes.
        x
            (n, G) the cells being carried (centred on their batch's mean when ``batches``
            holds the means).
        batches
            ``(batch of each cell (n,), {batch: the mean added back to its cells (G,)})``; the
            level of a target is its mean over each batch's cells (None: one batch, uncentred).
        """
        column = {g: j for j, g in enumerate(genes)}
        labels, means = batches if batches is not None else (np.zeros(len(x), dtype=object), {0: None})
        for name in names:
            j = column.get(name)
            if j is None:
                continue
            for b, mean in means.items():
                rows = labels == b
                level = float(x[rows, j].mean()) + (0.0 if mean is None else float(mean[j]))
                anchors[rows, j] = self.fraction * level
        return anchors
