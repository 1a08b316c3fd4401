"""Image patch tokenizer: non-overlapping p x p patches, fixed 2-D sin-cos positions."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Tokenizer


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding (M,) -> (M, embed_dim), sin half first (as in MAE/DiT)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos table (grid_size**2, embed_dim): half the channels encode the row,
    half the column, in DiT's (w, h) meshgrid order."""
    if embed_dim % 4:
        raise ValueError(f"hidden_size={embed_dim} must be divisible by 4 for 2-D sin-cos positions")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # w varies fastest
    emb_h = sincos_1d(embed_dim // 2, grid_w)
    emb_w = sincos_1d(embed_dim // 2, grid_h)
    return torch.cat([emb_h, emb_w], dim=1).float()




class PatchTokenizer(Tokenizer):
    """Patchify (B, C, H, W) latents into (B, (H/p)(W/p), D) tokens and unpatchify back.

    Parameters
    ----------
    input_size
        Spatial size H = W of the latent.
    patch_size
        Patch side p; ``input_size`` must be a multiple of it.
    in_channels
        Latent channels C.
    hidden_size
        Token width D.
    out_channels
        Channels of the decoded output (``2 * in_channels`` for DiT's learned sigma).
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, out_channels: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels, self.out_channels, self.hidden_size = in_channels, out_channels, hidden_size
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2
        self.token_out_dim = patch_size * patch_size * out_channels
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"latent shape {tuple(x.shape)} does not match the model: expected "
                f"(B, {expected[0]}, {expected[1]}, {expected[2]}) (in_channels, input_size, input_size)"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)

    def decode(self, tokens: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, p*p*C_out) -> (B, C_out, H, W)."""
        B = tokens.shape[0]
        g, p, c = self.grid_size, self.patch_size, self.out_channels
        x = tokens.reshape(B, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(B, c, g * p, g * p)

    def fixed_positions(self) -> torch.Tensor:
        return sincos_2d(self.hidden_size, self.grid_size).unsqueeze(0)
