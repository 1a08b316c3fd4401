"""Conditioning of a :class:`~celldit.cells.model.CellDiT`'s sampler: each asked condition's
network inputs, anchors, velocity gate and covariate codes.

The rules, in the order a condition meets them (see :meth:`ConditionRules.condition`):

* a trained condition starts from its anchor (the shrunk mean shift); with batch anchors,
  an input batch takes the training batches' shifts weighted by likeness;
* a covariate group that never trained the condition (a held-out cell type) takes the
  group-weighted anchor of its own cells' mean, and the "unknown" covariate codes;
* an untrained perturbation borrows the anchors of trained ones alike by prior features
  (:mod:`celldit.cells.borrowing`), and its own target's shift from the on-target rule
  (:mod:`celldit.cells.on_target`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from .borrowing import PriorBorrowing
from .escapers import escaper_multipliers
from .on_target import OnTargetRule
from .vocab import parse_condition

__all__ = ["ConditionRules"]


class ConditionRules:
    """How a trained model conditions its flow (composition: it reads the model's settings,
    vocabulary, network and anchors, and changes none of them).

    Parameters
    ----------
    model
        A :class:`~celldit.cells.model.CellDiT`.
    """

    def __init__(self, model: Any):
        self.model = model
        self.config, self.network, self.spec, self.vocab = model.config, model.network, model.spec, model.vocab
        self.conditions, self.genes = model.conditions, model.genes

    def condition(self, label: str, dose: Any, x: torch.Tensor, cov: pd.DataFrame,
                  batches: tuple[np.ndarray, dict[Any, np.ndarray]] | None = None,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Label (+ dose) for sources ``x`` (n, G) with covariates ``cov`` ->
        (pert_idx (1, K), pert_scale (1, K), anchors (n, G)).

        A source whose covariate group never trained this condition gets the group-weighted
        anchor of its group (see :class:`~celldit.cells.anchors.ConditionTable`), its
        group's mean being the mean of those sources. With batch anchors (``batch_anchors``),
        ``batches`` = (batch label of each source (n,), ``{label: its uncentred mean control
        cell}``): each input batch gets the training batches' shifts weighted by likeness.
        With ``rng`` and a share of escapers for the condition, that share of the sources gets
        no anchor and the rest a larger one (:func:`~celldit.cells.escapers.escaper_multipliers`)."""
        key = parse_condition(str(label), dose, self.spec)
        pert_idx, pert_scale = self.vocab.encode_conditions([key[0]], [key[1]])
        n = x.shape[0]
        if not self.config.anchor:
            return pert_idx, pert_scale, np.zeros((n, len(self.genes)), np.float32)
        anchors = np.repeat(self.conditions.anchor(key, neighbours=self.prior_neighbours)[None], n, axis=0)
        if self.config.batch_anchored and batches is not None:
            labels, means = batches
            for b, mean in means.items():
                anchors[labels == b] = self.conditions.anchor(key, mean, neighbours=self.prior_neighbours)
        unseen = self.unseen_groups(label, dose, cov)
        if unseen.any():
            groups = cov.astype(str).agg("\x1f".join, axis=1).to_numpy()
            for g in np.unique(groups[unseen]):
                rows = np.flatnonzero(groups == g)
                anchors[rows] = self.conditions.anchor(key, x[rows].mean(0).numpy(), neighbours=self.prior_neighbours)
        untrained = [m for m in key[0] if not any(k[0] == (m,) for k in self.conditions.keys)]
        if untrained and self.on_target_rule is not None:
            self.on_target_rule.set_targets(anchors, untrained, self.genes, x.detach().cpu().numpy(),
                                            batches if self.config.centred else None)
        share = self.conditions.escaper_share(key) if rng is not None and self.config.escapers else 0.0
        if share > 0:
            anchors *= escaper_multipliers(share, n, rng)[:, None]
        return pert_idx, pert_scale, anchors

    @property
    def on_target_rule(self) -> OnTargetRule | None:
        """The on-target rule fitted on the trained single perturbations (once; None when
        fewer than three are named after a measured gene, or with ``on_target=False``)."""
        if not self.config.on_target:
            return None
        if not hasattr(self, "_target_rule"):
            self._target_rule = OnTargetRule.fit(self.conditions.single_rows(), self.conditions.anchors, self.genes,
                                                 np.asarray(self.model.reference, dtype=np.float64))
        return self._target_rule

    def _borrowing(self) -> tuple[PriorBorrowing | None, dict[int, int], dict[str, int]]:
        """The borrowing kernel over the trained single perturbations (fitted once, by
        leave-one-out on those with prior features: see :mod:`celldit.cells.borrowing`),
        ``{condition row: vocabulary index}`` of them, and the vocabulary index of every
        perturbation."""
        if not hasattr(self, "_borrow"):
            enc = self.network.encoder
            index = {p: i for i, p in enumerate(self.vocab.perturbations)}
            rows = {i: index[p] for i, p in self.conditions.single_rows().items() if p in index}
            has = np.array([bool(enc.has_prior[v]) for v in rows.values()], dtype=bool)
            borrow = None
            if has.any():
                feats = enc.prior.detach().cpu().numpy()
                gates = self.conditions.gates if self.conditions.gates is not None else np.ones(len(self.conditions.keys))
                borrow = PriorBorrowing(feats[list(rows.values())], has, self.conditions.anchors[list(rows)],
                                        np.asarray(gates)[list(rows)])
            self._borrow = (borrow, rows, index)
        return self._borrow

    def _prior_feature(self, name: str) -> np.ndarray | None:
        enc = self.network.encoder
        _, _, index = self._borrowing()
        if name not in index or not bool(enc.has_prior[index[name]]):
            return None
        return enc.prior[index[name]].detach().cpu().numpy()

    def prior_neighbours(self, name: str) -> dict[int, float]:
        """``{condition row: weight}`` for a perturbation never trained: the trained single
        perturbations weighted by the leave-one-out-fitted kernel on prior features (or all
        alike, when the features predict nothing better; the weights sum to its scale in
        [0, 1]); empty without prior features for ``name``."""
        borrow, rows, _ = self._borrowing()
        feature = self._prior_feature(name)
        if borrow is None or feature is None:
            return {}
        return {r: float(v) for r, v in zip(rows, borrow.weights(feature))}

    def velocity_gate(self, label: str, dose: Any) -> float:
        """The factor of the network's velocity for a condition: its shrinkage gate with
        ``gate_velocity`` and a control source (a noise source must move noise to cells), else 1.
        An untrained single perturbation with prior features gets its borrowed gate."""
        if not (self.config.gate_velocity and self.config.source == "control" and self.config.anchor):
            return 1.0
        key = parse_condition(str(label), dose, self.spec)
        if len(key[0]) == 1 and not any(k[0] == key[0] for k in self.conditions.keys):  # never trained
            borrow, _, _ = self._borrowing()
            feature = self._prior_feature(key[0][0])
            if borrow is not None and feature is not None:
                return borrow.gate(feature)
        return self.conditions.gate(key)

    def covariate_codes(self, label: str, dose: Any, cov: pd.DataFrame, cov_idx: np.ndarray) -> np.ndarray:
        """Covariate codes for condition ``label``: a cell whose covariate group never saw
        this (trained) condition gets the "unknown" codes, which a model trained with
        ``covariate_dropout`` learned to use (prediction from the cell's state)."""
        if not self.config.covariate_dropout:
            return cov_idx
        unknown = np.array([len(v) for v in self.vocab.covariates.values()], dtype=cov_idx.dtype)
        return np.where(self.unseen_groups(label, dose, cov)[:, None], unknown[None, :], cov_idx)

    def unseen_groups(self, label: str, dose: Any, cov: pd.DataFrame) -> np.ndarray:
        """(n,) bool: the cell's covariate group never trained the (trained) condition ``label``."""
        row = self.conditions.row(parse_condition(str(label), dose, self.spec))
        if not self.spec.covariate_keys or row is None:
            return np.zeros(len(cov), dtype=bool)
        groups = cov.astype(str).agg("\x1f".join, axis=1).to_numpy()
        trained = set(self.model.trained_groups)
        return np.array([f"{row}\x1e{g}" not in trained for g in groups], dtype=bool)
