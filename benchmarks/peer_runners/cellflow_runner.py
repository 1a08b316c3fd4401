"""CellFlow (cellflow-tools, OT flow matching) on one split: train, then counterfactual cells.

Runs in the CellFlow virtual environment (see ``benchmarks/peers.py --setup``)::

    python benchmarks/peer_runners/cellflow_runner.py --split DIR --seed 0 \
        --settings '{"iterations": 12000, "noise": 1.0, "hidden_dropout": 0.1}' --out pred.h5ad

The cells live in the first ``n_pcs`` principal components of the training cells' log1p
values (``cellflow.preprocessing.centered_pca``); held-out controls are projected onto them
(``project_pca``) and predictions are mapped back to genes with the same PCA's inverse
(``reconstruct_pca``: ``Z @ PCs.T + mean``; values are left as they come, no clipping).
The ODE is solved with CellFlow's solver, Tsit5: adaptive (its default, PID rtol = atol = 1e-5)
when ``ode_steps`` is None, else at ``ode_steps`` fixed steps (diffrax's ``ConstantStepSize``;
on one CPU thread the adaptive solve of papalexi's 23 x 666 cells at the budget's widths took
longer than the 12,000 training iterations).
Perturbations and covariates are one-hot vectors in ``uns``; the pairing keys and the
covariates are CellFlow ``split_covariates`` (each control population is transported to the
perturbed cells of its own replicate / cell type; the controls of a group without perturbed
training cells, as the held-out cell type in kang, are left out of training, CellFlow refusing
a source without a target); covariates are also ``sample_covariates`` (part of the condition).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Clock, dense, parse_args, prediction, read_split, version, write_outputs  # noqa: E402

DEFAULTS = {  # cellflow-tools 0.0.9 CellFlow.prepare_model / train defaults, except the sizes marked
    "n_pcs": 50, "iterations": 12000, "batch_size": 1024, "lr": 5e-5, "multi_steps": 20,
    "noise": 0.0, "hidden_dropout": 0.0, "decoder_dropout": 0.0, "cond_output_dropout": 0.9,
    "condition_embedding_dim": 256, "time_freqs": 1024,
    "hidden_dims": [2048, 2048, 2048], "decoder_dims": [4096, 4096, 4096], "time_encoder_dims": [2048, 2048, 2048],
    "epsilon": 1.0, "tau_a": 1.0, "tau_b": 1.0, "ode_steps": None,
}


def _one_hot(labels) -> dict[str, np.ndarray]:
    labels = sorted(set(map(str, labels)))
    eye = np.eye(len(labels), dtype=np.float32)
    return {lab: eye[i] for i, lab in enumerate(labels)}


def _prepare(train, controls, spec: dict, s: dict) -> None:
    """PCA, control flags and one-hot representations, in place."""
    import cellflow.preprocessing as cfpp

    for adata in (train, controls):
        adata.X = dense(adata.X)
        adata.obs["is_control"] = adata.obs[spec["perturbation_key"]].astype(str) == spec["control"]
    cfpp.centered_pca(train, n_comps=s["n_pcs"], keep_centered_data=False)
    cfpp.project_pca(controls, ref_adata=train)
    train.uns["pert_onehot"] = _one_hot(train.obs[spec["perturbation_key"]])
    for key in spec["covariate_keys"]:
        train.uns[f"{key}_onehot"] = _one_hot(list(train.obs[key]) + list(controls.obs[key]))
    controls.uns = dict(train.uns)


def _with_targets(train, spec: dict):
    """The training cells less the controls of split-covariate groups without perturbed cells
    (CellFlow refuses a source population with no target; e.g. the held-out cell type's
    controls in kang, which are the prediction's source instead)."""
    keys = list(spec["pair_keys"]) + list(spec["covariate_keys"])
    if not keys:
        return train
    group = train.obs[keys].astype(str).agg("|".join, axis=1)
    has_target = set(group[~train.obs["is_control"].to_numpy()])
    keep = group.isin(has_target).to_numpy()
    return train if keep.all() else train[keep].copy()


def _model(train, spec: dict, s: dict, seed: int):
    import optax
    from cellflow.model import CellFlow
    from cellflow.utils import match_linear

    covs = list(spec["covariate_keys"])
    cf = CellFlow(train, solver="otfm")
    cf.prepare_data(sample_rep="X_pca", control_key="is_control",
                    perturbation_covariates={"perturbation": (spec["perturbation_key"],)},
                    perturbation_covariate_reps={"perturbation": "pert_onehot"},
                    sample_covariates=covs or None, sample_covariate_reps={k: f"{k}_onehot" for k in covs} or None,
                    split_covariates=(list(spec["pair_keys"]) + covs) or None)
    cf.prepare_model(
        condition_embedding_dim=s["condition_embedding_dim"], cond_output_dropout=s["cond_output_dropout"],
        time_freqs=s["time_freqs"], time_encoder_dims=tuple(s["time_encoder_dims"]),
        hidden_dims=tuple(s["hidden_dims"]), hidden_dropout=s["hidden_dropout"],
        decoder_dims=tuple(s["decoder_dims"]), decoder_dropout=s["decoder_dropout"],
        probability_path={"constant_noise": s["noise"]},
        match_fn=functools.partial(match_linear, epsilon=s["epsilon"], tau_a=s["tau_a"], tau_b=s["tau_b"]),
        optimizer=optax.MultiSteps(optax.adam(s["lr"]), s["multi_steps"]), seed=seed)
    return cf


def main() -> int:
    args = parse_args(__doc__)
    settings = {**DEFAULTS, **args.settings}
    unknown = sorted(set(args.settings) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown CellFlow settings {unknown}; known: {sorted(DEFAULTS)}")
    spec, train, controls, conditions = read_split(args.split)
    clock = Clock()
    with clock("setup"):
        _prepare(train, controls, spec, settings)
        fit = _with_targets(train, spec)
        cf = _model(fit, spec, settings, args.seed)
    print(f"[cellflow] setup {clock.times}", file=sys.stderr, flush=True)
    with clock("train"):
        cf.train(num_iterations=settings["iterations"], batch_size=settings["batch_size"],
                 valid_freq=settings["iterations"] + 1)
    keys = [spec["perturbation_key"], *spec["covariate_keys"], *spec["pair_keys"]]
    covariate_data = conditions[["condition", *keys]].copy()
    covariate_data["is_control"] = False
    print(f"[cellflow] trained {clock.times}", file=sys.stderr, flush=True)
    with clock("predict"):
        import diffrax
        import jax

        solve = {} if settings["ode_steps"] is None else {
            "solver": diffrax.Tsit5(), "stepsize_controller": diffrax.ConstantStepSize(),
            "dt0": 1.0 / int(settings["ode_steps"])}
        out = cf.predict(controls, covariate_data=covariate_data, sample_rep="X_pca", condition_id_key="condition",
                         rng=jax.random.PRNGKey(args.seed), **solve)
    pcs, mean = np.asarray(train.varm["PCs"]), np.asarray(train.varm["X_mean"]).reshape(1, -1)
    rows = conditions.to_dict("records")
    blocks = [np.asarray(out[row["condition"]]) @ pcs.T + mean for row in rows]
    labels = [{k: row[k] for k in [spec["perturbation_key"], *spec["covariate_keys"]]} for row in rows]
    pred = prediction(blocks, labels, train.var_names)
    loss = cf.trainer.training_logs.get("loss", [])
    info = {"peer": "cellflow", "version": version("cellflow-tools"), "seed": args.seed, "settings": settings,
            **clock.times, "final_loss": float(np.mean(loss[-100:])) if len(loss) else None,
            "train_cells": fit.n_obs, "source_cells": controls.n_obs, "predicted_cells": pred.n_obs}
    write_outputs(pred, args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
