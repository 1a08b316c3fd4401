"""Evaluation of perturbation predictions: metrics, baselines and reports.

Everything is computed in ``log1p(normalize_total(counts, 1e4))`` space; see
``docs/evaluation.md`` for the exact definitions, column names and file formats.
"""

from celldit.eval.baselines import (
    BASELINES,
    Additive,
    Baseline,
    Linear,
    MeanShift,
    NoChange,
    TrainMean,
    gene_pca_embedding,
    make_baseline,
    prediction_requests,
    run_baselines,
)
from celldit.eval.cell_eval import export_cell_eval, run_cell_eval
from celldit.eval.metrics import (
    discrimination_scores,
    energy_distance,
    mae,
    median_bandwidth,
    mmd_rbf,
    mse,
    pearson,
    pearson_delta,
    r2_mean,
    sliced_wasserstein,
    top_k_de_genes,
)
from celldit.eval.pca import PCASpace
from celldit.eval.report import EvaluationResult, evaluate, summarize
from celldit.eval.scoring import CORE_METRICS, EXTRA_METRICS, score_predictions

__all__ = [
    "BASELINES", "Additive", "Baseline", "Linear", "MeanShift", "NoChange", "TrainMean",
    "make_baseline", "prediction_requests", "run_baselines", "gene_pca_embedding",
    "discrimination_scores", "energy_distance", "mae", "median_bandwidth", "mmd_rbf", "mse",
    "pearson", "pearson_delta", "r2_mean", "sliced_wasserstein", "top_k_de_genes",
    "PCASpace", "CORE_METRICS", "EXTRA_METRICS", "score_predictions",
    "EvaluationResult", "evaluate", "export_cell_eval", "run_cell_eval", "summarize",
]
