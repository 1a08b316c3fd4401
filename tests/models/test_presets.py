"""The 12 paper presets: parameter counts, checkpoint layout and analytic multiply-adds.

Expected values come from closed forms of the *official* DiT architecture written here
(facebookresearch/DiT ``models.py``), not from our model. Big presets are built on the
``meta`` device, so nothing is allocated.
"""

from __future__ import annotations

import pytest
import torch

from celldit.models import DIT_PRESETS, ImageDiT
from celldit.models.flops import dit_forward_macs, preset_forward_macs

# the paper's model sizes: (depth, hidden size, heads)
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
ALL_PRESETS = [f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8)]

# published parameter counts (pos_embed included)
OFFICIAL_PARAMS = {"DiT-XL/2": 675_129_632, "DiT-L/2": 458_102_816, "DiT-B/2": 130_512_416, "DiT-S/2": 32_963_360}

# DiT paper, Table 4: forward Gflops (= multiply-adds) at 256 px, printed to 2 decimals
PAPER_GFLOPS = {"DiT-XL/2": 118.64, "DiT-XL/4": 29.05, "DiT-XL/8": 7.39, "DiT-B/2": 23.01, "DiT-S/8": 0.36}


def _parse(name: str) -> tuple[int, int, int, int]:
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = SIZES[size]
    return depth, hidden, heads, int(patch)


def official_layout(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                    learn_sigma: bool = True) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Every key and shape of an official DiT checkpoint, written from the official code."""
    depth, D, _, p = _parse(name)
    N = (input_size // p) ** 2
    out_ch = 2 * in_channels if learn_sigma else in_channels
    spec: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, N, D),
        "x_embedder.proj.weight": (D, in_channels, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),  # null class is the last row
    }
    for i in range(depth):
        b = f"blocks.{i}."
        spec.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })  # fmt: skip
    spec.update({
        "final_layer.linear.weight": (p * p * out_ch, D), "final_layer.linear.bias": (p * p * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })  # fmt: skip
    return spec


def official_param_count(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000) -> int:
    """Closed form of the official parameter count (pos_embed included)."""
    depth, D, _, p = _parse(name)
    N = (input_size // p) ** 2
    out_ch = 2 * in_channels
    patch_embed = in_channels * p * p * D + D
    pos_embed = N * D
    t_embed = 256 * D + D + D * D + D
    y_embed = (num_classes + 1) * D
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    final = (2 * D * D + 2 * D) + (D * p * p * out_ch + p * p * out_ch)
    return patch_embed + pos_embed + t_embed + y_embed + depth * block + final


def _meta_model(name: str, **kw) -> ImageDiT:
    with torch.device("meta"):
        return ImageDiT.from_preset(name, **kw)


def test_presets_are_the_papers_twelve():
    assert sorted(DIT_PRESETS) == sorted(ALL_PRESETS)
    for name in ALL_PRESETS:
        depth, hidden, heads, patch = _parse(name)
        assert DIT_PRESETS[name] == {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch}


def test_closed_form_reproduces_the_published_counts():
    for name, count in OFFICIAL_PARAMS.items():
        assert official_param_count(name) == count


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_parameter_count_and_layout_match_official(name):
    model = _meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == official_param_count(name)
    if name in OFFICIAL_PARAMS:
        assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_layout(name)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    assert model.pos_embed.requires_grad is False  # fixed sin-cos, a frozen parameter as in DiT


def test_layout_follows_constructor_arguments():
    model = _meta_model("DiT-S/4", input_size=64, num_classes=10)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_layout("DiT-S/4", input_size=64, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == official_param_count("DiT-S/4", 64, num_classes=10)


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match=r"DiT-M/2"):
        ImageDiT.from_preset("DiT-M/2")
    with pytest.raises(ValueError, match=r"DiT-XL/3"):
        preset_forward_macs("DiT-XL/3")


@pytest.mark.parametrize("name,gflops", sorted(PAPER_GFLOPS.items()))
def test_forward_macs_match_paper_table(name, gflops):
    assert round(preset_forward_macs(name, image_size=256).total / 1e9, 2) == gflops


def test_macs_terms_closed_form_xl2():
    """Spot-check the term-by-term count for XL/2 at 256 px (N = 256, D = 1152, L = 28)."""
    N, D, L = 256, 1152, 28
    m = preset_forward_macs("DiT-XL/2").terms
    assert m["qkv"] == L * N * 3 * D * D
    assert m["attn_scores"] == m["attn_weighted_sum"] == L * N * N * D
    assert m["mlp"] == L * N * 8 * D * D
    assert m["adaln"] == L * 6 * D * D
    assert m["patch_embed"] == N * D * 4 * 2 * 2
    assert m["final_linear"] == N * D * 2 * 2 * 8
    b = preset_forward_macs("DiT-XL/2")
    assert b.training_flops == 6 * b.total and b.forward_flops == 2 * b.total


def test_macs_of_model_config_equal_preset_macs():
    model = _meta_model("DiT-B/4")
    assert dit_forward_macs(**model.config).total == preset_forward_macs("DiT-B/4").total
