"""CPA (cpa-tools, compositional perturbation autoencoder) on one split: train, then counterfactual cells.

Runs in the CPA virtual environment (see ``benchmarks/peers.py --setup``)::

    python benchmarks/peer_runners/cpa_runner.py --split DIR --seed 0 \
        --settings '{"preset": "kang_tutorial", "max_epochs": 200}' --out pred.h5ad

The documented cpa-tools 0.8 workflow (its Kang and Norman tutorials): raw counts in ``X``
with the negative-binomial loss (``recon_loss="nb"``, ``is_count_data=True``), one
``CPA.setup_anndata`` over every cell the model will see, a ``split_key`` column holding
``train`` / ``valid`` / ``ood``, ``CPA.train(plan_kwargs=...)`` with early stopping on the
validation cells, then ``CPA.predict`` of cells whose counts are control cells and whose
perturbation label is the one to predict (the basal state is encoded from the control cell and
the perturbation's embedding is added).

Here the ``ood`` cells are the query: one copy of the held-out control cells per condition,
labelled with that condition (never trained on); ``valid`` is a seeded 10% of the training
cells. ``predict`` returns the negative-binomial means (counts at the control cell's library
size); they are log1p(normalize_total(., 1e4))-normalised like the data the scores read.
Covariates (``covariate_keys``) are CPA categorical covariates; the pairing keys are not used
(CPA has no pairing; the replicate is carried by the control cell's own basal state).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Clock,
    dense,
    log1p_normalize,
    parse_args,
    prediction,
    read_split,
    version,
    write_outputs,
)

# The two documented starting points (cpa-tools docs, tutorials Kang.ipynb and Norman.ipynb):
# model_params (CPA constructor) and trainer_params (train(plan_kwargs=...)).
PRESETS = {
    "kang_tutorial": {
        "model": {"n_latent": 64, "recon_loss": "nb", "doser_type": "linear", "n_hidden_encoder": 128,
                  "n_layers_encoder": 2, "n_hidden_decoder": 512, "n_layers_decoder": 2,
                  "use_batch_norm_encoder": True, "use_layer_norm_encoder": False, "use_batch_norm_decoder": False,
                  "use_layer_norm_decoder": True, "dropout_rate_encoder": 0.0, "dropout_rate_decoder": 0.1,
                  "variational": False},
        "plan": {"n_epochs_kl_warmup": None, "n_epochs_pretrain_ae": 30, "n_epochs_adv_warmup": 50,
                 "n_epochs_mixup_warmup": 0, "mixup_alpha": 0.0, "adv_steps": None, "n_hidden_adv": 64,
                 "n_layers_adv": 3, "use_batch_norm_adv": True, "use_layer_norm_adv": False, "dropout_rate_adv": 0.3,
                 "reg_adv": 20.0, "pen_adv": 5.0, "lr": 3e-4, "wd": 4e-7, "adv_lr": 3e-4, "adv_wd": 4e-7,
                 "adv_loss": "cce", "doser_lr": 3e-4, "doser_wd": 4e-7, "do_clip_grad": True,
                 "gradient_clip_value": 1.0, "step_size_lr": 10},
        "batch_size": 512,
    },
    "norman_tutorial": {
        "model": {"n_latent": 128, "recon_loss": "nb", "doser_type": "linear", "n_hidden_encoder": 512,
                  "n_layers_encoder": 2, "n_hidden_decoder": 256, "n_layers_decoder": 2,
                  "use_batch_norm_encoder": True, "use_layer_norm_encoder": False, "use_batch_norm_decoder": False,
                  "use_layer_norm_decoder": False, "dropout_rate_encoder": 0.0, "dropout_rate_decoder": 0.2,
                  "variational": False},
        "plan": {"n_epochs_kl_warmup": None, "n_epochs_pretrain_ae": 30, "n_epochs_adv_warmup": 100,
                 "n_epochs_mixup_warmup": 10, "mixup_alpha": 0.2, "adv_steps": 2, "n_hidden_adv": 128,
                 "n_layers_adv": 2, "use_batch_norm_adv": True, "use_layer_norm_adv": False, "dropout_rate_adv": 0.2,
                 "reg_adv": 50.0, "pen_adv": 1.0, "lr": 3e-4, "wd": 4e-7, "adv_lr": 3e-4, "adv_wd": 4e-7,
                 "adv_loss": "cce", "doser_lr": 3e-4, "doser_wd": 4e-7, "do_clip_grad": False,
                 "gradient_clip_value": 5.0, "step_size_lr": 45},
        "batch_size": 1024,
    },
}
# Settings a run may give: the preset, the training sizes, and any model / plan key of a preset
# (laid over the preset's value).
RUN_KEYS = {"preset": "kang_tutorial", "max_epochs": 2000, "batch_size": None, "early_stopping_patience": 5,
            "check_val_every_n_epoch": 5, "valid_fraction": 0.1}
MODEL_KEYS = set(PRESETS["kang_tutorial"]["model"])
PLAN_KEYS = set(PRESETS["kang_tutorial"]["plan"]) | set(PRESETS["norman_tutorial"]["plan"])


def resolve(settings: dict) -> dict:
    """The full settings of a run: ``RUN_KEYS`` defaults, the preset's model / plan, overrides."""
    unknown = sorted(set(settings) - set(RUN_KEYS) - MODEL_KEYS - PLAN_KEYS)
    if unknown:
        raise SystemExit(f"unknown CPA settings {unknown}; known: {sorted(set(RUN_KEYS) | MODEL_KEYS | PLAN_KEYS)}")
    run = {**RUN_KEYS, **{k: v for k, v in settings.items() if k in RUN_KEYS}}
    if run["preset"] not in PRESETS:
        raise SystemExit(f"unknown CPA preset {run['preset']!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[run["preset"]]
    run["batch_size"] = run["batch_size"] or preset["batch_size"]
    run["model"] = {**preset["model"], **{k: v for k, v in settings.items() if k in MODEL_KEYS}}
    run["plan"] = {**preset["plan"], **{k: v for k, v in settings.items() if k in PLAN_KEYS}}
    return run


def _query(train, controls, conditions, spec: dict, seed: int, valid_fraction: float):
    """One AnnData of raw counts: training cells (``train`` / ``valid``) then one copy of the
    control cells per condition, relabelled (``ood``); returns it and each condition's rows."""
    import anndata as ad
    import pandas as pd

    keys = [spec["perturbation_key"], *spec["covariate_keys"]]
    rng = np.random.default_rng(seed)
    parts, split, blocks = [], [], []
    obs = train.obs[keys].astype(str).copy()
    parts.append(ad.AnnData(dense(train.layers["counts"]), obs=obs))
    split += list(np.where(rng.random(train.n_obs) < valid_fraction, "valid", "train"))
    start = train.n_obs
    for i, row in conditions.iterrows():
        obs = controls.obs[keys].astype(str).copy()
        for k in keys:
            obs[k] = str(row[k])
        obs.index = [f"q{i}_{name}" for name in controls.obs_names]
        parts.append(ad.AnnData(dense(controls.layers["counts"]), obs=obs))
        split += ["ood"] * controls.n_obs
        blocks.append(np.arange(start, start + controls.n_obs))
        start += controls.n_obs
    adata = ad.concat(parts)
    adata.obs_names_make_unique()
    adata.var_names = list(map(str, train.var_names))
    adata.obs["split"] = pd.Categorical(split)
    for k in keys:
        adata.obs[k] = adata.obs[k].astype(str)
    return adata, blocks


def _history(model) -> tuple[int | None, float | None]:
    """Epochs run and the last training epoch's reconstruction loss (None where not recorded)."""
    try:
        history = model.epoch_history
        train = history[history["mode"] == "train"]
        return int(train["epoch"].max()) + 1, float(train["recon_loss"].iloc[-1])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None, None


def main() -> int:
    args = parse_args(__doc__)
    settings = resolve(args.settings)
    spec, train, controls, conditions = read_split(args.split)
    clock = Clock()
    with clock("setup"):
        import cpa

        adata, blocks = _query(train, controls, conditions, spec, args.seed, settings["valid_fraction"])
        labels = adata.obs[spec["perturbation_key"]]
        # cpa-tools 0.8.1 looks SMILES up even without a smiles_key (KeyError: None) unless the
        # class map is set; no drug (RDKit) embeddings are used here
        cpa.CPA.pert_smiles_map = {}
        cpa.CPA.setup_anndata(adata, perturbation_key=spec["perturbation_key"], control_group=spec["control"],
                              categorical_covariate_keys=list(spec["covariate_keys"]), is_count_data=True,
                              max_comb_len=int(max(lab.count("+") + 1 for lab in labels)))
        model = cpa.CPA(adata, split_key="split", train_split="train", valid_split="valid", test_split="ood",
                        **settings["model"], seed=args.seed)
    print(f"[cpa] setup {clock.times}", file=sys.stderr, flush=True)
    with clock("train"):
        model.train(max_epochs=settings["max_epochs"], use_gpu=False, batch_size=settings["batch_size"],
                    plan_kwargs=dict(settings["plan"]), early_stopping_patience=settings["early_stopping_patience"],
                    check_val_every_n_epoch=settings["check_val_every_n_epoch"], save_path=False,
                    enable_progress_bar=False)
    print(f"[cpa] trained {clock.times}", file=sys.stderr, flush=True)
    with clock("predict"):
        # a copy of the query rows: scvi-tools transfers the registration (same category codes)
        query = adata[np.concatenate(blocks)].copy()
        model.predict(query, batch_size=2048)
        means = np.asarray(query.obsm["CPA_pred"], dtype=np.float64)
    rows = conditions.to_dict("records")
    cut = np.cumsum([len(b) for b in blocks])[:-1]
    preds = [log1p_normalize(m) for m in np.split(means, cut)]
    labels = [{k: row[k] for k in [spec["perturbation_key"], *spec["covariate_keys"]]} for row in rows]
    pred = prediction(preds, labels, train.var_names)
    epochs, final_loss = _history(model)
    info = {"peer": "cpa", "version": version("cpa-tools"), "seed": args.seed, "settings": settings,
            **clock.times, "epochs": epochs, "final_loss": final_loss,
            "train_cells": int((adata.obs["split"] != "ood").sum()), "source_cells": controls.n_obs,
            "predicted_cells": pred.n_obs}
    write_outputs(pred, args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
