"""Building blocks of the DiT backbone: embedders, attention and MLP.

Module and attribute names follow the original DiT (``t_embedder.mlp.0``, ``attn.qkv``,
``mlp.fc1`` ...) so that official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                     Embedding layers for timesteps and labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoidal features followed by a 2-layer MLP.

    Parameters
    ----------
    hidden_size
        Output width.
    frequency_embedding_size
        Width of the sinusoidal features (256 in DiT).

    Notes
    -----
    The embedder receives the raw scalar (DiT: a diffusion step in [0, 1000)); the flow
    engine passes ``t * time_scale`` (see :class:`celldit.flow.RectifiedFlow`).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """Sinusoidal embedding of (B,) scalars into (B, dim), cos half first (as in DiT)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; the last row of the table is the null class used for CFG.

    Parameters
    ----------
    num_classes
        Number of real classes; label ``num_classes`` is the null (unconditional) class.
    hidden_size
        Embedding width.
    dropout_prob
        Probability that a training label is replaced by the null class (label dropout).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class at random (or where ``force_drop_ids == 1``)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                               Attention and MLP                               #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash/memory-
    efficient kernels where the device has them). Keys match timm's ``Attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D/H)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Multi-head attention from the N tokens to a per-sample set of M condition tokens.

    Parameters
    ----------
    dim
        Width of the queries (the backbone's hidden size).
    context_dim
        Width of the condition tokens.
    num_heads
        Number of heads.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, N, D), context (B, M, Dc), mask (B, M) with True for real tokens."""
        B, N, D = x.shape
        M = context.shape[1]
        H = self.num_heads
        q = self.q(x).reshape(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        k, v = self.kv(context).reshape(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None
        has_context = None
        if mask is not None:
            mask = mask.bool()
            has_context = mask.any(dim=1)  # (B,)
            # a sample with no condition token would softmax over nothing (NaN):
            # let it attend to slot 0 and zero its output below
            safe = mask.clone()
            safe[~has_context, 0] = True
            attn_mask = safe[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        if has_context is not None:
            out = out * has_context[:, None, None].to(out.dtype)
        return out


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, as in DiT (keys ``fc1``/``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
