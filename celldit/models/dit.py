"""The token-agnostic DiT backbone: adaLN-Zero blocks, optional cross-attention, presets.

Shapes: B batch, N tokens, D hidden size, M condition tokens, Dc condition-token width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..tokenizers import Tokenizer
from .layers import Attention, CrossAttention, LabelEmbedder, Mlp, TimestepEmbedder, modulate

#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning.

    ``x = x + gate_msa * attn(modulate(norm1(x)))``, then (optionally)
    ``x = x + gate_ca * cross_attn(modulate(norm_cross(x)), context)``, then
    ``x = x + gate_mlp * mlp(modulate(norm2(x)))``; shift, scale and gate come from the
    conditioning vector c and start at zero, so a fresh block is the identity.

    Parameters
    ----------
    hidden_size, num_heads, mlp_ratio
        Width, attention heads and MLP expansion.
    context_dim
        Width of condition tokens; ``None`` builds no cross-attention sublayer (the
        original DiT block, key for key).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads)
            self.adaLN_cross = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size, bias=True))

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D)
        c: torch.Tensor,  # (B, D)
        context: torch.Tensor | None = None,  # (B, M, Dc)
        context_mask: torch.Tensor | None = None,  # (B, M) bool
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and context is not None:
            shift_ca, scale_ca, gate_ca = self.adaLN_cross(c).chunk(3, dim=1)
            h = modulate(self.norm_cross(x), shift_ca, scale_ca)
            x = x + gate_ca.unsqueeze(1) * self.cross_attn(h, context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to each token's output width."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer over the tokens of any :class:`~celldit.tokenizers.Tokenizer`.

    Parameters
    ----------
    tokenizer
        Front and back end; registered as ``x_embedder`` (the original DiT's name). If it
        has fixed positions they become the frozen parameter ``pos_embed``.
    hidden_size
        Token width D.
    depth
        Number of DiT blocks.
    num_heads
        Attention heads per block.
    mlp_ratio
        MLP hidden width as a multiple of D.
    num_classes
        Number of class labels for a label embedder (``y_embedder``); 0 for none.
    class_dropout_prob
        Label dropout probability during training (the null class is ``num_classes``).
    context_dim
        Width of condition tokens to cross-attend to; ``None`` for no cross-attention.
    gradient_checkpointing
        Recompute block activations in the backward pass to save memory.

    Notes
    -----
    ``forward(x, t, ...)`` takes ``t`` as the raw scalar the timestep embedder receives.
    An untrained model outputs exactly zero (adaLN-Zero and a zero final linear).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        context_dim: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.gradient_checkpointing = gradient_checkpointing
        self.x_embedder = tokenizer
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        positions = tokenizer.fixed_positions()
        # a frozen Parameter (not a buffer) so it is in state_dict and counted, as in DiT
        self.pos_embed = nn.Parameter(positions, requires_grad=False) if positions is not None else None
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, tokenizer.token_out_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, N(0, 0.02) embedders, zero adaLN."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        proj = getattr(self.x_embedder, "proj", None)
        if isinstance(proj, nn.Conv2d):  # initialise patch projection like nn.Linear
            nn.init.xavier_uniform_(proj.weight.data.view([proj.weight.shape[0], -1]))
            nn.init.constant_(proj.bias, 0)
        if hasattr(self.x_embedder, "reset_parameters"):
            self.x_embedder.reset_parameters()
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every gate and modulation starts at zero
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            if block.cross_attn is not None:
                nn.init.constant_(block.adaLN_cross[-1].weight, 0)
                nn.init.constant_(block.adaLN_cross[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def _check_conditioning(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None) -> torch.Tensor:
        """``t`` as a (B,) tensor (a scalar is broadcast); clear errors for labels that the
        embedding would reject with an index error (or a device-side assert on a GPU)."""
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected ({batch},), one time per sample of x")
        if self.y_embedder is None:
            return t
        if y is None:
            raise ValueError("this model is class-conditional: pass labels `y`")
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"y must hold integer class labels (torch.long), got {y.dtype}")
        if y.shape != (batch,):
            raise ValueError(f"y has shape {tuple(y.shape)}; expected ({batch},), one label per sample of x")
        if not torch.compiler.is_compiling() and batch:
            low, high = int(y.min()), int(y.max())
            n = self.y_embedder.num_classes
            if low < 0 or high > n:
                raise ValueError(f"class labels must lie in 0..{n - 1} (or {n}, the null class); got {low}..{high}")
        return t

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model output for input ``x`` at time ``t``.

        Parameters
        ----------
        x
            Input batch in the tokenizer's layout.
        t
            (B,) raw timestep scalars (see class notes); a scalar is used for every sample.
        y
            (B,) class labels, needed when the model has a label embedder.
        context, context_mask
            (B, M, Dc) condition tokens and (B, M) bool mask of real tokens.
        cond
            (B, D) extra vector added to the conditioning (e.g. pooled condition tokens).
        """
        self.x_embedder.check_input(x)
        t = self._check_conditioning(x, t, y)
        h = self.x_embedder.encode(x)  # (B, N, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training)
        if cond is not None:
            c = c + cond
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, context, context_mask, use_reentrant=False)
            else:
                h = block(h, c, context, context_mask)
        h = self.final_layer(h, c)  # (B, N, token_out_dim)
        return self.x_embedder.decode(h, x)


#################################################################################
#                                  DiT Configs                                  #
#################################################################################

# (depth, hidden_size, num_heads) of the paper's model sizes
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

# every preset "DiT-{size}/{patch}" -> constructor arguments of the backbone
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": patch}
    for size, (d, w, h) in DIT_SIZES.items()
    for patch in (2, 4, 8)
}
