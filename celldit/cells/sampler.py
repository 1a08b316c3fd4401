"""Sampling of a :class:`~celldit.cells.model.CellDiT`: counterfactual and generated cells as AnnData.

Time runs from t = 0 (the source: a control cell, or noise) to t = 1 (a cell under the
asked condition).

* Control source: ``x(0) = control cell + anchor(P)``, integrated to t = 1 under P.
* Noise source: the control cell is first inverted to noise under the control condition
  (t = 1 -> 0), then integrated forward under P; ``generate`` starts from fresh noise.

Input cells are brought to the model's space on the model's normalisation basis (see
:class:`~celldit.data.rows.ExpressionRows`); results are built by
:class:`~celldit.cells.outputs.OutputWriter`, in memory or streamed to an ``.h5ad`` file.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data.rows import ExpressionRows
from ..flow import anchored_source, integrate, velocity_fn
from .conditioning import ConditionRules
from .config import SamplerConfig
from .control_mean import DEFAULT_POOLING, batch_labels, check_control_mean, pooled_shift
from .on_target import OnTargetRule
from .outputs import OutputWriter, check_output_size, first_count_level
from .start_cells import StartCells

__all__ = ["CellSampler"]


class CellSampler:
    """Counterfactual and generated cells of a trained model (composition: it reads the
    model's network, settings, vocabulary and anchors, and changes none of them).

    Parameters
    ----------
    model
        A :class:`~celldit.cells.model.CellDiT`.
    """

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config
        self.network, self.spec, self.vocab = model.network, model.spec, model.vocab
        self.conditions, self.genes = model.conditions, model.genes
        self.rules = ConditionRules(model)

    @property
    def on_target_rule(self) -> OnTargetRule | None:
        """The on-target rule of untrained perturbations (see :class:`ConditionRules`)."""
        return self.rules.on_target_rule

    def _solver(self, steps: int | None, method: str | None) -> tuple[str, int]:
        m, s = self.config.sampler.solver(self.config.source)
        return method or m, steps or s

    def _transport(self, x: torch.Tensor, pert: tuple[np.ndarray, np.ndarray, np.ndarray], cov_idx: np.ndarray,
                   steps: int | None, method: str | None, cfg_scale: float, batch_size: int,
                   reverse: bool = False, gate: float = 1.0) -> torch.Tensor:
        """Integrate sources ``x`` (control cells for a control source, else noise) from
        t = 0 to 1 under condition ``pert``; ``reverse``: from t = 1 back to 0 (inversion);
        ``gate`` scales the velocity (see ``gate_velocity``)."""
        method, steps = self._solver(steps, method)
        net, flow = self.network.eval(), self.config.flow
        device = next(net.parameters()).device  # the network's device (CellDiT.to); results come back on the CPU
        n = x.shape[0]
        out = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                sl = slice(start, min(n, start + batch_size))
                cov = torch.from_numpy(cov_idx[sl]).to(device)
                v = velocity_fn(net, flow, _conditioning(pert, cov), _conditioning(pert, cov, drop=True),
                                cfg_scale=cfg_scale)
                if gate != 1.0:
                    v = _scaled(v, gate)
                # the source moved by the condition's anchor (control cells, or the noise prior's mean)
                x0 = anchored_source(x[sl].to(device), torch.from_numpy(pert[2][sl]).to(device))
                y = (integrate(v, x0, 1.0, 0.0, steps=steps, method=method) if reverse
                     else integrate(v, x0, 0.0, 1.0, steps=steps, method=method))
                out.append(y.float().cpu())
        return torch.cat(out) if out else x.new_zeros((0, x.shape[1]))

    def _invert(self, x: torch.Tensor, cov_idx: np.ndarray, steps: int | None, method: str | None,
                batch_size: int) -> torch.Tensor:
        """Noise source: carry cells back to their noise under the control condition."""
        ctrl = self.vocab.encode_conditions([frozenset()])
        zero = np.zeros((x.shape[0], x.shape[1]), np.float32)
        return self._transport(x, (*ctrl, zero), cov_idx, steps, method, 1.0, batch_size, reverse=True)

    # ------------------------------------------------------------------ inputs and results
    def input_rows(self, adata: AnnData, layer: str | None = None, size_factor_key: str | None = None,
                   input_space: str = "auto") -> ExpressionRows:
        """Rows of ``adata`` in the model's space, on the model's normalisation basis (the
        library sizes of training: totals over the same genes, or the same size-factor column)."""
        norm = self.model.normalisation
        basis = norm.get("basis", {})
        key = size_factor_key or (basis.get("key") if basis.get("kind") == "size_factor_key" else None)
        basis_genes = norm.get("basis_genes") if key is None else None
        try:
            return ExpressionRows(adata, self.genes, layer=layer, input_space=input_space, size_factor_key=key,
                                  basis_genes=basis_genes, warn_log1p=False)
        except ValueError as err:
            if "are not in adata.var_names" in str(err):
                raise ValueError(f"the input's genes do not match the model's ({len(self.genes)} genes): {err}") from None
            raise

    def _writer(self, var: pd.DataFrame, counts: bool, raw_layer: bool, out: Any, overwrite: bool,
                seed: int, support: str, control_mean: str, pooling: float) -> OutputWriter:
        space = self.model.space
        uns = {"space": space, "target_sum": 1e4 if space == "log1p_normalized" else None,
               "source": self.config.source, "tokenizer": self.config.tokenizer,
               "perturbation_key": self.spec.perturbation_key, "support": support, "control_mean": control_mean,
               "pooling": float(pooling) if control_mean == "pooled" else None}
        categorical = [self.spec.perturbation_key, *self.spec.covariate_keys, "celldit_source"]
        return OutputWriter(var, uns, categorical, pca=self.model.pca, counts=counts, raw_layer=raw_layer, path=out,
                            overwrite=overwrite, seed=seed, support=support)

    def _labels_obs(self, label: str, dose: Any, cov: pd.DataFrame, index: Sequence[str]) -> pd.DataFrame:
        obs = pd.DataFrame(index=pd.Index([str(i) for i in index]))
        obs[self.spec.perturbation_key] = str(label)
        for key in self.spec.covariate_keys:
            obs[key] = cov[key].astype(str).to_numpy()
        if self.spec.dose_key is not None:
            obs[self.spec.dose_key] = "" if dose is None else str(dose)
        return obs

    def _check_dose(self, dose: Any) -> None:
        if dose is not None and self.spec.dose_key is None:
            raise ValueError(f"dose={dose!r}: this model was fitted without a dose key (dose_key), so it cannot "
                             "condition on a dose; leave the dose out")

    # ------------------------------------------------------------------ public
    def counterfactual(self, adata_control: AnnData, perturbation: str | Sequence[str], *, dose: Any = None,
                       steps: int | None = None, method: str | None = None, cfg_scale: float | None = None,
                       seed: int = 0, batch_size: int | None = None, layer: str | None = None,
                       size_factor_key: str | None = None, input_space: str = "auto", counts: bool = False,
                       raw_layer: bool = False, out: str | None = None, overwrite: bool = False,
                       support: str = "discrete", control_mean: str = "observed", pooling: float = DEFAULT_POOLING
                       ) -> AnnData:
        """What the control cells of ``adata_control`` would look like under each perturbation.

        Parameters
        ----------
        adata_control
            Cells with (at least) the model's genes, as counts or log-normalised. When it
            has the perturbation key, only its control cells are used. Needs the
            registered covariate columns.
        perturbation
            A label (``"STAT1"``, ``"A+B"``, a control label) or a list of labels.
        dose
            Dose for every perturbation of the label (or ``"d1+d2"``), when a dose key is registered.
        steps, method
            ODE solver (default: the model's ``sampler`` settings; Euler, 10 steps for the
            control source and Heun, 20 for noise unless set).
        cfg_scale
            Classifier-free guidance scale (default: the model's ``sampler.cfg_scale``).
        seed
            Seed (of models that draw noise, and of the counts layer).
        batch_size
            Cells integrated (and written) at once (default: the model's ``sampler.batch_size``).
        layer, size_factor_key, input_space
            Where the input's values are, an obs column of library sizes, and what the values
            are (see :class:`~celldit.cells.config.CellDiTConfig`); by default the model's
            normalisation basis applies.
        counts
            Add ``layers['counts']``: counts sampled from the prediction with each source
            cell's library size.
        raw_layer
            Keep the flow output in ``layers['flow']`` (X is on log1p's support, see ``support``).
        support
            How ``X`` is brought to the support of log1p expression: ``"discrete"`` (default:
            ``"balance"``, then each value between 0 and the source cell's first count level,
            ``log1p(1e4 / library size)``, to 0 or to that level at random, the gene's mean kept
            in expectation: a gene is detected in as many cells as the shift implies),
            ``"balance"`` (a gene's negative values and as many of its smallest positive values
            as balance them go to 0, so that its mean over the cells of a condition is kept and
            larger values stay as they are), ``"rescale"`` (negative values to 0, the gene's
            positive values scaled to keep its mean), ``"clip"`` or ``"none"`` (see
            :mod:`celldit.cells.outputs`).
        control_mean
            The mean control cell each batch's cells are moved with: ``"observed"`` (the
            mean of its control cells: every cell keeps its own counterfactual) or
            ``"pooled"`` (that mean pooled with the training batches' by their precision,
            see :mod:`celldit.cells.control_mean`: every cell of a batch moves by one more
            vector, and the cells become the expected *measured* population under P, the
            one a real sample would show against these same controls). A batch is a
            value of the registered covariates and pair keys the input has.
        pooling
            With ``control_mean="pooled"``: the fraction of the way from each batch's own
            mean to the pooled one that its cells move (1: the whole estimate; smaller stays
            nearer the batch's own controls and takes less of the correction). Default 0.5:
            chosen on a validation replicate, see :data:`~celldit.cells.control_mean.DEFAULT_POOLING`.
        out
            Write the cells to this ``.h5ad`` block by block (bounded memory) and return it
            opened backed; None returns an in-memory AnnData.
        overwrite
            Replace an existing ``out``.

        Returns
        -------
        AnnData, one cell per (control cell, perturbation), label by label: ``X`` in the
        model's expression space over its genes, on log1p's support; ``var`` the input's
        annotations of those genes; ``obs`` with the registered keys (categorical) and
        ``celldit_source`` (the control cell's name); ``obsm['X_pca']`` (the model's PCA).
        """
        self._check_dose(dose)
        check_control_mean(control_mean, pooling)
        settings = self._settings(steps=steps, method=method, cfg_scale=cfg_scale, batch_size=batch_size)
        cfg_scale, batch_size = settings.cfg_scale, settings.batch_size
        labels = [perturbation] if isinstance(perturbation, str) else list(perturbation)
        if not labels:
            raise ValueError("perturbation: give at least one label")
        controls = self._controls_of(adata_control)
        if controls.n_obs == 0:
            raise ValueError("adata_control has 0 cells: give at least one control cell to start from")
        check_output_size(controls.n_obs * len(labels), len(self.genes), out)
        rows = self.input_rows(controls, layer, size_factor_key, input_space)
        x = torch.from_numpy(rows.all_rows())
        library = rows.library_sizes(np.arange(controls.n_obs))
        # where a detected gene starts, per source cell: one count at its library size, or for
        # log1p input its smallest positive value over all the input's genes
        levels = first_count_level(None, library) if library is not None else rows.smallest_positive()
        batch = batch_labels(controls.obs, self.config.pair_keys)
        offset = self._input_centers(batch, x)
        batches = (batch, {b: offset[np.flatnonzero(batch == b)[0]].numpy() for b in np.unique(batch)})
        # pooled: a batch is a value of the covariates and pair keys the input has
        pooled = self._pooled_shift(x, batch_labels(controls.obs, (*self.spec.covariate_keys, *self.config.pair_keys)),
                                    pooling) if control_mean == "pooled" else torch.zeros_like(x)
        x = x - offset
        cov = self.spec.covariates(controls) if self.spec.covariate_keys else pd.DataFrame(index=controls.obs_names)
        cov_idx = self.vocab.encode_covariates(cov, n=controls.n_obs)
        for key in self.spec.covariate_keys:
            new = sorted(set(cov[key].astype(str)) - set(self.vocab.covariates.get(key, [])))
            if new:
                warnings.warn(f"obs[{key!r}] value(s) {new[:5]} were not seen in training: those cells get the "
                              "unknown covariate token and anchors from their own controls (a held-out group)",
                              stacklevel=3)
        source_var = controls.raw.var if layer == "raw" else controls.var
        writer = self._writer(source_var.loc[self.genes].copy(), counts, raw_layer, out, overwrite, seed, support,
                              control_mean, pooling)
        torch.manual_seed(seed)
        try:
            # noise source: invert once under the control condition, then generate under each label
            source = x if self.config.source == "control" else self._invert(x, cov_idx, steps, method, batch_size)
            names = controls.obs_names.astype(str).to_numpy()
            for label in labels:
                pert = self.rules.condition(label, dose, x, cov, batches, rng=_escaper_rng(seed, label))
                codes = self.rules.covariate_codes(label, dose, cov, cov_idx)
                for start in range(0, len(names), batch_size):
                    sl = slice(start, start + batch_size)
                    part = (pert[0], pert[1], pert[2][sl])
                    y = self._transport(source[sl], part, codes[sl], steps, method, cfg_scale, batch_size,
                                        gate=self.rules.velocity_gate(label, dose)) + offset[sl] + pooled[sl]
                    obs = self._labels_obs(label, dose, cov.iloc[sl], [f"{c}-{label}" for c in names[sl]])
                    obs["celldit_source"] = names[sl]
                    writer.add(y.numpy(), obs, None if library is None else library[sl], levels[sl])
        except BaseException:
            writer.abort()
            raise
        return writer.finish()

    def _pooled_shift(self, x: torch.Tensor, batch: np.ndarray, pooling: float) -> torch.Tensor:
        """(n, G) ``pooling`` times the pooled minus observed mean control cell of each input
        cell's ``batch``."""
        if self.model.control_batches is None:
            raise ValueError("control_mean='pooled' needs the training batches' mean control cells, which this "
                             "model was saved without (before celldit added them): refit it, or use "
                             "control_mean='observed'")
        return torch.from_numpy(pooled_shift(x.numpy(), batch, *self.model.control_batches, pooling))

    def _input_centers(self, batch: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        """(n, G) offset of each input cell: the mean of the input's control cells of its
        ``batch`` for a centred model, else 0."""
        if not self.config.centred:
            return torch.zeros_like(x)
        offset = torch.empty_like(x)
        for b in np.unique(batch):
            m = torch.from_numpy(batch == b)
            offset[m] = x[m].mean(0)
        return offset

    def _settings(self, **given: Any) -> SamplerConfig:
        """The model's sampler settings with a call's values (checked like the config's)."""
        return replace(self.config.sampler, **{k: v for k, v in given.items() if v is not None})

    def _controls_of(self, adata: AnnData) -> AnnData:
        key = self.spec.perturbation_key
        if key not in adata.obs.columns:
            return adata
        mask = self.spec.control_mask(adata)
        if not mask.any():
            raise ValueError(f"no control cells in the input: none has obs[{key!r}] in {list(self.spec.control_labels)}")
        return adata[mask]

    def generate(self, condition: str | Mapping[str, Any], n: int = 100, *, steps: int | None = None,
                 method: str | None = None, cfg_scale: float | None = None, seed: int = 0, counts: bool = False,
                 raw_layer: bool = False, out: str | None = None, overwrite: bool = False,
                 controls: AnnData | None = None, support: str = "balance", control_mean: str = "observed",
                 pooling: float = DEFAULT_POOLING) -> AnnData:
        """``n`` new cells under ``condition``.

        Parameters
        ----------
        condition
            A perturbation label, or a mapping with the perturbation key (and the covariate
            keys, and the dose key when registered), e.g. ``{"condition": "A+B"}``.
        n
            Number of cells.
        steps, method, cfg_scale
            Solver and guidance (see :meth:`counterfactual`).
        seed
            Seed of the noise (noise source) or of the control cells drawn from the bank
            of training controls saved with the model (control source).
        counts, raw_layer, out, overwrite
            As in :meth:`counterfactual` (library sizes of the counts layer are drawn from the
            training controls').
        support
            As in :meth:`counterfactual`, but ``"balance"`` by default: ``"discrete"`` rounds at
            each source cell's first count level, which a control-source model has (the bank
            cell it starts from, when the model was fitted on counts) and cells generated from
            noise do not (refused there; on Papalexi it raised E-distance by 0.03 with library
            sizes drawn at random).
        controls
            Control cells of the batch to generate in (a centred model): their mean is the
            batch's offset, in place of the training controls' mean, and a control source
            draws its bank cells mostly from the training batches alike to it (see
            :mod:`celldit.cells.start_cells`). E.g. generating cells of a new replicate from
            its controls' mean only.
        control_mean
            With ``controls``: ``"observed"`` (their mean) or ``"pooled"`` (their mean pooled
            with the training batches', see :meth:`counterfactual`).
        pooling
            With ``control_mean="pooled"``: how far toward the pooled mean (see :meth:`counterfactual`).
        """
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n={n!r}: the number of cells must be an integer >= 1")
        settings = self._settings(steps=steps, method=method, cfg_scale=cfg_scale)
        cfg_scale, batch_size = settings.cfg_scale, settings.batch_size
        check_output_size(int(n), len(self.genes), out)
        cond = {self.spec.perturbation_key: condition} if isinstance(condition, str) else dict(condition)
        if self.spec.perturbation_key not in cond:
            raise KeyError(f"condition needs the perturbation key {self.spec.perturbation_key!r}")
        missing = [k for k in self.spec.covariate_keys if k not in cond]
        if missing:
            raise KeyError(f"condition needs a value for the covariate(s) {missing} registered with the model")
        label, dose = cond[self.spec.perturbation_key], cond.get(self.spec.dose_key) if self.spec.dose_key else None
        self._check_dose(cond.get("dose") if self.spec.dose_key is None else None)
        check_control_mean(control_mean, pooling)
        offset, pooled = self.model.reference, 0.0
        if controls is not None:
            given = torch.from_numpy(self.input_rows(self._controls_of(controls)).all_rows())
            offset = given.mean(0)
            if control_mean == "pooled":  # all of them one batch: the one generated in
                pooled = self._pooled_shift(given, np.zeros(len(given), dtype=object), pooling)[0]
        elif control_mean == "pooled":
            raise ValueError("control_mean='pooled' pools the mean of the control cells given: pass controls=")
        start_cells = StartCells(self.model, cond, int(n), seed,
                                 None if controls is None else np.asarray(offset, dtype=np.float64))
        if support == "discrete" and (self.config.source != "control" or self.model.bank_library is None):
            raise ValueError("support='discrete' rounds each cell at its source cell's first count level: cells "
                             "generated from noise (or from a bank without library sizes, a model fitted on log1p "
                             "values) have none; use support='balance' (generate's default)")
        writer = self._writer(self.model.var.copy(), counts, raw_layer, out, overwrite, seed, support,
                              control_mean if controls is not None else "observed", pooling)
        escaper_rng = _escaper_rng(seed, label)
        try:
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                cov = pd.DataFrame({k: [str(cond[k])] * m for k in self.spec.covariate_keys}, index=range(m))
                cov_idx = self.rules.covariate_codes(label, dose, cov, self.vocab.encode_covariates(cov, n=m))
                x0, pick = start_cells.draw(m, need_library=counts)
                one = (np.zeros(m, dtype=object), {0: np.asarray(offset, dtype=np.float32)})  # one batch: its mean
                pert = self.rules.condition(label, dose, x0, cov, one, rng=escaper_rng)
                x = self._transport(x0, pert, cov_idx, steps, method, cfg_scale, batch_size,
                                    gate=self.rules.velocity_gate(label, dose))
                if self.config.centred:  # the model's cells are relative to their batch's controls
                    x = x + offset
                x = x + pooled
                library = None if pick is None or self.model.bank_library is None else self.model.bank_library[pick]
                levels = None if library is None else first_count_level(None, library)
                obs = self._labels_obs(label, dose, cov, [f"celldit-{i}" for i in range(start, start + m)])
                writer.add(x.numpy(), obs, library, levels)
        except BaseException:
            writer.abort()
            raise
        return writer.finish()


def _escaper_rng(seed: int, label: Any) -> np.random.Generator:
    """The stream that picks a condition's escapers: by seed and label, so that a label's cells
    are the same whichever other labels are carried with it."""
    return np.random.default_rng([seed, zlib.crc32(str(label).encode())])


def _scaled(v, factor: float):
    """The velocity function ``v`` times ``factor``."""
    return lambda x, t: factor * v(x, t)


def _conditioning(pert: tuple[np.ndarray, np.ndarray, np.ndarray], cov: torch.Tensor, drop: bool = False) -> dict:
    """Network inputs of one condition for ``len(cov)`` cells (``drop``: CFG's null branch)."""
    b, device = len(cov), cov.device
    return {"pert_idx": torch.from_numpy(pert[0]).to(device).expand(b, -1),
            "pert_scale": torch.from_numpy(pert[1]).to(device).expand(b, -1),
            "cov_idx": cov, "drop": torch.full((b,), drop, dtype=torch.bool, device=device)}
