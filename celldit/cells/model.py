"""CellDiT: the user-facing single-cell model (register, fit, counterfactual, generate, save, load).

The split follows scvi-tools. Where each step lives:

======================  =====================================================================
step                    module
======================  =====================================================================
settings                :mod:`celldit.cells.config` (``CellDiTConfig``, ``CellFitConfig``)
registration            :mod:`celldit.cells.registration` (genes, rows, conditions, vocabulary)
anchors                 :mod:`celldit.cells.anchors` (mean-shift estimates the flow starts from)
shrinkage               :mod:`celldit.cells.shrinkage` (weak shifts pulled toward no change)
network                 :mod:`celldit.cells.module` (``CellFlowNet``, ``PerturbationEncoder``)
training batches        :mod:`celldit.cells.dataset` (``PairedBatches``, ``CellDataModule``)
training plan           :mod:`celldit.cells.plan` (``CellTrainingPlan``) and :mod:`celldit.train`
sampling                :mod:`celldit.cells.sampler` (``CellSampler``)
saving                  :mod:`celldit.cells.checkpoint` (model folders, format versions)
======================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..options import field_docs, from_mapping
from ..tokenizers import TOKENIZERS
from .anchors import ConditionTable
from .checkpoint import read_model_folder, write_model_folder
from .config import CellDiTConfig, CellFitConfig
from .dataset import CellDataModule, PairedBatches
from .effects import condition_effects
from .module import CellFlowNet, PerturbationEncoder
from .plan import CellTrainingPlan
from .priors import align_features
from .registration import Registration, register
from .sampler import CellSampler
from .vocab import PerturbationVocab

__all__ = ["CellDiT"]


def _settings(cls: type, config: Any, settings: Mapping[str, Any], what: str) -> Any:
    """``config`` (an instance, a mapping or None) with ``settings`` applied, checked."""
    base = from_mapping(cls, config, what)
    if not settings:
        return base
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"{what}: unexpected setting(s) {unknown}; see help({cls.__name__}) for the known ones")
    merged = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    merged.update(settings)
    return from_mapping(cls, merged, what)


class CellDiT:
    """A perturbation-conditioned generator of cells: a DiT trained with rectified flow.

    Parameters
    ----------
    adata
        Training cells (counts in ``X`` or ``layers['counts']``, or log-normalised ``X``),
        in memory or backed. Hold out test cells before passing it.
    config
        A :class:`~celldit.cells.config.CellDiTConfig` (or a mapping of its fields).
    **settings
        Any field of :class:`~celldit.cells.config.CellDiTConfig`, overriding ``config``
        (listed below).

    Examples
    --------
    >>> model = CellDiT(train, perturbation_key="perturbation", control="control",
    ...                 pair_keys=["bio_rep"]).fit(max_steps=1500)       # doctest: +SKIP
    >>> cf = model.counterfactual(rep3_controls, ["STAT1", "IRF1"])      # doctest: +SKIP
    """

    def __init__(self, adata: AnnData, config: CellDiTConfig | Mapping[str, Any] | None = None, **settings: Any):
        self.config: CellDiTConfig = _settings(CellDiTConfig, config, settings, "CellDiT")
        data = register(adata, self.config)  # genes, rows, anchors, vocabulary, priors, bank
        self._set_registration(data)
        torch.manual_seed(self.config.seed)
        self.network = self._build_network(data.prior)
        if self.config.tokenizer == "latent":
            self.network.tokenizer.fit(data.x_sample, seed=self.config.seed)
        if data.noise_prior is not None:
            self.network.set_noise_prior(*(torch.from_numpy(v) for v in data.noise_prior))
        self._train: Registration | None = data
        self.plan: CellTrainingPlan | None = None
        self.history: dict[str, Any] = {}
        self.is_trained = False

    # ------------------------------------------------------------------ building
    def _set_registration(self, data: Registration) -> None:
        self.spec, self.genes, self.space, self.normalisation = data.spec, data.genes, data.space, data.normalisation
        self.var, self.pca, self.bank_library = data.var, data.pca, data.bank_library
        self.covariate_groups = data.covariate_groups
        self.noise_rank = 0 if data.noise_prior is None else int(data.noise_prior[0].shape[1])
        self.reference, self.conditions, self.trained_groups = data.reference, data.conditions, data.trained_groups
        self.vocab, self.tokenizer_kwargs = data.vocab, data.tokenizer_kwargs
        self.bank_x, self.bank_obs, self.bank_batch = data.bank_x, data.bank_obs, data.bank_batch
        self.control_batches = data.control_batches
        self.prior_dim = 0 if data.prior is None else int(data.prior.shape[1])

    def _build_network(self, prior: pd.DataFrame | None) -> CellFlowNet:
        c = self.config
        tokenizer = TOKENIZERS[c.tokenizer](**self.tokenizer_kwargs)  # first: the order of random draws is part of a seed
        feats, has = align_features(prior, self.vocab.perturbations)
        encoder = PerturbationEncoder(
            self.vocab.size, c.hidden_size, torch.from_numpy(self.vocab.seen_mask),
            torch.from_numpy(feats) if feats.shape[1] else None, torch.from_numpy(has),
            [len(v) for v in self.vocab.covariates.values()], cfg_dropout=c.cfg_dropout,
            prior_only_prob=0.3 if has.any() else 0.0)  # covariates are hidden per block by PairedBatches
        return CellFlowNet(tokenizer, encoder, c.hidden_size, c.depth, c.num_heads, c.mlp_ratio,
                           identity_control=c.source == "control", noise_rank=self.noise_rank)

    def prior_means(self) -> np.ndarray:
        """(n_covariate_groups, G) mean control cell of each covariate group (the noise source's
        prior mean before the anchor; zeros for a group without controls)."""
        means = np.zeros((max(1, len(self.covariate_groups)), len(self.genes)), np.float32)
        for code, mean in self.conditions.group_controls.items():
            means[code] = mean
        return means

    def noise_prior_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(factor (G, k), sd (G,))`` of the noise source's covariance (the control cells')."""
        return (self.network.prior_factor.cpu().numpy().copy(), self.network.prior_sd.cpu().numpy().copy())

    def to(self, device: str | torch.device) -> CellDiT:
        """Move the network (sampling runs where it is; e.g. ``model.to("cuda")``)."""
        self.network.to(device)
        return self

    @property
    def sampler(self) -> CellSampler:
        """Sampling of counterfactual and generated cells (see :class:`~celldit.cells.sampler.CellSampler`)."""
        return CellSampler(self)

    # ------------------------------------------------------------------ training
    def fit(self, config: CellFitConfig | Mapping[str, Any] | None = None, *, run_dir: str | Path | None = None,
            resume: str | Path | None = None, **settings: Any) -> CellDiT:
        """Train the flow.

        Parameters
        ----------
        config
            A :class:`~celldit.cells.config.CellFitConfig` (or a mapping of its fields).
        run_dir
            Folder for Lightning's logs (``run_dir/logs``) and resumable checkpoints
            (``run_dir/checkpoints/last.ckpt``); None keeps neither (the loss curve is kept
            in :attr:`history` and saved with the model).
        resume
            A ``.ckpt`` written by an interrupted fit of this model with the same settings:
            training continues at its step, with the same data stream and training noise.
        **settings
            Any field of :class:`~celldit.cells.config.CellFitConfig` (``max_steps``,
            ``batch_size``, ``lr``, ``trainer={"accelerator": "cpu"}`` ...).
        """
        from ..train.callbacks import LossHistory
        from ..train.trainer import fit as fit_plan
        from ..train.trainer import show_progress_bar
        from .validation import validation_callbacks

        if self._train is None:
            raise RuntimeError("this model was loaded from a folder: it has no training data to fit on; "
                               "build a new CellDiT from an AnnData to train")
        fit_config: CellFitConfig = _settings(CellFitConfig, config, settings, "fit")
        seed = self.config.seed if fit_config.seed is None else fit_config.seed
        train, validation = self._batches(fit_config, seed)
        self.network.train()
        self.plan = CellTrainingPlan(
            self.network, source=self.config.source, flow=self.config.flow, lr=fit_config.lr,
            weight_decay=fit_config.weight_decay, betas=fit_config.betas, warmup_steps=fit_config.warmup_steps,
            lr_schedule=fit_config.lr_schedule, min_lr_ratio=fit_config.min_lr_ratio, ema_decay=fit_config.ema_decay)
        trainer_config = fit_config.trainer
        with tempfile.TemporaryDirectory() as tmp:
            # under a spawning strategy the callbacks run in other processes: rank 0 writes the curve to a file
            spawned = "spawn" in str(trainer_config.strategy)
            losses = LossHistory(path=Path(tmp) / "losses.json" if spawned else None,
                                 print_every=None if show_progress_bar(trainer_config) else trainer_config.log_every_n_steps)
            fit_plan(self.plan, CellDataModule(train, validation, fit_config.num_workers), trainer_config,
                     max_steps=fit_config.max_steps, run_dir=run_dir, seed=seed, ckpt_path=resume,
                     callbacks=[losses, *validation_callbacks(fit_config)],
                     val_check_interval=fit_config.validation_every_n_steps if validation is not None else None)
            if spawned and losses.path.is_file():
                curve = json.loads(losses.path.read_text())
                losses.losses, losses.steps, losses.wall_s = curve["losses"], curve["steps"], curve["wall_s"]
        ema = self.plan.sampling_network(use_ema=True)
        if ema is not self.plan.network:  # keep the network module (its frozen parts stay frozen), EMA weights
            self.plan.network.load_state_dict(ema.state_dict())
        self.network = self.plan.network.to("cpu").eval()
        self.history = {"steps": len(losses.losses), "final_loss": losses.smoothed(50), "losses": losses.losses,
                        "loss_steps": losses.steps, "train_s": round(losses.wall_s, 2)}
        if losses.val_losses:
            self.history["val_losses"] = [list(v) for v in losses.val_losses]
        self.is_trained = True
        return self

    def _batches(self, fit_config: CellFitConfig, seed: int) -> tuple[PairedBatches, PairedBatches | None]:
        """Training (and validation) batches (see :class:`~celldit.cells.dataset.PairedBatches`)."""
        from .validation import split_validation

        d, c = self._train, self.config
        keys = self.conditions.keys
        pert_idx, pert_scale = self.vocab.encode_conditions([k[0] for k in keys], [k[1] for k in keys])
        train_cells, val_cells = split_validation(d, fit_config.validation_fraction, seed)

        def batches(cells: np.ndarray, steps: int, stream_seed: int, fixed: bool = False) -> PairedBatches:
            return PairedBatches(
                d.rows, d.cond_id, d.pair_group, cells, 0, pert_idx, pert_scale, d.cov_idx,
                anchors=self.conditions.anchors if c.anchor else None,
                include_control=c.source == "noise", batch_size=fit_config.batch_size,
                block_size=fit_config.block_size, ot=c.ot, steps=steps, seed=stream_seed, ot_basis=d.ot_basis,
                covariate_dropout=c.covariate_dropout, cov_group=d.cov_group,
                unknown_cov=np.array([len(v) for v in self.vocab.covariates.values()], dtype=np.int64),
                held_out_anchor=None if c.batch_anchored else self.conditions.held_out_anchor, fixed=fixed,
                group_anchors=self.conditions.group_shifts if c.batch_anchored else None,
                buffer_cells=None if fixed else fit_config.buffer_cells,
                prior_means=self.prior_means() if c.source == "noise" else None,
                noise_prior=self.noise_prior_arrays() if c.source == "noise" else None,
                escapers=self.conditions.escapers if c.anchor and c.escapers else None)

        validation = None if val_cells is None else batches(val_cells, 4, seed + 1, fixed=True)
        return batches(train_cells, fit_config.max_steps, seed), validation

    # ------------------------------------------------------------------ sampling
    def counterfactual(self, adata_control: AnnData, perturbation: str | Sequence[str], **kwargs: Any) -> AnnData:
        """What the control cells of ``adata_control`` would look like under each perturbation
        (see :meth:`CellSampler.counterfactual <celldit.cells.sampler.CellSampler.counterfactual>`)."""
        return self.sampler.counterfactual(adata_control, perturbation, **kwargs)

    def generate(self, condition: str | Mapping[str, Any], n: int = 100, **kwargs: Any) -> AnnData:
        """``n`` new cells under ``condition`` (see
        :meth:`CellSampler.generate <celldit.cells.sampler.CellSampler.generate>`)."""
        return self.sampler.generate(condition, n, **kwargs)

    def effects(self, top: int = 3) -> pd.DataFrame:
        """Each trained condition's evidence of an effect and the anchor its predictions start
        from: which perturbations the model treats as having no detectable effect (see
        :func:`~celldit.cells.effects.condition_effects`).

        >>> model.effects().head()                                     # doctest: +SKIP
                  gate       evidence  anchor_norm  largest  largest_change           up            down
        STAT1      1.0          clear        3.912     IRF1          -1.981          ...  IRF1, STAT1, ...
        """
        return condition_effects(self, top)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path, overwrite: bool = False, extra_files: Mapping[str, Any] | None = None,
             extra_text: Mapping[str, str] | None = None) -> Path:
        """Export to a folder (atomic; never overwrites unless asked): ``model.safetensors``
        (network, anchors, control bank), ``config.json``, JSON tables and the loss curve
        (see :mod:`celldit.cells.checkpoint`), and ``effects.csv`` (:meth:`effects`, for
        reading). ``extra_files`` (``{name: JSON value}`` -> ``name.json``) and ``extra_text``
        (``{file name: text}``) join the same atomic write."""
        text = {"effects.csv": self.effects().to_csv(), **(extra_text or {})}
        return write_model_folder(self, path, overwrite=overwrite, extra_files=extra_files, extra_text=text)

    @classmethod
    def load(cls, path: str | Path) -> CellDiT:
        """Rebuild a model saved with :meth:`save` (no unpickling: safetensors and JSON only)."""
        return cls.from_config(*read_model_folder(path))

    @classmethod
    def from_config(cls, config: CellDiTConfig, state: dict[str, Any]) -> CellDiT:
        """A trained model from its settings and saved state (what :meth:`load` reads)."""
        self = cls.__new__(cls)
        self.config = config
        self.spec, self.genes, self.space = state["spec"], state["genes"], state["space"]
        self.normalisation, self.var, self.pca = state["normalisation"], state["var"], state["pca"]
        self.bank_library = state["bank_library"]
        self.covariate_groups, self.noise_rank = state["covariate_groups"], state["noise_rank"]
        self.reference, self.trained_groups = state["reference"], state["trained_groups"]
        self.vocab = PerturbationVocab.from_dict(state["vocab"])
        self.conditions = ConditionTable.from_dict(state["conditions"], state["anchors"], state["groups"],
                                                   config.group_bandwidth)
        self.tokenizer_kwargs, self.prior_dim = state["tokenizer_kwargs"], state["prior_dim"]
        self.bank_x, self.bank_obs, self.bank_batch = state["bank_x"], state["bank_obs"], state.get("bank_batch")
        self.control_batches = state.get("control_batches")
        prior = pd.DataFrame(np.zeros((0, self.prior_dim), np.float32)) if self.prior_dim else None
        self.network = self._build_network(prior)  # the prior table itself is in the weights
        self.network.load_state_dict(state["network"], strict=True)
        self.network.eval()
        self.is_trained, self.history = state["is_trained"], state["history"]
        self.plan, self._train = None, None
        return self


def _document_settings() -> None:
    """Append the settings of CellDiTConfig to the class docstring (one source of truth)."""
    docs = field_docs(CellDiTConfig)
    lines = ["", "    Settings (``**settings``, the fields of :class:`~celldit.cells.config.CellDiTConfig`)",
             "    " + "-" * 78]
    for f in dataclasses.fields(CellDiTConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"    {f.name} = {default!r}")
        lines.append(f"        {docs.get(f.name, '')}")
    CellDiT.__doc__ = (CellDiT.__doc__ or "") + "\n".join(lines) + "\n"


_document_settings()
