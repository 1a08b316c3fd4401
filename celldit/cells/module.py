"""The torch modules of a CellDiT: the perturbation encoder and the velocity network.

Shapes: B cells, G genes, K perturbation slots, C covariate keys, M = K + C condition
tokens, Dc token width, V vocabulary size, F prior feature width.

:class:`PerturbationEncoder` turns a cell's condition into a set of tokens. Each
perturbation in the cell's set gives one token: a learned embedding (for perturbations
seen in training) plus a projection of its prior features (when it has any), scaled by its
dose. Each covariate key gives one token. A control cell (empty set) gets a learned
``control`` token in the first slot; classifier-free-guidance dropout swaps the
perturbation tokens for a learned ``null`` token.

:class:`CellFlowNet` = a cell tokenizer + the DiT backbone (adaLN-Zero blocks that
cross-attend to the condition tokens; their masked mean joins the timestep embedding)
+ the encoder. It predicts a velocity (B, G) for expression state x (B, G) at time t and
knows nothing of flows or AnnData (:class:`~celldit.cells.model.CellDiT` wires those).

``identity_control=True`` (the control-source coupling) multiplies the velocity of control
conditions by zero: transporting control cells under "no perturbation" is then exactly the
identity, as it must be, instead of an approximation that would add error to every
counterfactual.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.dit import DiT
from ..tokenizers import Tokenizer

__all__ = ["CellFlowNet", "PerturbationEncoder"]


class PerturbationEncoder(nn.Module):
    """Condition tokens for perturbation sets, doses and covariates.

    Parameters
    ----------
    num_perturbations
        Vocabulary size V (seen and prior-only perturbations).
    dim
        Token width Dc.
    seen
        (V,) bool: which perturbations have training cells (learned embeddings).
    prior
        Optional (V, F) prior features (zeros where a perturbation has none).
    has_prior
        (V,) bool: which rows of ``prior`` are real.
    covariate_levels
        Number of levels of each covariate key (one extra "unknown" row is added).
    cfg_dropout
        Probability, in training, of replacing a cell's perturbation tokens by the null token.
    prior_only_prob
        Probability, in training, of hiding a seen perturbation's learned embedding so that
        the prior projection learns to stand in for it (unseen perturbations rely on it).

    Each covariate key has an extra last row, "unknown": the data hide covariates with it
    (see ``covariate_dropout`` of :class:`~celldit.cells.dataset.PairedBatches`), so that a
    (perturbation, covariate) pair never trained is predicted from the cell's state rather
    than from an untrained embedding.
    """

    def __init__(self, num_perturbations: int, dim: int, seen: torch.Tensor | None = None,
                 prior: torch.Tensor | None = None, has_prior: torch.Tensor | None = None,
                 covariate_levels: list[int] | tuple[int, ...] = (), cfg_dropout: float = 0.0,
                 prior_only_prob: float = 0.0):
        super().__init__()
        V = num_perturbations
        self.dim, self.cfg_dropout, self.prior_only_prob = dim, cfg_dropout, prior_only_prob
        self.embedding = nn.Embedding(max(V, 1), dim)
        self.register_buffer("seen", torch.ones(V, dtype=torch.bool) if seen is None else seen.bool().clone())
        F = 0 if prior is None else prior.shape[1]
        self.register_buffer("prior", torch.zeros(V, F) if prior is None else prior.float().clone())
        self.register_buffer("has_prior", torch.zeros(V, dtype=torch.bool) if has_prior is None else has_prior.bool().clone())
        self.prior_proj = nn.Sequential(nn.Linear(F, dim), nn.SiLU(), nn.Linear(dim, dim)) if F else None
        self.covariates = nn.ModuleList(nn.Embedding(n + 1, dim) for n in covariate_levels)
        self.control_token = nn.Parameter(torch.zeros(dim))
        self.null_token = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, std=0.02)
        for emb in self.covariates:
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.control_token, std=0.02)
        nn.init.normal_(self.null_token, std=0.02)

    @property
    def config(self) -> dict:
        return {"num_perturbations": self.seen.shape[0], "dim": self.dim,
                "covariate_levels": [e.num_embeddings - 1 for e in self.covariates],
                "prior_dim": self.prior.shape[1], "cfg_dropout": self.cfg_dropout,
                "prior_only_prob": self.prior_only_prob}

    def perturbation_tokens(self, pert_idx: torch.Tensor) -> torch.Tensor:
        """(B, K) rows (-1 = empty) -> (B, K, Dc) embeddings (zeros in empty slots)."""
        valid = pert_idx >= 0
        idx = pert_idx.clamp_min(0)
        use_learned = self.seen[idx] & valid
        if self.training and self.prior_proj is not None and self.prior_only_prob > 0:
            hide = torch.rand(idx.shape, device=idx.device) < self.prior_only_prob
            use_learned = use_learned & ~(hide & self.has_prior[idx])
        tokens = self.embedding(idx) * use_learned.unsqueeze(-1)
        if self.prior_proj is not None:
            tokens = tokens + self.prior_proj(self.prior[idx]) * (self.has_prior[idx] & valid).unsqueeze(-1)
        return tokens

    def forward(self, pert_idx: torch.Tensor, pert_scale: torch.Tensor | None = None,
                cov_idx: torch.Tensor | None = None, drop: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode a batch of conditions.

        Parameters
        ----------
        pert_idx
            (B, K) vocabulary rows, -1 for empty slots (a control cell has only -1).
        pert_scale
            (B, K) dose scales (1 without doses).
        cov_idx
            (B, C) covariate codes.
        drop
            (B,) bool: use the null token instead of the perturbations (CFG's unconditional
            branch). In training, cells are also dropped at random with ``cfg_dropout``.

        Returns
        -------
        tokens (B, M, Dc), mask (B, M) of real tokens, pooled (B, Dc) masked mean.
        """
        B, K = pert_idx.shape
        valid = pert_idx >= 0  # (B, K)
        tokens = self.perturbation_tokens(pert_idx)
        if pert_scale is not None:
            tokens = tokens * pert_scale.unsqueeze(-1).to(tokens.dtype)
        is_control = ~valid.any(1)  # (B,)
        slot0 = torch.zeros(B, K, 1, dtype=torch.bool, device=pert_idx.device)
        slot0[:, 0] = True
        tokens = torch.where(is_control[:, None, None] & slot0, self.control_token.to(tokens.dtype), tokens)
        mask = valid | (is_control[:, None] & slot0[..., 0])
        if drop is None:
            drop = torch.zeros(B, dtype=torch.bool, device=pert_idx.device)
        if self.training and self.cfg_dropout > 0:
            drop = drop | (torch.rand(B, device=pert_idx.device) < self.cfg_dropout)
        tokens = torch.where(drop[:, None, None] & slot0, self.null_token.to(tokens.dtype), tokens)
        tokens = tokens * ~(drop[:, None, None] & ~slot0)
        mask = torch.where(drop[:, None], slot0[..., 0], mask)
        if self.covariates:
            cov = torch.stack([emb(cov_idx[:, i]) for i, emb in enumerate(self.covariates)], dim=1)  # (B, C, Dc)
            tokens = torch.cat([tokens, cov.to(tokens.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones(B, cov.shape[1], dtype=torch.bool, device=mask.device)], dim=1)
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        return tokens, mask, pooled


class CellFlowNet(nn.Module):
    """Velocity network for cells.

    Parameters
    ----------
    tokenizer
        A cell tokenizer (``gene``, ``module`` or ``latent``) with ``hidden_size`` tokens.
    encoder
        The perturbation encoder (its ``dim`` is the cross-attention context width).
    hidden_size, depth, num_heads, mlp_ratio
        Backbone settings (as in DiT).
    identity_control
        Zero velocity for control conditions (see module notes).
    gradient_checkpointing
        Recompute block activations in the backward pass (saves memory on long gene sequences).
    noise_rank
        Noise source: rank k of the Gaussian prior's covariance factor (buffers ``prior_factor``
        (G, k) and ``prior_sd`` (G,), filled by :meth:`set_noise_prior`); 0: standard normal noise.
    """

    def __init__(self, tokenizer: Tokenizer, encoder: PerturbationEncoder, hidden_size: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, identity_control: bool = True,
                 gradient_checkpointing: bool = False, noise_rank: int = 0):
        super().__init__()
        self.identity_control = identity_control
        self.noise_rank = noise_rank
        if noise_rank:
            n_genes = tokenizer.n_genes
            self.register_buffer("prior_factor", torch.zeros(n_genes, noise_rank))
            self.register_buffer("prior_sd", torch.zeros(n_genes))
        self.dit = DiT(tokenizer, hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                       num_classes=0, context_dim=encoder.dim, gradient_checkpointing=gradient_checkpointing)
        self.encoder = encoder
        # pooled condition -> adaLN conditioning; zero-init keeps the untrained model at v = 0
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(encoder.dim, hidden_size))
        nn.init.zeros_(self.cond_proj[1].weight)
        nn.init.zeros_(self.cond_proj[1].bias)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.dit.x_embedder

    def set_noise_prior(self, factor: torch.Tensor, sd: torch.Tensor) -> None:
        """The noise source's covariance: ``factor factor^T + diag(sd^2)`` (see :meth:`source_noise`)."""
        self.prior_factor.copy_(factor)
        self.prior_sd.copy_(sd)

    def source_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """Gaussian noise of the noise coupling (drawn on the generator's device, returned on
        ``device``, default the network's).

        With a prior (``noise_rank > 0``): ``factor eps_k + sd * eps_G``, zero-mean with the
        control cells' covariance (a low-rank part and a per-gene rest), to which the caller
        adds the prior's mean (the condition's mean control cell plus anchor). Without: standard
        normal noise, on the tokenizer's subspace when it has one.
        """
        device = device if device is not None else next(self.parameters()).device
        source = generator.device if generator is not None else device
        if self.noise_rank:
            low = torch.randn((shape[0], self.noise_rank), generator=generator, device=source).to(device)
            eps = torch.randn(shape, generator=generator, device=source).to(device)
            return low @ self.prior_factor.T + eps * self.prior_sd  # as flow.coupling.gaussian_source, mean 0
        eps = torch.randn(shape, generator=generator, device=source).to(device)
        project = getattr(self.tokenizer, "project_noise", None)
        return project(eps) if project is not None else eps

    def forward(self, x: torch.Tensor, t: torch.Tensor, pert_idx: torch.Tensor,
                pert_scale: torch.Tensor | None = None, cov_idx: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, G) at state x (B, G) and raw time t (B,) under the given condition.

        See :meth:`PerturbationEncoder.forward` for ``pert_idx``, ``pert_scale``, ``cov_idx``
        and ``drop``.
        """
        tokens, mask, pooled = self.encoder(pert_idx, pert_scale, cov_idx, drop)  # (B, M, Dc)
        v = self.dit(x, t, context=tokens, context_mask=mask, cond=self.cond_proj(pooled))  # (B, G)
        if self.identity_control:  # by the perturbation set alone: a control label's guided (CFG) velocity stays 0
            perturbed = (pert_idx >= 0).any(1)
            v = v * perturbed.unsqueeze(1).to(v.dtype)
        return v
