"""ImageDiT: the original class-conditional DiT, as the patch tokenizer + the backbone.

Constructor arguments, ``state_dict`` keys, shapes and parameter counts are those of the
official implementation (facebookresearch/DiT ``models.py``), so its checkpoints load with
``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..tokenizers import PatchTokenizer
from .dit import DIT_PRESETS, DIT_SIZES, DiT


class ImageDiT(DiT):
    """Class-conditional DiT on (B, C, H, W) image latents.

    Parameters
    ----------
    input_size
        Latent side H = W (32 for 256 px images through the SD VAE).
    patch_size
        Patch side p.
    in_channels
        Latent channels.
    hidden_size, depth, num_heads, mlp_ratio
        Transformer width, blocks, heads and MLP expansion.
    class_dropout_prob
        Label dropout probability for classifier-free guidance.
    num_classes
        Number of classes; label ``num_classes`` is the null class.
    learn_sigma
        If True the output has ``2 * in_channels`` channels (DiT's learned variance); the
        flow engine uses the first ``in_channels`` as the velocity.
    gradient_checkpointing
        Recompute block activations in the backward pass.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        gradient_checkpointing: bool = False,
    ):
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
        )  # fmt: skip
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        tokenizer = PatchTokenizer(input_size, patch_size, in_channels, hidden_size, self.out_channels)
        super().__init__(
            tokenizer, hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_classes=num_classes, class_dropout_prob=class_dropout_prob,
            gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        self.patch_size = patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ImageDiT:
        """Build one of the 12 paper models, e.g. ``ImageDiT.from_preset("DiT-XL/2")``.

        ``overrides`` replace any constructor argument (``input_size``, ``num_classes`` ...).
        """
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[name], **overrides})

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, C, H, W) latents, (B,) raw timesteps, (B,) labels -> (B, C_out, H, W)."""
        return super().forward(x, t, y=y)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guidance_channels: int | None = 3
    ) -> torch.Tensor:
        """The original DiT's batched classifier-free guidance.

        Expects the first half of the batch conditional and the second half with the null
        label. Guidance is applied to the first ``guidance_channels`` channels (3 in the
        original DiT) or to all of them with ``None``; other channels keep each half's own
        prediction.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = out.shape[1] if guidance_channels is None else guidance_channels
        eps, rest = out[:, :k], out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights; with ``strict=True`` a missing or unexpected key raises a
        ``KeyError`` listing them (and a shape mismatch a ``ValueError`` naming the key)."""
        own = self.state_dict()
        for key, value in state_dict.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(own[key].shape)}: check the preset, input_size and num_classes"
                )
        if strict:
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise KeyError(
                    f"checkpoint does not match ImageDiT: missing keys {missing[:10]}"
                    f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                    f"{' ...' if len(unexpected) > 10 else ''}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_official_checkpoint(path: str, **overrides: Any) -> ImageDiT:
    """Load an official DiT ``.pt`` checkpoint (a bare state dict, or one under ``"model"``,
    ``"ema"`` or ``"state_dict"``) into an :class:`ImageDiT` inferred from its shapes,
    without unpickling arbitrary objects."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    config = dict(obj.get("config", {})) if isinstance(obj, dict) else {}
    for key in ("ema", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = obj
    if not config:
        hidden = sd["x_embedder.proj.weight"].shape[0]
        patch = sd["x_embedder.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        num_tokens = sd["pos_embed"].shape[1]
        in_ch = sd["x_embedder.proj.weight"].shape[1]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        config = dict(
            input_size=int(round(num_tokens**0.5)) * patch, patch_size=patch, in_channels=in_ch,
            hidden_size=hidden, depth=depth, num_heads=_heads_for(hidden, overrides.pop("num_heads", None)),
            num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, learn_sigma=out_ch == 2 * in_ch,
        )  # fmt: skip
    model = ImageDiT(**{**config, **overrides})
    model.load_state_dict(sd, strict=True)
    return model


def _heads_for(hidden_size: int, num_heads: int | None) -> int:
    """Heads are not recorded in a state dict: take the paper's for its widths."""
    if num_heads is not None:
        return num_heads
    paper = {width: heads for _, width, heads in DIT_SIZES.values()}
    if hidden_size not in paper:
        raise ValueError(f"hidden_size={hidden_size} is not a paper size: pass num_heads=")
    return paper[hidden_size]
