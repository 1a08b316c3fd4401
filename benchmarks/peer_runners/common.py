"""Helpers shared by the peer runners (they run in the peers' own virtual environments, so
nothing here imports celldit).

A split folder, written by ``benchmarks/peers.py``, holds:

* ``train.h5ad``: the training cells; ``X`` = log1p(normalize_total(counts, 1e4)), raw counts
  in ``layers['counts']``;
* ``controls.h5ad``: the held-out control cells that the counterfactuals start from (same layout);
* ``conditions.csv``: one row per condition to predict: a ``condition`` id, the perturbation
  key and the covariate / pairing keys;
* ``spec.json``: ``perturbation_key``, ``control``, ``covariate_keys``, ``pair_keys``.

A runner writes ``--out`` (an .h5ad of predicted cells, ``X`` in log1p-normalised gene space,
``obs`` holding the perturbation key and the covariate keys) and ``--out`` with ``.json`` in
place of ``.h5ad`` (timings, settings, versions).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def parse_args(doc: str) -> argparse.Namespace:
    """The runners' shared command line: ``--split DIR --seed N --settings JSON --out FILE``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="split folder written by benchmarks/peers.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="JSON object of hyper-parameters")
    parser.add_argument("--out", type=Path, required=True, help="predicted cells (.h5ad)")
    args = parser.parse_args()
    args.settings = json.loads(args.settings)
    return args


def read_split(folder: Path) -> tuple[dict, ad.AnnData, ad.AnnData, pd.DataFrame]:
    """``(spec, train, controls, conditions)`` of a split folder."""
    spec = json.loads((folder / "spec.json").read_text())
    train = ad.read_h5ad(folder / "train.h5ad")
    controls = ad.read_h5ad(folder / "controls.h5ad")
    conditions = pd.read_csv(folder / "conditions.csv", dtype=str)
    return spec, train, controls, conditions


def dense(matrix) -> np.ndarray:
    """A float32 dense copy of a dense or sparse matrix."""
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float32)


def log1p_normalize(counts: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """``log1p(target_sum * counts / counts.sum(1))`` row by row (rows of zeros stay zero)."""
    totals = counts.sum(1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    return np.log1p(counts * scale).astype(np.float32)


def prediction(blocks: list[np.ndarray], rows: list[dict], var_names) -> ad.AnnData:
    """An AnnData of predicted cells: ``blocks[i]`` (cells x genes) all labelled ``rows[i]``."""
    obs = pd.concat([pd.DataFrame([row] * len(block)) for block, row in zip(blocks, rows)], ignore_index=True)
    obs.index = [f"pred_{i}" for i in range(len(obs))]
    out = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=obs.astype("category"))
    out.var_names = list(map(str, var_names))
    return out


def write_outputs(pred: ad.AnnData, out: Path, info: dict) -> None:
    """Write the predicted cells and the run's information beside them (atomic rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.h5ad")
    pred.write_h5ad(tmp)
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def version(distribution: str) -> str | None:
    """The installed version of a distribution (``cellflow-tools``, ``cpa-tools``), or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(distribution)
    except PackageNotFoundError:
        return None


class Clock:
    """Wall-time sections: ``with clock("train"): ...`` then ``clock.times``."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Section:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.times[f"{name}_s"] = round(time.perf_counter() - self.t0, 2)

        return _Section()
