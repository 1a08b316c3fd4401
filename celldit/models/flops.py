"""Analytic compute of the image DiT: forward multiply-adds (MACs) per image, term by term.

Convention (the DiT paper's, Peebles & Xie 2023, Table 4 "Gflops"): one multiply-add is
one "flop". A hardware FLOP count is twice that, and a training step (forward + backward)
is taken as three forwards, so ``training FLOPs per image = 3 * 2 * forward MACs``.

Notation: B batch (everything here is per image, B = 1), N = (input_size / p)^2 tokens,
D hidden size, L depth, C in channels, C_out = 2C with ``learn_sigma``, F = 256
timestep-frequency features, H = mlp_ratio * D the MLP width.

Terms counted (``MacsBreakdown.terms``):

==================== ================================ =========================================
term                 MACs per image                   what
==================== ================================ =========================================
patch_embed          N * D * C * p^2                  ``x_embedder.proj`` (p x p conv, stride p)
timestep_embedder    F * D + D * D                    ``t_embedder.mlp.0`` and ``.mlp.2``
label_embedder       0                                a table look-up
adaln                L * 6 * D^2                      ``blocks.i.adaLN_modulation.1`` on c (B, D)
modulate             L * 2 * N * D                    ``x * (1 + scale) + shift``: one FMA per
                                                      element, before attention and before MLP
qkv                  L * 3 * N * D^2                  ``attn.qkv``
attn_scores          L * N^2 * D                      Q K^T over all heads (N^2 * d_head * heads)
attn_weighted_sum    L * N^2 * D                      softmax(Q K^T) V
attn_proj            L * N * D^2                      ``attn.proj``
mlp                  L * 2 * N * D * H                ``mlp.fc1`` and ``mlp.fc2``
final_adaln          2 * D^2                          ``final_layer.adaLN_modulation.1``
final_modulate       N * D                            the final layer's modulation (one FMA)
final_linear         N * D * p^2 * C_out              ``final_layer.linear``
==================== ================================ =========================================

Not counted (as in the paper's numbers): bias additions, LayerNorm statistics, softmax,
the attention scale, GELU/SiLU, the gated residual adds ``x + gate * f(x)``, the sin-cos
timestep features, adding ``pos_embed``, and unpatchify (a reshape).

Which terms the paper counted: the matrix products (patch embed, qkv, attention scores and
weighted sum, proj, MLP, adaLN, embedders, final layer) alone give XL/2 118.62 G, XL/4
29.04 G and B/2 23.005 G, just under the printed 118.64 / 29.05 / 23.01. The paper's
counter also charged about 2 N D per block of element-wise work (XL/2's printed 118.64
bounds it between 1.6 and 2.8 N D per block: 3 N D already prints 118.65); that is one
multiply-add per element for each of the block's two adaLN modulations, which we count,
while the gated residuals (another 2 N D) are not. With that, all five printed entries
(XL/2 118.64, XL/4 29.05, XL/8 7.39, B/2 23.01, S/8 0.36 at 256 px, i.e. 32x32x4 latents)
are reproduced to their printed precision; ``tests/test_dit_presets.py`` checks them.
Attention terms grow as N^2, so at larger images they matter more than at 256 px.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dit import DIT_PRESETS

#: width of the sinusoidal timestep features fed to ``t_embedder.mlp.0`` (DiT: 256)
FREQUENCY_EMBEDDING_SIZE = 256
#: latent downsampling factor of the SD VAE: a 256 px image is a 32x32x4 latent
VAE_DOWNSAMPLE = 8


@dataclass(frozen=True)
class MacsBreakdown:
    """Forward multiply-adds per image, by term (see the module docstring)."""

    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Forward MACs per image (the paper's "flops")."""
        return sum(self.terms.values())

    @property
    def gmacs(self) -> float:
        """Forward MACs per image in units of 1e9 (the paper's "Gflops")."""
        return self.total / 1e9

    @property
    def forward_flops(self) -> int:
        """Hardware FLOPs of one forward per image (2 per multiply-add)."""
        return 2 * self.total

    @property
    def training_flops(self) -> int:
        """FLOPs of one training step per image: forward + backward = 3 forwards, 2 FLOPs
        per multiply-add."""
        return 3 * 2 * self.total


def dit_forward_macs(
    input_size: int = 32,
    patch_size: int = 2,
    in_channels: int = 4,
    hidden_size: int = 1152,
    depth: int = 28,
    mlp_ratio: float = 4.0,
    learn_sigma: bool = True,
    frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE,
    **_ignored: object,
) -> MacsBreakdown:
    """Forward MACs per image of an :class:`~celldit.models.ImageDiT` with these constructor
    arguments (extra keys such as ``num_heads`` or ``num_classes`` are accepted and do not
    change the count: head count does not change attention cost, a label look-up is free).
    """
    if input_size % patch_size:
        raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
    p, C, D, L = patch_size, in_channels, hidden_size, depth
    N = (input_size // p) ** 2
    C_out = 2 * C if learn_sigma else C
    H = int(D * mlp_ratio)
    F = frequency_embedding_size
    terms = {
        "patch_embed": N * D * C * p * p,
        "timestep_embedder": F * D + D * D,
        "label_embedder": 0,
        "adaln": L * 6 * D * D,
        "modulate": L * 2 * N * D,
        "qkv": L * 3 * N * D * D,
        "attn_scores": L * N * N * D,
        "attn_weighted_sum": L * N * N * D,
        "attn_proj": L * N * D * D,
        "mlp": L * 2 * N * D * H,
        "final_adaln": 2 * D * D,
        "final_modulate": N * D,
        "final_linear": N * D * p * p * C_out,
    }
    return MacsBreakdown(terms)


def preset_config(name: str, image_size: int = 256, in_channels: int = 4) -> dict:
    """Constructor arguments of preset ``name`` ("DiT-XL/2" ...) for ``image_size`` pixels
    (latent side ``image_size / 8``)."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(DIT_PRESETS)}")
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image_size={image_size} must be a multiple of {VAE_DOWNSAMPLE} (the VAE's downsampling)")
    return {**DIT_PRESETS[name], "input_size": image_size // VAE_DOWNSAMPLE, "in_channels": in_channels}


def preset_forward_macs(name: str, image_size: int = 256) -> MacsBreakdown:
    """Forward MACs per image of preset ``name`` at ``image_size`` px (latents of side
    ``image_size / 8`` with 4 channels), e.g. ``preset_forward_macs("DiT-XL/2").gmacs``
    is 118.64 to the paper's precision."""
    return dit_forward_macs(**preset_config(name, image_size))


def model_forward_macs(model) -> MacsBreakdown:
    """Forward MACs per image of a built :class:`~celldit.models.ImageDiT` (from its
    ``config``)."""
    return dit_forward_macs(**model.config)


__all__ = [
    "FREQUENCY_EMBEDDING_SIZE", "VAE_DOWNSAMPLE", "MacsBreakdown", "dit_forward_macs",
    "model_forward_macs", "preset_config", "preset_forward_macs",
]
