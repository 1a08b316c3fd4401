"""Perturbation encoder: a cell's condition -> a set of condition tokens.

Shapes: B batch, K perturbation slots, C covariate keys, M = K + C tokens, Dc token width,
V vocabulary size, F prior feature width.

Each perturbation in a cell's set gives one token: a learned embedding (for perturbations
seen in training) plus a projection of its prior features (when it has any), scaled by
its dose. Each covariate key gives one token. A control cell (empty set) gets a learned
``control`` token in the first slot; classifier-free-guidance dropout swaps the
perturbation tokens for a learned ``null`` token. The backbone cross-attends to the set
and adds its masked mean (the pooled condition) to the timestep embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn


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
    (see ``covariate_dropout`` of :class:`~celldit.data.anndata.PairedBatches`), so that a
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
