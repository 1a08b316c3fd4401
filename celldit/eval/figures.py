"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from celldit.data.expression import keep_torch_threads
from celldit.data.spec import PerturbationSpec
from celldit.eval.pca import PCASpace
from celldit.eval.scoring import condition_name

__all__ = ["KEY_METRICS", "plot_delta_scatter", "plot_metric_bars", "plot_pca_real_vs_pred", "plot_umap_real_vs_pred"]

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


def plot_pca_real_vs_pred(real: Any, predictions: Mapping[str, Any], spec: PerturbationSpec, space: PCASpace,
                          path: str | Path, max_conditions: int = 12, max_cells: int = 300, seed: int = 0) -> Path:
    """One panel per condition, in the evaluation's PCA space (PC1/PC2).

    ``real`` is :class:`~celldit.eval.cells.GroupedCells`; ``predictions`` maps a method to
    its prediction (cells drawn on demand). Shows real controls (grey), cells predicted by
    ``model`` (else ``mean_shift``, else the first method), the true cells (black crosses),
    the mean of every method (large dots) and of the true cells (star). At most
    ``max_cells`` cells of each kind per panel.
    """
    plt = _pyplot()
    keys = sorted({k for p in predictions.values() for k in p.keys()
                   if k[0] not in spec.control_labels and k in real.groups})[:max_conditions]
    if not keys:
        raise ValueError("no condition shared by the predictions and the real data to plot")
    ncol = min(4, len(keys))
    nrow = int(np.ceil(len(keys) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    rng = np.random.default_rng(seed)
    cmap = plt.get_cmap("tab10")
    shown = next((m for m in ("model", "mean_shift") if m in predictions), next(iter(predictions)))

    def pick(rows):
        return rows if len(rows) <= max_cells else np.sort(rng.choice(rows, max_cells, False))

    for ax, key in zip(axes.ravel(), keys):
        controls = real.control_rows(spec, key[1:])
        if controls.size:
            z = space.transform(real.cells(pick(controls)))
            ax.scatter(z[:, 0], z[:, 1], s=3, c="lightgrey", label="control")
        centroids = {}
        for j, (method, prediction) in enumerate(predictions.items()):
            if key not in prediction.keys():
                continue
            mean = space.transform(prediction.mean(key)[None, :])[0]
            centroids[method] = (mean, cmap(j % 10))
            if method == shown:
                z = space.transform(prediction.sample(key, min(max_cells, prediction.size(key)), rng))
                ax.scatter(z[:, 0], z[:, 1], s=3, color=cmap(j % 10), alpha=0.5, label=f"{method} cells")
        zt = space.transform(real.cells(pick(real.groups[key])))
        ax.scatter(zt[:, 0], zt[:, 1], s=4, c="black", marker="x", linewidths=0.6, label="true cells")
        for method, (centre, colour) in centroids.items():  # every method's mean, on top
            ax.scatter(*centre[:2], s=70, color=colour, edgecolors="white", linewidths=1.0,
                       marker="o", zorder=5, label=f"{method} mean")
        ax.scatter(*space.transform(real.mean(key)[None, :])[0][:2], s=110, c="black", edgecolors="white",
                   marker="*", zorder=6, label="true mean")
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
    return _save(fig, path)


def _scatter_grid(n: int, width: float = 3.0, height: float = 2.8):
    plt = _pyplot()
    ncol = min(5, max(1, n))
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, height * nrow), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return plt, fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_delta_scatter(real: Any, prediction: Any, spec: PerturbationSpec, path: str | Path,
                       max_conditions: int = 20, method: str = "model") -> Path:
    """Predicted against true mean shift per gene, one panel per condition.

    ``delta = mean(cells) - mean(controls of the same covariates)`` (the Pearson-delta
    definition); the 20 genes of largest true ``|delta|`` are drawn in colour, the line is
    y = x.
    """
    keys = [k for k in prediction.keys() if k[0] not in spec.control_labels and k in real.groups
            and real.control_keys(spec, k[1:])][:max_conditions]
    if not keys:
        raise ValueError("no condition shared by the prediction and the real data to plot")
    plt, fig, axes = _scatter_grid(len(keys))
    for ax, key in zip(axes.ravel(), keys):
        c = real.mean(real.control_keys(spec, key[1:]))
        true, predicted = real.mean(key) - c, prediction.mean(key) - c
        top = np.argsort(-np.abs(true))[:20]
        ax.scatter(true, predicted, s=3, c="lightgrey")
        ax.scatter(true[top], predicted[top], s=8, c="tab:red", label="top-20 DE")
        lim = float(np.nanmax(np.abs(np.concatenate([true, predicted])))) * 1.05 or 1.0
        ax.plot([-lim, lim], [-lim, lim], lw=0.6, color="black")
        r = np.corrcoef(true[top], predicted[top])[0, 1] if np.std(predicted[top]) > 0 else np.nan
        ax.set_title(f"{condition_name(key[0], key[1:])}  r20={r:.2f}", fontsize=8)
        ax.set_xlabel("true delta", fontsize=7)
        ax.set_ylabel(f"{method} delta", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_umap_real_vs_pred(real: Any, prediction: Any, spec: PerturbationSpec, space: PCASpace,
                           path: str | Path, max_conditions: int = 8, max_cells: int = 200, seed: int = 0) -> Path:
    """UMAP (scanpy) of real and predicted cells of a few conditions, with the controls.

    Cells are embedded in the evaluation's PCA space, a neighbour graph is built on it and
    laid out by UMAP; left: coloured by condition, right: real vs predicted.
    """
    import scanpy as sc

    keys = [k for k in prediction.keys() if k[0] not in spec.control_labels and k in real.groups][:max_conditions]
    if not keys:
        raise ValueError("no condition shared by the prediction and the real data to plot")
    rng = np.random.default_rng(seed)

    def pick(rows: np.ndarray) -> np.ndarray:
        return rows if len(rows) <= max_cells else np.sort(rng.choice(rows, max_cells, replace=False))

    controls = np.concatenate([v for k, v in real.groups.items() if k[0] in spec.control_labels])
    parts = [space.transform(real.cells(pick(controls)))]
    condition, origin = ["control"] * len(parts[0]), ["real"] * len(parts[0])
    for key in keys:
        name = condition_name(key[0], key[1:])
        for z, who in ((space.transform(real.cells(pick(real.groups[key]))), "real"),
                       (space.transform(prediction.sample(key, min(max_cells, prediction.size(key)), rng)),
                        "predicted")):
            parts.append(z)
            condition += [name] * len(z)
            origin += [who] * len(z)
    emb = AnnData(np.concatenate(parts).astype(np.float32),
                  obs=pd.DataFrame({"condition": pd.Categorical(condition), "cells": pd.Categorical(origin)}))
    emb.obsm["X_pca"] = emb.X
    with keep_torch_threads():
        sc.pp.neighbors(emb, n_neighbors=15, use_rep="X_pca", random_state=seed)
        sc.tl.umap(emb, random_state=seed)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    cmap = plt.get_cmap("tab10")
    umap = emb.obsm["X_umap"]
    for j, name in enumerate(emb.obs["condition"].cat.categories):
        m = (emb.obs["condition"] == name).to_numpy()
        axes[0].scatter(umap[m, 0], umap[m, 1], s=3, color="lightgrey" if name == "control" else cmap(j % 10),
                        label=name)
    for name, colour in (("real", "black"), ("predicted", "tab:orange")):
        m = (emb.obs["cells"] == name).to_numpy()
        axes[1].scatter(umap[m, 0], umap[m, 1], s=3, color=colour, alpha=0.6, label=name)
    for ax, title in zip(axes, ("by condition", "real vs predicted")):
        ax.set_title(f"UMAP ({title})", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=3, frameon=False, loc="best")
    fig.tight_layout()
    return _save(fig, path)
