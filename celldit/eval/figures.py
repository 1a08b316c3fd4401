"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from celldit.data.spec import PerturbationSpec
from celldit.eval.pca import PCASpace
from celldit.eval.scoring import condition_name, group_rows

__all__ = ["plot_metric_bars", "plot_pca_real_vs_pred", "KEY_METRICS"]

#: metrics shown in the per-condition bar chart, with their "better" direction
KEY_METRICS = (("pearson_delta_de20", "higher"), ("mse_de20", "lower"), ("edistance", "lower"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(table: pd.DataFrame, path: str | Path,
                     metrics: Sequence[tuple[str, str]] = KEY_METRICS,
                     max_conditions: int = 40) -> Path:
    """Grouped bars: one panel per metric, conditions on x, one bar per method.

    The model (method ``model``) is drawn first when present, baselines beside it.
    Shows at most ``max_conditions`` conditions (in table order) and the mean over all.
    """
    plt = _pyplot()
    methods = list(dict.fromkeys(table["method"]))
    if "model" in methods:
        methods.remove("model")
        methods.insert(0, "model")
    conditions = list(dict.fromkeys(table["condition"]))[:max_conditions]
    labels = conditions + ["mean (all)"]
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.45 * len(labels) * max(
        1, len(methods)) / 2 + 2), 2.6 * len(metrics)), squeeze=False)
    x = np.arange(len(labels))
    cmap = plt.get_cmap("tab10")
    for ax, (metric, better) in zip(axes[:, 0], metrics):
        for j, method in enumerate(methods):
            sub = table[table["method"] == method].set_index("condition")[metric]
            finite = sub.to_numpy(dtype=float)
            finite = finite[np.isfinite(finite)]
            vals = [sub.get(c, np.nan) for c in conditions] + [
                finite.mean() if finite.size else np.nan]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=method,
                   color=cmap(j % 10))
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(x)
        ax.set_xticklabels(labels if ax is axes[-1, 0] else [], rotation=60, ha="right",
                           fontsize=7)
    axes[0, 0].legend(fontsize=7, ncol=min(len(methods), 5), loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pca_real_vs_pred(real: AnnData, predictions: Mapping[str, AnnData],
                          spec: PerturbationSpec, space: PCASpace, path: str | Path,
                          max_conditions: int = 12, max_cells: int = 300,
                          seed: int = 0) -> Path:
    """One panel per condition, in the evaluation's PCA space (PC1/PC2).

    Shows real controls (grey), the predicted cells of ``model`` (else ``mean_shift``, else
    the first method), the true cells (black crosses), the mean of every method (large
    dots) and of the true cells (star). At most ``max_cells`` cells of each kind per panel.
    """
    plt = _pyplot()
    real_groups = group_rows(real, spec)
    ctrl = {k[1:]: v for k, v in real_groups.items() if k[0] in spec.control_labels}
    pred_groups = {m: group_rows(p, spec) for m, p in predictions.items()}
    keys = sorted({k for g in pred_groups.values() for k in g
                   if k[0] not in spec.control_labels and k in real_groups})[:max_conditions]
    if not keys:
        raise ValueError("no condition shared by the predictions and the real data to plot")
    ncol = min(4, len(keys))
    nrow = int(np.ceil(len(keys) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    rng = np.random.default_rng(seed)
    cmap = plt.get_cmap("tab10")

    def pick(rows):
        return rows if len(rows) <= max_cells else np.sort(rng.choice(rows, max_cells, False))

    for ax, key in zip(axes.ravel(), keys):
        if key[1:] in ctrl:
            z = space.transform(real.X[pick(ctrl[key[1:]])])
            ax.scatter(z[:, 0], z[:, 1], s=3, c="lightgrey", label="control")
        shown = next((m for m in ("model", "mean_shift") if m in pred_groups),
                     next(iter(pred_groups)))
        centroids = {}
        for j, (method, groups) in enumerate(pred_groups.items()):
            if key not in groups:
                continue
            z = space.transform(predictions[method].X[pick(groups[key])])
            centroids[method] = (z.mean(0), cmap(j % 10))
            if method == shown:
                ax.scatter(z[:, 0], z[:, 1], s=3, color=cmap(j % 10), alpha=0.5,
                           label=f"{method} cells")
        zt = space.transform(real.X[pick(real_groups[key])])
        ax.scatter(zt[:, 0], zt[:, 1], s=4, c="black", marker="x", linewidths=0.6,
                   label="true cells")
        for method, (centre, colour) in centroids.items():  # every method's mean, on top
            ax.scatter(*centre[:2], s=70, color=colour, edgecolors="white", linewidths=1.0,
                       marker="o", zorder=5, label=f"{method} mean")
        ax.scatter(*zt.mean(0)[:2], s=110, c="black", edgecolors="white", marker="*",
                   zorder=6, label="true mean")
        ax.set_title(condition_name(key[0], key[1:]), fontsize=8)
        ax.set_xlabel("PC1", fontsize=7)
        ax.set_ylabel("PC2", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=min(len(names), 6),
               markerscale=1.0, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if nrow > 1 else 0.12, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
