"""Weight conversion between the official DiT layout (= :class:`ImageDiT`) and diffusers'
``DiTTransformer2DModel``.

Key mapping (``i`` a block index; official -> diffusers)::

    x_embedder.proj.{weight,bias}            -> pos_embed.proj.{weight,bias}
    pos_embed (1, N, D)                      -> (dropped: diffusers recomputes it as a buffer)
    t_embedder.mlp.0.{weight,bias}           -> transformer_blocks.i.norm1.emb.timestep_embedder.linear_1.*
    t_embedder.mlp.2.{weight,bias}           -> transformer_blocks.i.norm1.emb.timestep_embedder.linear_2.*
    y_embedder.embedding_table.weight        -> transformer_blocks.i.norm1.emb.class_embedder.embedding_table.weight
    blocks.i.adaLN_modulation.1.*            -> transformer_blocks.i.norm1.linear.*
    blocks.i.attn.qkv.{weight,bias}          -> transformer_blocks.i.attn1.to_{q,k,v}.* (split in three along dim 0)
    blocks.i.attn.proj.*                     -> transformer_blocks.i.attn1.to_out.0.*
    blocks.i.mlp.fc1.*                       -> transformer_blocks.i.ff.net.0.proj.*
    blocks.i.mlp.fc2.*                       -> transformer_blocks.i.ff.net.2.*
    final_layer.adaLN_modulation.1.*         -> proj_out_1.*
    final_layer.linear.*                     -> proj_out_2.*

diffusers keeps a copy of the timestep and label embedders in every block (each block's
``norm1.emb``), and its final layer uses block 0's copy; DiT has one shared embedder. Going
to diffusers copies it into every block; coming back takes block 0's and checks that the
other copies agree.

For the two models to compute the same function, diffusers' model must be built with
``norm_eps=1e-6`` and every block's ``norm1.emb.time_proj.downscale_freq_shift`` set to 0
(diffusers' default of 1 shifts the timestep frequencies): :func:`to_diffusers_model` does
both. With them, outputs agree to fp32 rounding (``tests/test_dit_parity.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_EMB = "transformer_blocks.{i}.norm1.emb."

# official key (without the block prefix) -> diffusers key (without the block prefix)
_BLOCK_MAP = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_SHARED_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_EMBEDDER_MAP = {  # official -> diffusers suffix under each block's norm1.emb
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
}


def _depth(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not idx:
        raise KeyError(f"state dict has no keys matching {pattern!r}: is it a DiT state dict?")
    return max(idx) + 1


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-layout DiT weights (e.g. ``ImageDiT.state_dict()``) -> diffusers
    ``DiTTransformer2DModel`` weights. ``pos_embed`` is dropped (diffusers recomputes it).

    Raises ``KeyError`` naming any key it does not know how to map.
    """
    sd = dict(state_dict)
    depth = _depth(sd, r"blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    used = {"pos_embed"}
    for official, diffusers in _direct_pairs(depth):
        out[diffusers] = sd[official]
        used.add(official)
    for i in range(depth):
        for src, dst in _EMBEDDER_MAP.items():
            for p in ("weight", "bias"):
                if f"{src}.{p}" in sd:
                    out[_EMB.format(i=i) + f"{dst}.{p}"] = sd[f"{src}.{p}"]
                    used.add(f"{src}.{p}")
        pre, dpre = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"{pre}attn.qkv.{p}"].chunk(3, dim=0)
            for name, t in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                out[f"{dpre}attn1.{name}.{p}"] = t.clone()
            used.add(f"{pre}attn.qkv.{p}")
    unknown = sorted(set(sd) - used)
    if unknown:
        raise KeyError(f"cannot map these keys to diffusers' DiTTransformer2DModel: {unknown[:10]}")
    return out


def _direct_pairs(depth: int):
    """(official key, diffusers key) of every tensor that maps one to one."""
    for src, dst in _SHARED_MAP.items():
        for p in ("weight", "bias"):
            yield f"{src}.{p}", f"{dst}.{p}"
    for i in range(depth):
        for src, dst in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                yield f"blocks.{i}.{src}.{p}", f"transformer_blocks.{i}.{dst}.{p}"


def from_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], input_size: int | None = None
) -> dict[str, torch.Tensor]:
    """diffusers ``DiTTransformer2DModel`` weights -> official-layout DiT weights.

    Parameters
    ----------
    state_dict
        The diffusers model's ``state_dict()``.
    input_size
        Latent side (diffusers' ``sample_size``). diffusers does not store ``pos_embed``;
        with ``input_size`` the fixed sin-cos table is rebuilt so the result loads into
        :class:`ImageDiT` with ``strict=True``; without it ``pos_embed`` is left out.

    Raises ``ValueError`` if the per-block embedder copies differ (the official layout has
    one shared embedder) and ``KeyError`` naming keys it cannot map.
    """
    sd = dict(state_dict)
    depth = _depth(sd, r"transformer_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for official, diffusers in _direct_pairs(depth):
        out[official] = sd[diffusers]
        used.add(diffusers)
    for src, dst in _EMBEDDER_MAP.items():
        for p in ("weight", "bias"):
            first = _EMB.format(i=0) + f"{dst}.{p}"
            if first not in sd:
                continue
            out[f"{src}.{p}"] = sd[first]
            for i in range(depth):
                key = _EMB.format(i=i) + f"{dst}.{p}"
                if not torch.equal(sd[key], sd[first]):
                    raise ValueError(
                        f"{key!r} differs from block 0's copy: the official DiT layout has one shared "
                        "embedder, so per-block embedders cannot be converted"
                    )
                used.add(key)
    for i in range(depth):
        pre, dpre = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            parts = [sd[f"{dpre}attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v")]
            out[f"{pre}attn.qkv.{p}"] = torch.cat(parts, dim=0)
            used.update(f"{dpre}attn1.{n}.{p}" for n in ("to_q", "to_k", "to_v"))
    unknown = sorted(set(sd) - used)
    if unknown:
        raise KeyError(f"cannot map these diffusers keys to the DiT layout: {unknown[:10]}")
    if input_size is not None:
        from ..tokenizers.patch import sincos_2d

        hidden, patch = out["x_embedder.proj.weight"].shape[0], out["x_embedder.proj.weight"].shape[-1]
        if input_size % patch:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch}")
        out["pos_embed"] = sincos_2d(hidden, input_size // patch).unsqueeze(0)
    return out


def diffusers_config(model: Any) -> dict[str, Any]:
    """``DiTTransformer2DModel`` constructor arguments equivalent to an :class:`ImageDiT`."""
    cfg = model.config
    if float(cfg["mlp_ratio"]) != 4.0:
        raise ValueError(f"diffusers' DiT has a fixed MLP ratio of 4; this model has mlp_ratio={cfg['mlp_ratio']}")
    if cfg["num_classes"] and cfg["class_dropout_prob"] <= 0:
        raise ValueError("diffusers' DiT always has a null-class row: class_dropout_prob must be > 0")
    return dict(
        num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=cfg["in_channels"], out_channels=model.out_channels, num_layers=cfg["depth"],
        sample_size=cfg["input_size"], patch_size=cfg["patch_size"], num_embeds_ada_norm=cfg["num_classes"],
        norm_eps=1e-6, activation_fn="gelu-approximate", norm_type="ada_norm_zero",
    )  # fmt: skip


def to_diffusers_model(model: Any):
    """An :class:`ImageDiT` -> an equivalent diffusers ``DiTTransformer2DModel`` (needs the
    ``parity`` extra). Sets ``norm_eps=1e-6`` and ``downscale_freq_shift=0`` so both compute
    the same function; call it as ``dm(x, timestep=t, class_labels=y).sample``."""
    from diffusers import DiTTransformer2DModel

    dm = DiTTransformer2DModel(**diffusers_config(model))
    for block in dm.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    dm.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    if model.pos_embed is not None:  # a buffer outside diffusers' state_dict: copy it too
        with torch.no_grad():
            dm.pos_embed.pos_embed.copy_(model.pos_embed.detach().to(dm.pos_embed.pos_embed.dtype))
    return dm.eval()


def from_diffusers_model(dm: Any, **overrides: Any):
    """A diffusers ``DiTTransformer2DModel`` -> an :class:`ImageDiT` with the same weights.

    Note: the result matches ``dm`` only if ``dm`` was built with ``norm_eps=1e-6`` and
    ``downscale_freq_shift=0`` (as the official DiT); diffusers' own DiT checkpoints were
    converted from the official ones, so their weights are the official weights.
    """
    from .image import ImageDiT

    c = dm.config
    if c.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"only ada_norm_zero DiTs convert; got norm_type={c['norm_type']!r}")
    in_ch = c["in_channels"]
    out_ch = c["out_channels"] or in_ch
    config = dict(
        input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=in_ch,
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"], depth=c["num_layers"],
        num_heads=c["num_attention_heads"], mlp_ratio=4.0, num_classes=c["num_embeds_ada_norm"],
        learn_sigma=out_ch == 2 * in_ch,
    )  # fmt: skip
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"out_channels={out_ch} must equal in_channels or twice it (learn_sigma)")
    model = ImageDiT(**{**config, **overrides})
    sd = from_diffusers_state_dict(dm.state_dict())
    # diffusers keeps pos_embed as a (non-persistent) buffer: take it from the module
    sd["pos_embed"] = dm.pos_embed.pos_embed.detach().float().reshape(1, -1, config["hidden_size"])
    model.load_state_dict(sd, strict=True)
    return model


__all__ = [
    "diffusers_config", "from_diffusers_model", "from_diffusers_state_dict", "to_diffusers_model",
    "to_diffusers_state_dict",
]
