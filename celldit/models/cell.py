"""CellDiT network: a cell tokenizer + the DiT backbone + the perturbation encoder.

Shapes: B cells, G genes, K perturbation slots, C covariate keys.

The network predicts a velocity (B, G) for expression state x (B, G) at time t, under a
condition given as perturbation rows, dose scales and covariate codes. It knows nothing
of flows or AnnData (the user API wires those together).

``identity_control=True`` (the control-source coupling) multiplies the velocity of control
conditions by zero: transporting control cells under "no perturbation" is then exactly the
identity, as it must be, instead of an approximation that would add error to every
counterfactual.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..tokenizers import Tokenizer
from .conditioning import PerturbationEncoder
from .dit import DiT


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
    """

    def __init__(self, tokenizer: Tokenizer, encoder: PerturbationEncoder, hidden_size: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, identity_control: bool = True,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.identity_control = identity_control
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

    def source_noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """Gaussian source of the noise coupling, on the tokenizer's subspace when it has one."""
        eps = torch.randn(shape, generator=generator, device=device)
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
