"""ImageDiT is the official DiT: the official fixture, diffusers' DiT, adaLN-Zero, sin-cos
positions, and errors that name what is wrong.

``tests/fixtures/official_dit_tiny.pt`` (see ``../shared/parity/README.md``) holds the official
constructor arguments, a random state dict in the official key names, inputs and the
official implementation's fp32 output.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_diffusers

from celldit.models import ImageDiT, load_official_checkpoint
from celldit.models.convert import (
    from_diffusers_model,
    from_diffusers_state_dict,
    to_diffusers_model,
    to_diffusers_state_dict,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official_dit_tiny.pt"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official_model(fixture):
    model = ImageDiT(**fixture["config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    return model.eval()


# ---------------------------------------------------------------------------- official fixture
def test_fixture_loads_strictly_and_reproduces_official_output(fixture, official_model):
    with torch.no_grad():
        out = official_model(fixture["x"], fixture["t"], fixture["y"])
    assert out.shape == fixture["out"].shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, fixture["out"], atol=1e-5, rtol=0)


def test_load_official_checkpoint(tmp_path, fixture):
    # as shipped (with its config) ...
    model = load_official_checkpoint(str(FIXTURE)).eval()
    # ... and as a bare state dict, the architecture inferred from shapes
    bare = tmp_path / "bare.pt"
    torch.save(fixture["state_dict"], bare)
    inferred = load_official_checkpoint(str(bare), num_heads=fixture["config"]["num_heads"]).eval()
    for m in (model, inferred):
        with torch.no_grad():
            out = m(fixture["x"], fixture["t"], fixture["y"])
        torch.testing.assert_close(out, fixture["out"], atol=1e-5, rtol=0)
    assert inferred.config["num_classes"] == fixture["config"]["num_classes"]
    assert inferred.config["input_size"] == fixture["config"]["input_size"]


def test_state_dict_round_trips_exactly(fixture, official_model):
    sd = official_model.state_dict()
    assert list(sd) and set(sd) == set(fixture["state_dict"])
    for k, v in fixture["state_dict"].items():
        assert torch.equal(sd[k], v), k


# ---------------------------------------------------------------------------- diffusers reference
def _diffusers():
    return require_diffusers()


def test_equal_to_diffusers_dit_under_mapped_weights(fixture, official_model):
    _diffusers()
    dm = to_diffusers_model(official_model)
    assert dm.config.norm_eps == 1e-6
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in dm.transformer_blocks)
    with torch.no_grad():
        ref = dm(fixture["x"], timestep=fixture["t"], class_labels=fixture["y"]).sample
    torch.testing.assert_close(ref, fixture["out"], atol=1e-5, rtol=0)
    with torch.no_grad():
        ours = official_model(fixture["x"], fixture["t"], fixture["y"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_from_diffusers_with_independent_diffusers_weights():
    """A diffusers DiT with its own random weights converts to an ImageDiT with equal output."""
    diffusers = _diffusers()
    torch.manual_seed(0)
    dm = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
    )  # fmt: skip
    shared = {}
    with torch.no_grad():
        for name, p in dm.named_parameters():
            # one embedder shared by all blocks, as in DiT (diffusers keeps a copy per block)
            key = re.sub(r"transformer_blocks\.\d+\.norm1\.emb\.", "emb.", name)
            if key not in shared:
                shared[key] = torch.randn_like(p) * 0.05
            p.copy_(shared[key])
    for block in dm.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    dm.eval()
    model = from_diffusers_model(dm).eval()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 500.25, 999.0])
    y = torch.tensor([1, 9, 10])
    with torch.no_grad():
        ref = dm(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=0)
    assert ref.abs().mean() > 1e-3  # a non-trivial function, not adaLN-Zero's zeros


def test_state_dict_conversion_round_trip(official_model):
    sd = official_model.state_dict()
    dsd = to_diffusers_state_dict(sd)
    assert "pos_embed" not in dsd  # diffusers recomputes its positions
    assert "transformer_blocks.1.attn1.to_v.weight" in dsd
    back = from_diffusers_state_dict(dsd)
    assert set(back) == set(sd) - {"pos_embed"}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    with_pos = from_diffusers_state_dict(dsd, input_size=official_model.config["input_size"])
    assert torch.equal(with_pos["pos_embed"], ImageDiT(**official_model.config).pos_embed.detach())


def test_conversion_errors_name_keys(official_model):
    sd = dict(official_model.state_dict())
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=re.escape("blocks.0.extra.weight")):
        to_diffusers_state_dict(sd)
    dsd = to_diffusers_state_dict(official_model.state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    dsd[key] = dsd[key] + 1
    with pytest.raises(ValueError, match=re.escape(key)):
        from_diffusers_state_dict(dsd)


# ---------------------------------------------------------------------------- adaLN-Zero
def test_untrained_model_outputs_exactly_zero():
    torch.manual_seed(0)
    for model in (
        ImageDiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10),
        ImageDiT.from_preset("DiT-S/8", input_size=16, num_classes=10),
    ):
        size = model.config["input_size"]
        x = torch.randn(2, 4, size, size)
        for mode in (model.train, model.eval):
            mode()
            out = model(x, torch.tensor([0.0, 999.0]), torch.tensor([3, 10]))
            assert out.shape == (2, 8, size, size)
            assert torch.count_nonzero(out) == 0


# ---------------------------------------------------------------------------- sin-cos positions
def _official_2d_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """The official numpy formula (DiT ``models.py``, from MAE), written out here."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = one_d(embed_dim // 2, grid[0])
    emb_w = one_d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


@pytest.mark.parametrize("hidden,input_size,patch", [(64, 8, 2), (384, 32, 2), (1152, 32, 8), (768, 64, 4)])
def test_pos_embed_equals_official_numpy_formula(hidden, input_size, patch):
    model = ImageDiT(input_size=input_size, patch_size=patch, hidden_size=hidden, depth=1,
                     num_heads=4, num_classes=2)  # fmt: skip
    want = torch.from_numpy(_official_2d_sincos(hidden, input_size // patch)).float().unsqueeze(0)
    assert model.pos_embed.shape == want.shape
    assert torch.equal(model.pos_embed.detach(), want)


# ---------------------------------------------------------------------------- bad input
def test_latent_shape_mismatch_names_expected_shape(official_model):
    t, y = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    for bad in (torch.randn(2, 4, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(4, 8, 8)):
        with pytest.raises(ValueError, match=re.escape("(B, 4, 8, 8)")):
            official_model(bad, t, y)


def test_checkpoint_with_missing_key_names_it(fixture):
    sd = dict(fixture["state_dict"])
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match=re.escape("blocks.1.mlp.fc2.bias")):
        ImageDiT(**fixture["config"]).load_state_dict(sd)


def test_checkpoint_with_unexpected_key_names_it(fixture, tmp_path):
    sd = dict(fixture["state_dict"])
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(KeyError, match=re.escape("blocks.0.attn.q_norm.weight")):
        ImageDiT(**fixture["config"]).load_state_dict(sd)
    path = tmp_path / "extra.pt"
    torch.save({"config": fixture["config"], "state_dict": sd}, path)
    with pytest.raises(KeyError, match=re.escape("blocks.0.attn.q_norm.weight")):
        load_official_checkpoint(str(path))


def test_checkpoint_shape_mismatch_names_key_and_shapes(fixture):
    sd = dict(fixture["state_dict"])
    sd["y_embedder.embedding_table.weight"] = torch.zeros(1001, 64)  # an ImageNet table
    with pytest.raises(ValueError) as err:
        ImageDiT(**fixture["config"]).load_state_dict(sd)
    msg = str(err.value)
    assert "y_embedder.embedding_table.weight" in msg and "(1001, 64)" in msg and "(11, 64)" in msg
