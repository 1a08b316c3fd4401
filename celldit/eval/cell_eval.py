"""The bridge to the ``cell-eval`` package (Arc Institute's evaluation suite): export, and run it.

:func:`export_cell_eval` writes ``real.h5ad`` and ``pred_<method>.h5ad`` in cell-eval's
layout: ``obs['target_gene']`` holds the perturbation label (``"non-targeting"`` for control
cells) and, when the evaluation has covariates, ``obs['celltype']`` holds their values (joined
by `` | ``), cell-eval's ``--celltype-col``; each prediction file also holds the real control
cells (cell-eval needs controls on both sides); ``X`` is log1p-normalised.

:func:`run_cell_eval` runs cell-eval on those files when the package is installed (it is not
a dependency of celldit: ``pip install cell-eval``) and returns the mean of each of its
metrics per method, split by cell type like its ``--celltype-col``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..data.spec import PerturbationSpec

__all__ = ["CELL_EVAL_CELLTYPE_COL", "CELL_EVAL_CONTROL", "CELL_EVAL_PERT_COL", "export_cell_eval", "run_cell_eval"]

CELL_EVAL_PERT_COL = "target_gene"
CELL_EVAL_CELLTYPE_COL = "celltype"
CELL_EVAL_CONTROL = "non-targeting"


def _tag(adata: AnnData, spec: PerturbationSpec) -> AnnData:
    labels = spec.labels(adata)
    x = adata.X
    out = AnnData(x.copy() if sp.issparse(x) else np.asarray(x, dtype=np.float32).copy(),
                  obs=pd.DataFrame(index=[str(i) for i in range(adata.n_obs)]),
                  var=pd.DataFrame(index=adata.var_names.astype(str)))
    out.obs[CELL_EVAL_PERT_COL] = pd.Categorical([CELL_EVAL_CONTROL if lab in spec.control_labels else lab
                                                  for lab in labels])
    if spec.covariate_keys:
        covs = spec.covariates(adata)
        out.obs[CELL_EVAL_CELLTYPE_COL] = pd.Categorical(covs.agg(" | ".join, axis=1).to_numpy())
    return out


def _stack(a: AnnData, b: AnnData) -> AnnData:
    def dense(x):
        return x.toarray() if sp.issparse(x) else np.asarray(x)

    obs = pd.concat([a.obs, b.obs], ignore_index=True)
    obs.index = obs.index.astype(str)
    for column in obs.columns:
        obs[column] = pd.Categorical(obs[column].astype(str))
    return AnnData(np.vstack([dense(a.X), dense(b.X)]).astype(np.float32), obs=obs, var=a.var.copy())


def export_cell_eval(real: AnnData, predictions: dict[str, AnnData], spec: PerturbationSpec,
                     out_dir: str | Path) -> dict[str, Path]:
    """Write cell-eval's inputs (see the module notes) and a README with the commands."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"real": out_dir / "real.h5ad"}
    tagged_real = _tag(real, spec)
    tagged_real.write_h5ad(files["real"])
    controls = tagged_real[tagged_real.obs[CELL_EVAL_PERT_COL] == CELL_EVAL_CONTROL]
    celltype = f" --celltype-col {CELL_EVAL_CELLTYPE_COL}" if spec.covariate_keys else ""
    lines = ["# cell-eval inputs", "", "Run the `cell-eval` package on these files (or `celldit evaluate "
             "--cell-eval`), e.g.:", ""]
    for method, pred in predictions.items():
        tagged = _tag(pred, spec)
        perturbed = tagged[tagged.obs[CELL_EVAL_PERT_COL] != CELL_EVAL_CONTROL]
        files[f"pred_{method}"] = out_dir / f"pred_{method}.h5ad"
        _stack(perturbed, controls).write_h5ad(files[f"pred_{method}"])
        lines += [f"    cell-eval run -ap pred_{method}.h5ad -ar real.h5ad --pert-col {CELL_EVAL_PERT_COL} "
                  f"--control-pert {CELL_EVAL_CONTROL}{celltype} -o cell_eval_{method}"]
    lines += ["", f"`{CELL_EVAL_PERT_COL}` holds the perturbation label; controls are pooled under "
              f"`{CELL_EVAL_CONTROL}`."]
    if spec.covariate_keys:
        lines += [f"`{CELL_EVAL_CELLTYPE_COL}` holds the covariates ({', '.join(spec.covariate_keys)}), joined by ` | `."]
    files["readme"] = out_dir / "README.md"
    files["readme"].write_text("\n".join(lines) + "\n")
    return files


def run_cell_eval(files: dict[str, Path], out_dir: str | Path, num_threads: int = 1) -> dict[str, dict[str, Any]]:
    """Run cell-eval on the exported files; ``{method: {metric: mean over perturbations}}``
    (averaged over cell types when there are several).

    Raises
    ------
    ValueError
        When the cell-eval package is not installed (``pip install cell-eval``).
    """
    try:
        from cell_eval import MetricsEvaluator
    except ImportError as err:
        raise ValueError(f"--cell-eval needs the cell-eval package (pip install cell-eval): {err}") from None
    import anndata as ad

    real = ad.read_h5ad(files["real"])
    scores: dict[str, dict[str, Any]] = {}
    for key, path in files.items():
        if not key.startswith("pred_"):
            continue
        method = key[len("pred_"):]
        pred = ad.read_h5ad(path)
        groups = (sorted(real.obs[CELL_EVAL_CELLTYPE_COL].unique()) if CELL_EVAL_CELLTYPE_COL in real.obs
                  else [None])
        per_group = []
        for group in groups:
            r = real if group is None else real[real.obs[CELL_EVAL_CELLTYPE_COL] == group].copy()
            p = pred if group is None else pred[pred.obs[CELL_EVAL_CELLTYPE_COL] == group].copy()
            outdir = Path(out_dir) / f"cell_eval_{method}" / ("all" if group is None else str(group).replace("/", "_"))
            evaluator = MetricsEvaluator(adata_pred=p, adata_real=r, control_pert=CELL_EVAL_CONTROL,
                                         pert_col=CELL_EVAL_PERT_COL, num_threads=num_threads, outdir=str(outdir))
            _, agg = evaluator.compute(profile="full", write_csv=True)
            table = agg.to_pandas().set_index("statistic")
            per_group.append(table.loc["mean"])
        means = pd.concat(per_group, axis=1).apply(pd.to_numeric, errors="coerce").mean(axis=1)
        scores[method] = {k: (None if not np.isfinite(v) else float(v)) for k, v in means.items()}
    return scores
