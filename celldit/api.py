"""CellDiT: the user-facing model (register AnnData, fit, generate, counterfactual, save/load).

The split follows scvi-tools: this class owns the registration of a dataset (keys,
control labels, genes, vocabulary), the torch module is
:class:`~celldit.models.cell.CellFlowNet`, the training plan is
:class:`~celldit.train.cell_plan.CellTrainingPlan`, and sampling lives in
:mod:`celldit.sampling_cells`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .data.anndata import CellDataModule, CenteredRows, ExpressionRows, PairedBatches, select_genes
from .data.conditions import ConditionTable, build_condition_table, cell_conditions
from .data.priors import align_features, expression_gene_features, read_feature_table
from .data.spec import PerturbationSpec
from .data.vocab import PerturbationVocab
from .flow import RectifiedFlow
from .io import load_model_folder, read_extra_json, save_model_folder
from .models.cell import CellFlowNet
from .models.conditioning import PerturbationEncoder
from .sampling_cells import CellSampler
from .tokenizers import TOKENIZERS, modules_from_correlation, modules_from_gene_sets, modules_from_labels
from .train.cell_plan import CellTrainingPlan
from .train.trainer import TrainerSettings, fit as fit_plan

FORMAT_VERSION = 1
BANK_PER_GROUP = 500  # control cells per covariate group kept for generate() with a control source


def _group_codes(frame: pd.DataFrame) -> np.ndarray:
    """(n,) code of each row's combination of values (0 groups -> all zeros)."""
    if frame.shape[1] == 0:
        return np.zeros(len(frame), dtype=np.int64)
    return frame.astype(str).agg("\x1f".join, axis=1).factorize(sort=True)[0].astype(np.int64)


class CellDiT(CellSampler):
    """A perturbation-conditioned generator of cells: a DiT trained with rectified flow.

    Parameters
    ----------
    adata
        Training cells (counts in ``X`` or ``layers['counts']``, or log-normalised ``X``),
        in memory or backed. Hold out test cells before passing it.
    perturbation_key, control, delimiter, dose_key, covariate_keys
        Registration of the dataset (see :class:`~celldit.data.spec.PerturbationSpec`):
        the ``obs`` column of perturbation labels, the control label(s), the combination
        delimiter (GEARS ``A+B`` / ``A+ctrl``), an optional dose column, and covariates
        (cell type, donor ...). Saved with the model.
    pair_keys
        Extra ``obs`` columns that control/target pairs must share (e.g. a replicate or
        batch column); unlike covariates they are not model inputs.
    center
        With ``pair_keys``: model each cell relative to the control mean of its batch (the
        values of ``pair_keys``), and centre new control cells on their own mean at
        prediction time. Batches of a screen differ mostly by such an offset (Papalexi's
        replicates: energy distance 0.83 between rep_1 and rep_3 controls, 0.075 once centred).
    genes, n_top_genes
        Gene set: ``"all"``, ``"hvg"`` (``n_top_genes`` highly variable) or a list.
    tokenizer
        ``"gene"`` (a token per gene), ``"module"`` (a token per gene module) or
        ``"latent"`` (a PCA codec's latent split into tokens).
    source
        ``"control"``: the flow transports control cells (pairs within covariates and
        ``pair_keys``). ``"noise"``: the flow generates from Gaussian noise; a
        counterfactual inverts the control cell to noise first.
    anchor
        Control source only: start each flow at control cell + the condition's mean shift
        (see :mod:`celldit.data.conditions`); the network learns the rest. In a covariate
        group never trained with the condition, the other groups' shifts are weighted by
        how alike their control cells are (see :class:`~celldit.data.conditions.ConditionTable`).
    ot, ot_dims
        Re-pair sources and targets by minibatch optimal transport (control source), with
        the cost measured in the ``ot_dims`` leading principal components of the training
        cells (None: all genes).
    perturbation_features
        Prior features for perturbations: ``"expression"`` (built from the control cells
        for measured target genes), a DataFrame or table path indexed by name, or None.
    modules, n_modules
        Module tokenizer: a ``var`` column name, a dict of gene sets, or None to cluster
        genes by correlation into ``n_modules`` (default ceil(G / 16)).
    latent_dim, token_dim
        Latent tokenizer: codec width and values per token.
    hidden_size, depth, num_heads, mlp_ratio
        Backbone size.
    cfg_dropout
        Probability of replacing a training cell's perturbation tokens by the null token:
        the unconditional branch of classifier-free guidance, and a regulariser of the
        control-source flow (measured in docs/cells.md).
    covariate_dropout
        Probability of hiding the covariate values of a training block (an "unknown" token);
        with anchors, such a block starts from the anchor its covariate group would get had
        it never been trained with the condition (the other groups' shifts, weighted). A
        perturbation asked in a covariate group where it had no training cells (a held-out
        cell type) is then predicted with the unknown token, from the cell's state.
    seed
        Seed of module clustering, codec fitting and weight initialisation.
    """

    def __init__(self, adata: AnnData, perturbation_key: str = "perturbation", control: str | Sequence[str] = "control",
                 covariate_keys: Sequence[str] = (), *, delimiter: str = "+", dose_key: str | None = None,
                 pair_keys: Sequence[str] = (), genes: str | Sequence[str] = "all", n_top_genes: int = 2000,
                 tokenizer: str = "module", source: str = "control", anchor: bool = True, ot: bool = True,
                 ot_dims: int | None = 32, center: bool = True,
                 perturbation_features: str | pd.DataFrame | Path | None = "expression",
                 modules: str | Mapping[str, Sequence[str]] | None = None, n_modules: int | None = None,
                 latent_dim: int = 32, token_dim: int = 4, hidden_size: int = 64, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, cfg_dropout: float = 0.2,
                 covariate_dropout: float = 0.2, seed: int = 0):
        if tokenizer not in ("gene", "module", "latent"):
            raise ValueError(f"tokenizer={tokenizer!r}: use 'gene', 'module' or 'latent'")
        if source not in ("control", "noise"):
            raise ValueError(f"source={source!r}: use 'control' or 'noise'")
        self.spec = PerturbationSpec(perturbation_key, control, delimiter, dose_key, tuple(covariate_keys))
        self.spec.validate(adata)
        for key in pair_keys:
            self.spec._require_key(adata, key, "pair_keys")
        torch.manual_seed(seed)
        self.genes = select_genes(adata, genes, n_top_genes)
        expr = ExpressionRows(adata, self.genes)
        self.space = "log1p_normalized" if expr.counts else "as_given"
        expr = self._centred(expr, adata, list(pair_keys) if center else [])
        keys = cell_conditions(adata.obs, self.spec)
        cov_frame = self.spec.covariates(adata)
        cov_group = _group_codes(cov_frame)
        pair_group = _group_codes(pd.concat([cov_frame, adata.obs[list(pair_keys)].astype(str)], axis=1))
        use_anchor = anchor and source == "control"
        table, cond_id = build_condition_table(keys, cov_group, lambda idx: expr.all_rows(idx).mean(0),
                                               len(self.genes), anchored=use_anchor)
        cov_key = cov_frame.agg("\x1f".join, axis=1) if cov_frame.shape[1] else pd.Series("", index=cov_frame.index)
        self.trained_groups = sorted({f"{c}\x1e{g}" for c, g in zip(cond_id, cov_key)})  # (condition row, covariates)
        ctrl_rows = np.flatnonzero(cond_id == 0)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.permutation(adata.n_obs)[:20000])
        x_sample = expr.all_rows(sample)
        prior = self._prior_table(perturbation_features, expr.all_rows(ctrl_rows[:5000]), seed)
        self.vocab = PerturbationVocab.from_adata(adata, self.spec, extra=[] if prior is None else prior.index)
        self.conditions = table
        self.settings: dict[str, Any] = dict(
            tokenizer=tokenizer, source=source, anchor=use_anchor, ot=ot, ot_dims=ot_dims,
            center=bool(center and pair_keys), pair_keys=list(pair_keys),
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            cfg_dropout=float(cfg_dropout), covariate_dropout=float(covariate_dropout), seed=seed)
        tok_kwargs = self._tokenizer_kwargs(tokenizer, adata, x_sample, modules, n_modules, latent_dim, token_dim, seed)
        self.network = self._build_network(tok_kwargs, prior)
        if tokenizer == "latent":
            self.network.tokenizer.fit(x_sample, seed=seed)
        self._bank_from(expr, ctrl_rows, cov_frame, adata.obs_names, rng)
        ot_basis = None
        if ot and ot_dims:
            from sklearn.decomposition import PCA

            k = int(min(ot_dims, x_sample.shape[0] - 1, x_sample.shape[1]))
            ot_basis = PCA(k, random_state=seed).fit(x_sample).components_.T.astype(np.float32)  # (G, k)
        self._train = dict(expr=expr, cond_id=cond_id, pair_group=pair_group, cov_group=cov_group, ot_basis=ot_basis,
                           cov_idx=self.vocab.encode_covariates(cov_frame))
        self.plan: CellTrainingPlan | None = None
        self.history: dict[str, Any] = {}
        self.is_trained = False

    # ------------------------------------------------------------------ registration
    def _centred(self, expr: ExpressionRows, adata: AnnData, keys: list[str]):
        """Rows relative to their batch's control mean (see ``center``); sets ``self.reference``."""
        ctrl = self.spec.control_mask(adata)
        self.reference = torch.from_numpy(expr.all_rows(np.flatnonzero(ctrl)).mean(0))
        if not keys:
            return expr
        batch = _group_codes(adata.obs[keys].astype(str))
        values = adata.obs[keys].astype(str).agg("/".join, axis=1).to_numpy()
        centers = []
        for b in range(batch.max() + 1):
            rows = np.flatnonzero((batch == b) & ctrl)
            if rows.size == 0:
                raise ValueError(f"batch {values[batch == b][0]!r} of pair_keys {keys} has no control cells to "
                                 "centre on; pass center=False or drop that batch")
            centers.append(expr.all_rows(rows).mean(0))
        return CenteredRows(expr, np.stack(centers), batch)

    def _prior_table(self, features, x_ctrl: np.ndarray, seed: int) -> pd.DataFrame | None:
        if features is None:
            return None
        if isinstance(features, str) and features == "expression":
            return expression_gene_features(x_ctrl, self.genes, seed=seed)
        return read_feature_table(features)

    def _tokenizer_kwargs(self, name, adata, x_sample, modules, n_modules, latent_dim, token_dim, seed) -> dict:
        G, D = len(self.genes), self.settings["hidden_size"]
        if name == "gene":
            return {"n_genes": G, "hidden_size": D}
        if name == "latent":
            return {"n_genes": G, "hidden_size": D, "latent_dim": min(latent_dim, G, len(x_sample) - 1),
                    "token_dim": token_dim}
        if isinstance(modules, str):
            if modules not in adata.var.columns:
                raise ValueError(f"modules={modules!r} is not a column of adata.var")
            labels = adata.var.loc[self.genes, modules].astype(str).to_numpy()
            groups = modules_from_labels(labels, max_size=64)
        elif isinstance(modules, Mapping):
            groups = modules_from_gene_sets(self.genes, modules, max_size=64)
        else:
            groups = modules_from_correlation(x_sample, n_modules or math.ceil(G / 16), max_size=64, seed=seed)
        return {"n_genes": G, "hidden_size": D, "modules": [list(map(int, m)) for m in groups]}

    def _build_network(self, tok_kwargs: dict, prior: pd.DataFrame | None) -> CellFlowNet:
        s = self.settings
        tokenizer = TOKENIZERS[s["tokenizer"]](**tok_kwargs)
        feats, has = align_features(prior, self.vocab.perturbations)
        encoder = PerturbationEncoder(
            self.vocab.size, s["hidden_size"], torch.from_numpy(self.vocab.seen_mask),
            torch.from_numpy(feats) if feats.shape[1] else None, torch.from_numpy(has),
            [len(v) for v in self.vocab.covariates.values()], cfg_dropout=s["cfg_dropout"],
            prior_only_prob=0.3 if has.any() else 0.0)  # covariates are hidden per block by PairedBatches
        s["tokenizer_kwargs"] = tok_kwargs
        s["prior_dim"] = int(feats.shape[1])
        return CellFlowNet(tokenizer, encoder, s["hidden_size"], s["depth"], s["num_heads"], s["mlp_ratio"],
                           identity_control=s["source"] == "control")

    def _bank_from(self, expr, ctrl_rows, cov_frame, names, rng) -> None:
        """Keep up to BANK_PER_GROUP control cells per covariate group (sources for generate())."""
        groups = cov_frame.iloc[ctrl_rows]
        keep = []
        for _, idx in groups.groupby(list(groups.columns), observed=True).indices.items() if groups.shape[1] else [(0, np.arange(len(ctrl_rows)))]:
            keep.extend(rng.permutation(ctrl_rows[idx])[:BANK_PER_GROUP])
        keep = np.sort(np.asarray(keep, dtype=np.int64))
        self.bank_x = torch.from_numpy(expr.all_rows(keep))
        self.bank_obs = cov_frame.iloc[keep].reset_index(drop=True)
        self.bank_obs.index = np.asarray(names)[keep].astype(str)

    # ------------------------------------------------------------------ training
    def fit(self, max_steps: int = 1500, batch_size: int = 256, block_size: int = 64, lr: float = 3e-4,
            weight_decay: float = 0.0, warmup_steps: int = 100, ema_decay: float | None = 0.999,
            accelerator: str = "auto", devices: int | str = 1, precision: str | None = None,
            progress_bar: bool = True, checkpoint_dir: str | None = None, seed: int | None = None) -> "CellDiT":
        """Train the flow.

        Parameters
        ----------
        max_steps
            Optimizer steps.
        batch_size, block_size
            Cells per batch, and per single-condition block (the unit of OT pairing).
        lr, weight_decay, warmup_steps, ema_decay
            AdamW with linear warmup then cosine decay, and an EMA of the weights used to sample.
        accelerator, devices, precision, progress_bar, checkpoint_dir
            Lightning settings (see :class:`~celldit.train.trainer.TrainerSettings`).
        seed
            Seed of batch draws and training noise (default: the model's seed).
        """
        seed = self.settings["seed"] if seed is None else seed
        data = self._batches(max_steps, batch_size, block_size, seed)
        self.network.train()
        self.plan = CellTrainingPlan(self.network, source=self.settings["source"], flow=RectifiedFlow(), lr=lr,
                                     weight_decay=weight_decay, warmup_steps=warmup_steps, lr_schedule="cosine",
                                     ema_decay=ema_decay)
        settings = TrainerSettings(max_steps=max_steps, accelerator=accelerator, devices=devices, precision=precision,
                                   progress_bar=progress_bar, checkpoint_dir=checkpoint_dir, seed=seed,
                                   log_every_n_steps=max(1, min(50, max_steps)))
        from .train.callbacks import LossHistory

        history = LossHistory()
        fit_plan(self.plan, CellDataModule(data), settings, callbacks=[history])
        self.network = self.plan.sampling_network(use_ema=True).to("cpu").eval()
        self.history = {"steps": max_steps, "final_loss": history.smoothed(50), "losses": history.losses}
        self.is_trained = True
        return self

    def _batches(self, steps: int, batch_size: int, block_size: int, seed: int) -> PairedBatches:
        """The training pairs (see :class:`~celldit.data.anndata.PairedBatches`)."""
        d, s = self._train, self.settings
        keys = self.conditions.keys
        return PairedBatches(
            d["expr"], d["cond_id"], d["pair_group"], np.arange(d["expr"].n_obs), 0,
            *self.vocab.encode_conditions([k[0] for k in keys], [k[1] for k in keys]), d["cov_idx"],
            anchors=self.conditions.anchors if s["anchor"] else None, include_control=s["source"] == "noise",
            batch_size=batch_size, block_size=block_size, ot=s["ot"], steps=steps, seed=seed, ot_basis=d["ot_basis"],
            covariate_dropout=s["covariate_dropout"], cov_group=d["cov_group"],
            unknown_cov=np.array([len(v) for v in self.vocab.covariates.values()], dtype=np.int64),
            held_out_anchor=self.conditions.held_out_anchor)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Export to a folder: ``model.safetensors`` (network, anchors, control bank),
        ``config.json`` (registration and settings), ``genes.json``, ``vocab.json``,
        ``conditions.json``, ``bank.json``. Atomic; never overwrites unless asked."""
        state = {f"network.{k}": v for k, v in self.network.state_dict().items()}
        state["anchors"] = torch.from_numpy(self.conditions.anchors)
        state.update({f"groups.{k}": torch.from_numpy(v) for k, v in self.conditions.group_tensors().items()})
        state["bank_x"] = self.bank_x
        state["reference"] = self.reference
        config = {"format_version": FORMAT_VERSION, "kind": "CellDiT", "spec": self.spec.to_dict(),
                  "space": self.space, "settings": self.settings, "is_trained": self.is_trained,
                  "history": {k: v for k, v in self.history.items() if k != "losses"}}
        bank = {"names": list(self.bank_obs.index), "obs": self.bank_obs.to_dict(orient="list")}
        return save_model_folder(path, state, config, extra_json={
            "genes": self.genes, "vocab": self.vocab.to_dict(), "conditions": self.conditions.to_dict(),
            "trained_groups": self.trained_groups,
            "bank": bank}, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "CellDiT":
        """Rebuild a model saved with :meth:`save` (no unpickling: safetensors and JSON only)."""
        state, config = load_model_folder(path)
        if config.get("kind") != "CellDiT":
            raise ValueError(f"{path} holds a {config.get('kind', 'different')!r} model, not a CellDiT")
        self = cls.__new__(cls)
        self.spec = PerturbationSpec.from_dict(config["spec"])
        self.space, self.settings = config["space"], config["settings"]
        self.is_trained, self.history = config["is_trained"], config.get("history", {})
        self.genes = read_extra_json(path, "genes")
        self.vocab = PerturbationVocab.from_dict(read_extra_json(path, "vocab"))
        groups = {k[len("groups."):]: v.numpy() for k, v in state.items() if k.startswith("groups.")}
        self.conditions = ConditionTable.from_dict(read_extra_json(path, "conditions"), state["anchors"].numpy(), groups)
        prior_dim = self.settings["prior_dim"]
        fake_prior = pd.DataFrame(np.zeros((0, prior_dim), np.float32)) if prior_dim else None
        self.network = self._build_network(self.settings["tokenizer_kwargs"], fake_prior)
        net_state = {k[len("network."):]: v for k, v in state.items() if k.startswith("network.")}
        self.network.load_state_dict(net_state, strict=True)
        self.network.eval()
        bank = read_extra_json(path, "bank")
        self.trained_groups = read_extra_json(path, "trained_groups")
        self.bank_x, self.reference = state["bank_x"], state["reference"]
        self.bank_obs = pd.DataFrame(bank["obs"], index=bank["names"], columns=list(self.spec.covariate_keys))
        self.plan, self._train = None, None
        return self
