"""The token-agnostic backbone: attention, cross-attention with padding, checkpointing."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from celldit.models import DiT
from celldit.models.layers import Attention, CrossAttention
from celldit.tokenizers import TOKENIZERS, PatchTokenizer, build_tokenizer


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    return model


def _manual_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_self_attention_equals_softmax_attention():
    attn = _randomise(Attention(16, num_heads=4))
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    expected = attn.proj(_manual_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_ignores_padding_and_handles_empty_sets():
    ca = _randomise(CrossAttention(16, context_dim=8, num_heads=2))
    x = torch.randn(3, 5, 16)
    ctx = torch.randn(3, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False], [False] * 4])
    out = ca(x, ctx, mask)
    # changing padded tokens changes nothing
    ctx2 = ctx.clone()
    ctx2[~mask] = 100.0
    torch.testing.assert_close(ca(x, ctx2, mask), out)
    # a sample is the same whether padded or given only its real tokens
    torch.testing.assert_close(ca(x[:1], ctx[:1, :2]), out[:1], atol=1e-5, rtol=1e-5)
    # a sample with no condition token gets no cross-attention signal (and no NaN)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isfinite(out).all()


def _cell_like_dit(**kwargs) -> DiT:
    tok = PatchTokenizer(input_size=4, patch_size=2, in_channels=2, hidden_size=32, out_channels=2)
    return DiT(tok, hidden_size=32, depth=2, num_heads=4, context_dim=8, **kwargs)


def test_untrained_model_with_cross_attention_is_exactly_zero():
    model = _cell_like_dit()
    out = model(torch.randn(2, 2, 4, 4), torch.tensor([0.0, 500.0]), context=torch.randn(2, 3, 8))
    assert torch.equal(out, torch.zeros_like(out))


def test_context_changes_the_output_through_cross_attention_only_where_given():
    model = _randomise(_cell_like_dit()).eval()
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 3, 8)
    no_ctx = model(x, t)
    with_ctx = model(x, t, context=ctx)
    masked_out = model(x, t, context=ctx, context_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert not torch.allclose(no_ctx, with_ctx, atol=1e-4)
    torch.testing.assert_close(masked_out, no_ctx, atol=1e-6, rtol=0)


def test_pooled_condition_vector_enters_adaln():
    model = _randomise(_cell_like_dit()).eval()
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([10.0, 900.0])
    assert not torch.allclose(model(x, t), model(x, t, cond=torch.randn(2, 32)), atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    base = _randomise(_cell_like_dit()).train()
    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing = True
    x, t, ctx = torch.randn(2, 2, 4, 4), torch.tensor([10.0, 900.0]), torch.randn(2, 3, 8)
    for m in (base, ckpt):
        m(x, t, context=ctx).pow(2).sum().backward()
    for (name, p), q in zip(base.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_tokenizer_registry_builds_by_name_and_rejects_unknown():
    assert TOKENIZERS["patch"] is PatchTokenizer
    tok = build_tokenizer("patch", input_size=8, patch_size=4, in_channels=3, hidden_size=16, out_channels=3)
    x = torch.randn(2, 3, 8, 8)
    assert tok.encode(x).shape == (2, 4, 16)
    # decode inverts patchify: feed the raw patches through decode
    patches = x.reshape(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 48)
    torch.testing.assert_close(tok.decode(patches), x)
    try:
        build_tokenizer("pixels")
    except ValueError as err:
        assert "pixels" in str(err) and "patch" in str(err)
    else:  # pragma: no cover
        raise AssertionError("unknown tokenizer accepted")


def test_image_dit_checks_time_and_labels_before_the_embedding():
    import pytest

    from celldit.models import ImageDiT

    torch.manual_seed(0)
    model = ImageDiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                     num_classes=3, learn_sigma=False).eval()
    x = torch.randn(2, 1, 4, 4)
    y = torch.tensor([0, 2])
    for layer in model.modules():  # move off adaLN-Zero so that t and y change the output
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.2)
    # a scalar t is used for every sample: the same as a (B,) tensor of it
    torch.testing.assert_close(model(x, torch.tensor(5.0), y), model(x, torch.tensor([5.0, 5.0]), y))
    assert not torch.allclose(model(x, torch.tensor([5.0, 900.0]), y), model(x, torch.tensor(5.0), y))
    model(x, torch.tensor([1.0, 2.0]), torch.tensor([3, 3]))  # the null class is allowed
    with pytest.raises(ValueError, match=r"class labels must lie in 0..2 .*got 0..7"):
        model(x, torch.tensor([1.0, 2.0]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"got -1..0"):
        model(x, torch.tensor([1.0, 2.0]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"t has shape \(3,\); expected \(2,\)"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), y)
    with pytest.raises(ValueError, match=r"y has shape \(3,\)"):
        model(x, torch.tensor([1.0, 2.0]), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class labels"):
        model(x, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
