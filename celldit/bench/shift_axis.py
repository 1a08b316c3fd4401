"""Whether predicted cells split along a perturbation's shift as the real cells do.

A knockout whose edit some cells escape is a mixture: its cells are spread along the shift
more than the controls (unmoved escapers at one end, edited cells at the other). The
E-distance averages that over 30 PCs and many conditions; here it is measured on the one
axis where it happens: the unit vector ``u`` from the held-out controls' mean to the held-out
perturbed cells' mean, in the evaluation's PCA space (fitted on the training cells, as
:func:`~celldit.eval.report.evaluate` does). For each condition:

- ``sd_real``, ``sd_controls``, ``sd_<method>``: the spread of the projections on ``u``;
- ``w1_<method>``: the 1-D Wasserstein distance between predicted and real projections, over
  the shift's length (0: the real profile along the shift; about 1: off by a whole shift).

Methods: the predicted cells, and the mean shift (the held-out controls moved by the training
cells' mean shift, as the baseline of that name), whose spread is the controls'.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
from scipy.stats import wasserstein_distance

from ..data.expression import log_normalize
from ..data.spec import PerturbationSpec
from ..eval.pca import PCASpace
from ..eval.report import fit_baseline

__all__ = ["SPLIT_RATIO", "split_along_shift"]

SPLIT_RATIO = 1.25  # conditions whose real cells are this much more spread along the shift than the controls


def _log1p(adata: ad.AnnData) -> np.ndarray:
    """Dense log1p-normalised X of real cells (counts in ``layers['counts']`` or an integer X)."""
    x = log_normalize(adata).X
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def split_along_shift(test: ad.AnnData, pred: ad.AnnData, spec: PerturbationSpec, train: ad.AnnData,
                      labels: list[str], *, seed: int = 0, n_pcs: int = 30) -> dict:
    """Spread along each condition's real shift: real, controls, predicted and mean shift.

    Parameters
    ----------
    test
        Held-out real cells (counts), controls and perturbed, one covariate group.
    pred
        Predicted cells (log1p-normalised ``X``), labelled in ``obs[spec.perturbation_key]``.
    spec
        The registration of both.
    train
        Training cells: the PCA space and the mean-shift baseline are fitted on them.
    labels
        Conditions to score.
    seed, n_pcs
        Seed and size of the PCA space.

    Returns
    -------
    dict
        ``per_condition``: ``{label: {...}}`` with the fields of the module notes and ``shift``
        (the real shift's length); ``split``: the labels whose real spread is at least
        :data:`SPLIT_RATIO` times the controls'; ``summary``: over those labels, the mean of
        ``sd_controls``, ``sd_model`` and ``sd_mean_shift`` over ``sd_real``
        (``sd_model_over_real`` ...: 1 is the real spread) and of ``w1_model`` and ``w1_mean_shift``.
    """
    key = spec.perturbation_key
    lab = test.obs[key].astype(str).to_numpy()
    controls = np.isin(lab, spec.control_labels)
    if not controls.any():
        raise ValueError(f"no control cells in the held-out cells (obs[{key!r}])")
    baseline, train_cells = fit_baseline(train, spec, "mean_shift")
    space = PCASpace(n_pcs, seed=seed).fit_rows(train_cells.rows)
    z_test = space.transform(_log1p(test))
    z_ctrl = z_test[controls]
    x_ctrl = _log1p(test[controls])
    pred_lab = pred.obs[key].astype(str).to_numpy()
    x_pred = np.asarray(pred.X.toarray() if hasattr(pred.X, "toarray") else pred.X, dtype=np.float64)
    per = {}
    for label in labels:
        real = z_test[lab == label]
        if len(real) < 2 or not (pred_lab == label).any():
            raise ValueError(f"condition {label!r} needs real and predicted cells")
        d = real.mean(0) - z_ctrl.mean(0)
        length = float(np.linalg.norm(d))
        u = d / length
        shifted = x_ctrl + baseline.shift(label, (), x_ctrl.mean(0))[None]
        proj = {"real": real @ u, "controls": z_ctrl @ u, "model": space.transform(x_pred[pred_lab == label]) @ u,
                "mean_shift": space.transform(shifted) @ u}
        row = {"shift": round(length, 4), **{f"sd_{k}": round(float(v.std()), 4) for k, v in proj.items()}}
        for m in ("model", "mean_shift"):
            row[f"w1_{m}"] = round(float(wasserstein_distance(proj[m], proj["real"]) / length), 4)
        per[label] = row
    split = [k for k, v in per.items() if v["sd_real"] >= SPLIT_RATIO * v["sd_controls"]]
    summary = {}
    if split:
        for m in ("controls", "model", "mean_shift"):
            summary[f"sd_{m}_over_real"] = round(float(np.mean([per[k][f"sd_{m}"] / per[k]["sd_real"]
                                                                for k in split])), 4)
        for m in ("model", "mean_shift"):
            summary[f"w1_{m}"] = round(float(np.mean([per[k][f"w1_{m}"] for k in split])), 4)
    return {"per_condition": per, "split": split, "summary": summary}
