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
from anndata import AnnData

from ..data.spec import PerturbationSpec

__all__ = ["CELL_EVAL_CELLTYPE_COL", "CELL_EVAL_CONTROL", "CELL_EVAL_PERT_COL", "export_cell_eval", "run_cell_eval"]

CELL_EVAL_PERT_COL = "target_gene"
CELL_EVAL_CELLTYPE_COL = "celltype"
CELL_EVAL_CONTROL = "non-targeting"


def _frame(labels: list[str], covs: list[tuple[str, ...]], spec: PerturbationSpec) -> pd.DataFrame:
    obs = pd.DataFrame({CELL_EVAL_PERT_COL: pd.Categorical(
        [CELL_EVAL_CONTROL if lab in spec.control_labels else lab for lab in labels])})
    if spec.covariate_keys:
        obs[CELL_EVAL_CELLTYPE_COL] = pd.Categorical([" | ".join(c) for c in covs])
    obs.index = obs.index.astype(str)
    return obs


def _write(blocks: list[tuple[np.ndarray, str, tuple[str, ...]]], genes: list[str], spec: PerturbationSpec,
           path: Path) -> None:
    x = np.concatenate([b for b, _, _ in blocks]).astype(np.float32)
    labels = [lab for b, lab, _ in blocks for _ in range(len(b))]
    covs = [c for b, _, c in blocks for _ in range(len(b))]
    AnnData(x, obs=_frame(labels, covs, spec), var=pd.DataFrame(index=pd.Index(genes))).write_h5ad(path)


def export_cell_eval(real: Any, predictions: dict[str, Any], spec: PerturbationSpec, out_dir: str | Path,
                     max_cells: int = 1000, seed: int = 0) -> dict[str, Path]:
    """Write cell-eval's inputs (see the module notes) and a README with the commands.

    ``real``: :class:`~celldit.eval.cells.GroupedCells` (or an AnnData, log1p-normalised);
    ``predictions``: method -> prediction (or predicted AnnData). At most ``max_cells`` cells
    of each condition (and of each covariate group's controls) are written per file, drawn
    with a seeded generator, so the files stay small whatever the data's size.
    """
    from .cells import CellsPrediction, GroupedCells

    if isinstance(real, AnnData):
        real = GroupedCells.from_adata(real, spec)
    predictions = {m: CellsPrediction(GroupedCells.from_adata(p, spec, prediction=True)) if isinstance(p, AnnData)
                   else p for m, p in predictions.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])

    def pick(rows: np.ndarray) -> np.ndarray:
        return rows if len(rows) <= max_cells else np.sort(rng.choice(rows, max_cells, replace=False))

    controls = [(real.cells(pick(rows)), key[0], key[1:]) for key, rows in sorted(real.groups.items())
                if key[0] in spec.control_labels]
    perturbed = [(real.cells(pick(rows)), key[0], key[1:]) for key, rows in sorted(real.groups.items())
                 if key[0] not in spec.control_labels]
    files = {"real": out_dir / "real.h5ad"}
    _write(perturbed + controls, real.genes, spec, files["real"])
    celltype = f" --celltype-col {CELL_EVAL_CELLTYPE_COL}" if spec.covariate_keys else ""
    lines = ["# cell-eval inputs", "", "Run the `cell-eval` package on these files (or `celldit evaluate "
             "--cell-eval`), e.g.:", ""]
    for method, prediction in predictions.items():
        blocks = [(prediction.sample(key, min(max_cells, prediction.size(key)), rng), key[0], key[1:])
                  for key in sorted(prediction.keys()) if key[0] not in spec.control_labels]
        files[f"pred_{method}"] = out_dir / f"pred_{method}.h5ad"
        _write(blocks + controls, real.genes, spec, files[f"pred_{method}"])
        lines += [f"    cell-eval run -ap pred_{method}.h5ad -ar real.h5ad --pert-col {CELL_EVAL_PERT_COL} "
                  f"--control-pert {CELL_EVAL_CONTROL}{celltype} -o cell_eval_{method}"]
    lines += ["", f"`{CELL_EVAL_PERT_COL}` holds the perturbation label; controls are pooled under "
              f"`{CELL_EVAL_CONTROL}`. At most {max_cells} cells of a condition per file."]
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
