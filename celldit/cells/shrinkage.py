"""Shrinking noisy mean shifts toward no change (the anchors of weak perturbations).

A condition's anchor is a mean shift estimated from its training cells. For a knockout
without effect that estimate is pure sampling noise, and starting the flow there puts the
prediction *further* from the truth than the control cells themselves (on Papalexi rep_3,
10 of 23 perturbations scored worse than no change under the plain mean shift). The
standard errors of the estimate say how much of it is noise:

* a per-condition **gate** ``c = clip((z - 1) / (gate - 1), floor, 1)`` with
  ``z = mean_g d_g^2 / se_g^2`` (about 1 for a condition without effect: its chi-square per
  gene): conditions indistinguishable from noise are pulled toward no change, clear ones
  (``z >= gate``) keep their shift;
* per-gene **empirical Bayes** (James-Stein across conditions): ``d * tau2 / (tau2 + se2)``
  with ``tau2_g = max(0, mean_r d_rg^2 - mean_r se2_rg)`` the spread of true shifts of gene
  ``g``; genes no perturbation moves beyond its noise go to 0;
* **hybrid** (the default): the gate, with EB only as far as the gate is closed, so that a
  clear condition keeps its raw shift (EB's pooled prior over-shrinks genes only one strong
  perturbation moves) and a noise-level one keeps a denoised direction, scaled down.
"""

from __future__ import annotations

import numpy as np

SHRINKAGE = (None, "gate", "eb", "hybrid")


def gate_factors(shifts: np.ndarray, se2: np.ndarray, gate: float = 2.0, floor: float = 0.1) -> np.ndarray:
    """(R,) per-condition factors in ``[floor, 1]`` of shifts (R, G) with squared standard
    errors se2 (R, G) (see the module notes)."""
    ok = se2 > 1e-12
    z = np.array([(d[m] ** 2 / s[m]).mean() if m.any() else np.inf for d, s, m in zip(shifts, se2, ok)])
    return np.clip((z - 1.0) / max(gate - 1.0, 1e-6), floor, 1.0)


def empirical_bayes(shifts: np.ndarray, se2: np.ndarray) -> np.ndarray:
    """(R, G) per-gene posterior means of shifts (R, G) (see the module notes; a non-finite
    standard error counts as a very large one)."""
    se2 = _finite(se2)
    tau2 = np.maximum(0.0, (shifts ** 2).mean(0) - se2.mean(0))
    return shifts * tau2 / (tau2 + se2 + 1e-12)


def shrink_shifts(shifts: np.ndarray, se2: np.ndarray, method: str | None = "hybrid", gate: float = 2.0,
                  floor: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink the shifts of the perturbed conditions toward zero.

    Parameters
    ----------
    shifts
        (R, G) estimated shifts (mean of perturbed - mean of control cells), one row per condition.
    se2
        (R, G) their squared standard errors (``var(P)/n_P + var(C)/n_C``; ``inf`` where unknown).
    method
        ``"hybrid"``, ``"gate"``, ``"eb"`` or None (unchanged); see the module notes.
    gate, floor
        The ``z`` at which the gate opens fully, and its least factor (> 0 keeps the direction
        of a weak shift, only its size shrinks).

    Returns
    -------
    shrunk
        (R, G) float32 shrunk shifts.
    factors
        (R,) the gate factor of each condition (ones without a gate).
    mix
        (R,) weight of the raw shift against the EB estimate: a group's own shift ``v`` of
        condition r shrinks as ``factors[r] * (mix[r] * v + (1 - mix[r]) * eb[r])`` (see
        :func:`shrink_group_shift`).
    """
    if method not in SHRINKAGE:
        raise ValueError(f"anchor_shrinkage={method!r}: use one of {SHRINKAGE}")
    d = np.asarray(shifts, np.float64)
    se2 = _finite(se2)
    ones = np.ones(len(d))
    if method is None or len(d) == 0:
        return d.astype(np.float32), ones, ones
    if method == "eb":
        return empirical_bayes(d, se2).astype(np.float32), ones, np.zeros(len(d))
    factors = gate_factors(d, se2, gate, floor)
    if method == "gate":
        return (d * factors[:, None]).astype(np.float32), factors, ones
    mix = np.clip((factors - floor) / max(1.0 - floor, 1e-6), 0.0, 1.0)
    eb = empirical_bayes(d, se2)
    return (factors[:, None] * (mix[:, None] * d + (1 - mix[:, None]) * eb)).astype(np.float32), factors, mix


def shrink_group_shift(v: np.ndarray, eb_anchor: np.ndarray, factor: float, mix: float) -> np.ndarray:
    """A covariate group's own shift ``v`` shrunk like its condition's anchor: any weighting of
    the groups then gives ``factor * (mix * weighted shift + (1 - mix) * eb_anchor)``."""
    return (factor * (mix * v + (1 - mix) * eb_anchor)).astype(np.float32)


def _finite(se2: np.ndarray) -> np.ndarray:
    """Squared standard errors with unknown ones (``inf``: a single cell) set very large."""
    se2 = np.asarray(se2, np.float64)
    return np.where(np.isfinite(se2), se2, 1e6)
