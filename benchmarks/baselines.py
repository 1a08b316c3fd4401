"""Baselines on the shared real data under the DESIGN.md protocols.

    python benchmarks/baselines.py --data ../shared/data --out baselines.json

Protocols (see docs/evaluation.md):

* ``papalexi_rep3`` - Papalexi 2021: train on bio_rep rep_1 + rep_2, test the perturbations
  with >= 40 rep_3 cells; C = rep_3 control cells; PCA fitted on the training cells.
* ``kang_<cell type>`` - Kang 2018: the stim cells of one ``cluster_id`` are held out; C =
  that type's ctrl cells; training = every other cell; PCA fitted on the training cells.

Writes and prints ``{protocol: {method: {metric: mean over conditions}}}``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import anndata as ad

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from celldit.bench import emit_report
from celldit.data.expression import log_normalize
from celldit.data.spec import PerturbationSpec
from celldit.data.splits import HeldOutCovariateGroup, HeldOutReplicate
from celldit.eval.report import evaluate
from celldit.eval.scoring import CORE_METRICS, EXTRA_METRICS

PAPALEXI = "papalexi2021_thp1_crispr_ko.h5ad"
KANG = "kang2018_pbmc_ifnb_celltypes.h5ad"
METHODS = ("no_change", "train_mean", "mean_shift", "linear")
MIN_TEST_CELLS = 40


def _read(data: Path, name: str) -> ad.AnnData:
    path = data / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; --data must hold the shared .h5ad files")
    return log_normalize(ad.read_h5ad(path))


def _means(summary: dict) -> dict:
    keep = (*CORE_METRICS, *EXTRA_METRICS)
    return {method: {m: entry[m] for m in keep if m in entry}
            for method, entry in summary.items() if isinstance(entry, dict)}


def papalexi_rep3(data: Path, seed: int, methods=METHODS) -> tuple[dict, int]:
    """The Papalexi replicate protocol; returns (method means, number of conditions)."""
    adata = _read(data, PAPALEXI)
    spec = PerturbationSpec("perturbation", control="control")
    split = HeldOutReplicate(spec, key="bio_rep", values=["rep_3"])
    masks = split.masks(adata)
    res = evaluate(adata[masks.test].copy(), None, spec, train=adata[masks.train].copy(),
                   baselines=list(methods), seed=seed, normalize=False, min_cells=MIN_TEST_CELLS)
    return _means(res.summary), res.summary["n_conditions"]


def kang(data: Path, cell_type: str, seed: int, methods=METHODS,
         adata: ad.AnnData | None = None) -> tuple[dict, int]:
    """The Kang held-out-cell-type protocol for one ``cluster_id``."""
    adata = _read(data, KANG) if adata is None else adata
    spec = PerturbationSpec("group_id", control="ctrl", covariate_keys=("cluster_id",))
    split = HeldOutCovariateGroup(spec, key="cluster_id", values=[cell_type])
    masks = split.masks(adata)
    res = evaluate(adata[masks.test].copy(), None, spec, train=adata[masks.train].copy(),
                   baselines=list(methods), seed=seed, normalize=False)
    return _means(res.summary), res.summary["n_conditions"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the shared .h5ad")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads (the PCA problems here are small; default 1)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    start = time.time()
    results: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    results["papalexi_rep3"], sizes["papalexi_rep3"] = papalexi_rep3(args.data, args.seed)
    kang_data = _read(args.data, KANG)
    for cell_type in sorted(kang_data.obs["cluster_id"].astype(str).unique()):
        name = f"kang_{cell_type}"
        results[name], sizes[name] = kang(args.data, cell_type, args.seed, adata=kang_data)
    emit_report(results, args.out)
    print(f"conditions per protocol: {sizes}; {time.time() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
