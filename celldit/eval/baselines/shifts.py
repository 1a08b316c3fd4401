"""The mean-shift family of baselines (see :mod:`celldit.eval.baselines.base` for the notation).

* ``no_change``: ``s = 0`` (the control cells themselves).
* ``train_mean``: ``s(g)`` = unweighted mean of ``d(S, g)`` over the perturbation sets S
  seen in g; for a group without training perturbations, the unweighted mean of the other
  groups' ``s(h)``.
* ``mean_shift``: ``s = d(P, g)`` when P was seen in g, else the unweighted mean of
  ``d(P, h)`` over the groups h where P was seen; P never seen: ``train_mean`` (warned).
* ``additive``: ``s = sum_{a in P} s_mean_shift({a}, g)`` over the single perturbations of
  P; an unseen single contributes 0 (warned).
"""

from __future__ import annotations

import numpy as np

from .base import Baseline

__all__ = ["Additive", "MeanShift", "NoChange", "TrainMean"]


class NoChange(Baseline):
    """``s = 0``: the prediction is the control cells themselves."""

    name = "no_change"

    def shift(self, label, covs, control_mean):
        return np.zeros(len(control_mean))


class TrainMean(Baseline):
    """``s(g)`` = mean training shift over perturbations (same for every condition)."""

    name = "train_mean"

    def shift(self, label, covs, control_mean):
        return self.train_mean_shift(covs)


class MeanShift(Baseline):
    """``s = d(P, g)``, or the mean of the other groups' ``d(P, h)`` for an unseen group."""

    name = "mean_shift"

    def shift(self, label, covs, control_mean):
        pset = self.spec.parse(label)
        s = self.mean_shift(pset, covs)
        if s is None:
            self._note(f"{label!r} unseen in training: using the train_mean shift")
            return self.train_mean_shift(covs)
        return s


class Additive(Baseline):
    """``s = sum`` of the single perturbations' mean shifts (for combinations)."""

    name = "additive"

    def shift(self, label, covs, control_mean):
        total = np.zeros(len(control_mean))
        for single in sorted(self.spec.parse(label)):
            s = self.mean_shift(frozenset([single]), covs)
            if s is None:
                self._note(f"single {single!r} unseen in training: it contributes 0")
                continue
            total = total + s
        return total
