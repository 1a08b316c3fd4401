"""Escapers: the share of a knockout's cells that the edit missed, from the spread along its shift.

CRISPR knockouts are incomplete: some cells carrying a guide keep the control state (Mixscape
calls them non-perturbed), so a perturbed population is a mixture, split along its shift,
while a mean shift moves every cell part of the way. On Papalexi's held-out replicate rep_3
the cells of STAT1, JAK2, IFNGR1 and IFNGR2 are 1.3-1.7 times as spread along their shift as
the controls, and a flow started from ``control + anchor`` keeps the controls' spread (the
network cannot tell from a control cell whether it will escape: that is the guide's doing).

The model here is Mixscape's two-component one, along the anchor's direction ``u``: a share
``p`` of the cells is unmoved, the rest moved by ``delta``. The mean shift along ``u`` is
``m = (1 - p) delta`` and the mixture adds ``p (1 - p) delta^2 u u^T`` to the controls'
covariance, so ``p = e / (e + m^2)`` with ``e`` the added variance along ``u``.

Count noise changes a gene's variance too (a gene lowered to a few counts per cell has more
zeros, and more spread in log space, without any mixture), but each gene's on its own. So
``e`` is read from the *covariances between genes* only: with cells centred per gene, each
cell's ``a = (u.x)^2 - sum_g u_g^2 x_g^2`` (the cross terms of ``(u.x)^2``) has mean
``u^T C u - sum_g u_g^2 C_gg``, to which the mixture adds ``e (1 - sum_g u_g^4)``. ``e`` is
the treated cells' mean ``a`` minus the controls', over ``1 - sum_g u_g^4``; it counts where
that difference is above chance (a one-sided z test on the two means) and the shift is spread
over genes (``sum_g u_g^4 <= 0.75``: a one-gene shift has no cross terms to read); with gated
shrinkage, only for clear effects. Elsewhere ``p = 0`` (a plain anchor).

A source cell then gets the anchor times 0 (an escaper) or ``1 / (1 - p)``: drawn at random
in training, and at sampling exactly ``round(p n)`` escapers among ``n`` cells (at random
positions, seeded) with the others scaled so that the anchors' mean stays the condition's
anchor.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

__all__ = ["MAX_ESCAPERS", "MAX_ONE_GENE", "escaper_fraction", "escaper_fractions", "escaper_multipliers"]

MAX_ESCAPERS = 0.9  # at most this share: beyond it the moved part's shift, m / (1 - p), runs away
MAX_ONE_GENE = 0.75  # sum_g u_g^4 above this: the shift is one gene's, with too few cross terms to read


def escaper_fraction(treated: np.ndarray, controls: np.ndarray, direction: np.ndarray, alpha: float = 1e-3
                     ) -> float:
    """Share of escapers ``p`` of one condition (see the module notes).

    Parameters
    ----------
    treated, controls
        (n, G) perturbed and control cells, each centred per gene within its own batch (only the
        spread within a batch counts).
    direction
        (G,) the condition's anchor: ``u`` is its direction and ``m`` its length.
    alpha
        Level of the one-sided z test that the treated cells' cross-gene spread along ``u``
        exceeds the controls'.

    Returns
    -------
    float
        ``e / (e + m^2)``, capped at :data:`MAX_ESCAPERS`; 0 when the test does not reject, the
        shift is (nearly) one gene's, fewer than 3 cells a side, or a zero shift.
    """
    shift = float(np.linalg.norm(direction))
    if len(treated) < 3 or len(controls) < 3 or shift <= 0:
        return 0.0
    u = np.asarray(direction, dtype=np.float64) / shift
    spread = 1.0 - float((u ** 4).sum())  # the share of u u^T off the diagonal
    if spread < 1.0 - MAX_ONE_GENE:
        return 0.0

    def cross(x: np.ndarray) -> np.ndarray:  # (n,) each cell's cross terms of (u.x)^2, unbiased
        x = np.asarray(x, dtype=np.float64)
        return (x @ u) ** 2 - (x ** 2) @ (u ** 2)

    a_t, a_c = cross(treated) * len(treated) / (len(treated) - 1), cross(controls) * len(controls) / (len(controls) - 1)
    diff = float(a_t.mean() - a_c.mean())
    se = float(np.sqrt(a_t.var(ddof=1) / len(a_t) + a_c.var(ddof=1) / len(a_c)))
    if diff <= 0 or se <= 0 or norm.sf(diff / se) >= alpha:
        return 0.0
    excess = diff / spread
    return float(min(excess / (excess + shift ** 2), MAX_ESCAPERS))


def escaper_fractions(rows, cond_id: np.ndarray, group: np.ndarray, anchors: np.ndarray, eligible: np.ndarray, *,
                      max_cells: int = 2000, alpha: float = 1e-3, seed: int = 0) -> np.ndarray:
    """(n_conditions,) escaper shares of the training conditions (0 for control and the rest).

    Parameters
    ----------
    rows
        The model's expression rows (``rows.all_rows(idx)`` -> (n, G)), centred or not.
    cond_id, group
        (n_cells,) each cell's condition row (0: control) and anchor group (batch or covariate
        group): spread is measured within groups, so that differences between batches do not count.
    anchors
        (n_conditions, G) the conditions' anchors: their directions are the axes.
    eligible
        (n_conditions,) bool: the conditions that may have escapers (e.g. clear evidence).
    max_cells
        Cells read per condition (and of the controls), a seeded draw: bounded memory on large data.
    alpha
        Level of the spread test (:func:`escaper_fraction`).
    seed
        Seed of the draws.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros(len(anchors))

    def take(idx: np.ndarray) -> np.ndarray:
        return np.sort(rng.choice(idx, max_cells, replace=False)) if len(idx) > max_cells else idx

    ctrl = take(np.flatnonzero(cond_id == 0))
    x_ctrl = _centred(np.asarray(rows.all_rows(ctrl), dtype=np.float64), group[ctrl])
    for r in np.flatnonzero(eligible):
        idx = take(np.flatnonzero(cond_id == r))
        if r == 0 or len(idx) < 3:
            continue
        x = _centred(np.asarray(rows.all_rows(idx), dtype=np.float64), group[idx])
        out[r] = escaper_fraction(x, x_ctrl, anchors[r], alpha)
    return out


def _centred(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(n, G) rows minus their group's mean row."""
    out = x.copy()
    for g in np.unique(groups):
        out[groups == g] -= x[groups == g].mean(0)
    return out


def escaper_multipliers(fraction: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) anchor multipliers at sampling: ``round(fraction n)`` zeros at random positions and
    the rest ``n / (n - k)``, so that their mean is exactly 1 (all ones when ``fraction`` is 0
    or no cell would escape)."""
    k = int(round(fraction * n))
    if fraction <= 0 or k == 0 or k >= n:
        return np.ones(n, dtype=np.float32)
    out = np.full(n, n / (n - k), dtype=np.float32)
    out[rng.permutation(n)[:k]] = 0.0
    return out
