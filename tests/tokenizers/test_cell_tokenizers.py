"""Cell tokenizers (gene, module, latent), module builders and codecs: values, not shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from celldit.models.dit import DiT
from celldit.tokenizers import (
    CODECS,
    TOKENIZERS,
    AutoencoderCodec,
    GeneModuleTokenizer,
    GeneTokenizer,
    LatentTokenizer,
    PCACodec,
    modules_from_correlation,
    modules_from_gene_sets,
    modules_from_labels,
)

MODULES = [[0, 5, 7], [1, 2], [3, 4, 6, 8, 9, 10, 11]]  # 12 genes, sizes 3, 2, 7


def low_rank(n: int = 300, g: int = 40, rank: int = 5, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, g)) + 2.0
    return (X + noise * rng.standard_normal((n, g))).astype(np.float32)


def in_span(v: torch.Tensor, W: torch.Tensor) -> float:
    """Largest residual of v's rows after projecting onto the columns of W (orthonormal)."""
    return (v - (v @ W) @ W.T).abs().max().item()


# -- module tokenizer ------------------------------------------------------------------
def test_module_tokens_are_local_to_their_module():
    torch.manual_seed(0)
    tok = GeneModuleTokenizer(12, 16, MODULES)
    x = torch.randn(3, 12)
    x2 = x.clone()
    x2[:, MODULES[1]] += torch.randn(3, 2)
    a, b = tok(x), tok(x2)
    assert a.shape == (3, 3, 16)
    assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2])
    assert not torch.allclose(a[:, 1], b[:, 1])
    # token = linear map of the module's genes + its embedding, padding ignored
    expected = x[:, MODULES[1]] @ tok.weight[1, :2] + tok.module_embedding[1]
    torch.testing.assert_close(a[:, 1], expected)


def test_module_decode_places_outputs_on_their_genes():
    tok = GeneModuleTokenizer(12, 8, MODULES)
    assert tok.token_out_dim == 7
    tokens = torch.tensor([[[100.0 * m + s for s in range(7)] for m in range(3)]])  # (1, M, S)
    expected = torch.zeros(12)
    for m, genes in enumerate(MODULES):
        for s, g in enumerate(genes):
            expected[g] = 100.0 * m + s
    assert torch.equal(tok.decode(tokens)[0], expected)


@pytest.mark.parametrize(
    ("modules", "needle"),
    [
        ([[0, 1, 2], [3, 4, 5, 6, 7, 8, 9, 10]], "no module: 11"),
        ([[0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9, 10, 11]], "more than one module: 3"),
        ([[0, 1, 2, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]], "out of range [0, 12): 12"),
    ],
)
def test_module_invalid_partition_names_the_gene(modules, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        GeneModuleTokenizer(12, 8, modules)


def test_module_config_round_trip():
    torch.manual_seed(0)
    tok = GeneModuleTokenizer(12, 8, MODULES)
    clone = TOKENIZERS["module"](**json.loads(json.dumps(tok.config)))
    clone.load_state_dict(tok.state_dict())
    x = torch.randn(2, 12)
    assert torch.equal(tok(x), clone(x))


# -- module builders -------------------------------------------------------------------
def test_modules_from_correlation_recovers_planted_blocks():
    rng = np.random.default_rng(0)
    n, g = 600, 30
    factors = rng.standard_normal((n, 3))
    X = np.empty((n, g))
    for b in range(3):  # loadings of both signs: a module is a shared factor, either sign
        load = rng.uniform(0.5, 1.5, 10) * rng.choice([-1.0, 1.0], 10)
        X[:, 10 * b : 10 * b + 10] = factors[:, [b]] * load + 0.5 * rng.standard_normal((n, 10))
    perm = rng.permutation(g)
    X = X[:, perm]
    blocks = sorted(sorted(np.flatnonzero(perm // 10 == b).tolist()) for b in range(3))
    assert modules_from_correlation(X, 3, seed=0) == blocks
    assert modules_from_correlation(sp.csr_matrix(X), 3, seed=0) == blocks
    split = modules_from_correlation(X, 3, max_size=4, seed=0)
    assert split == [c for m in blocks for c in (m[:4], m[4:7], m[7:])]
    X[:, 0] = 3.0  # a constant gene must land in some module, not crash
    mods = modules_from_correlation(X, 3, seed=0)
    assert sorted(g for m in mods for g in m) == list(range(g))


def test_modules_from_gene_sets_exact():
    var_names = ["A", "B", "C", "D", "E", "F", "G"]
    sets = {"s1": ["C", "A", "X"], "s2": ["A", "D", "E", "F"], "s3": ["Y"]}
    assert modules_from_gene_sets(var_names, sets) == [[0, 2], [3, 4, 5], [1, 6]]
    assert modules_from_gene_sets(var_names, sets, max_size=2) == [[0, 2], [3, 4], [5], [1, 6]]
    assert modules_from_gene_sets(var_names, {"s": ["A", "B", "C", "D", "E", "F", "G"]}) == [list(range(7))]
    with pytest.raises(ValueError, match="'X', 'Y'"):
        modules_from_gene_sets(var_names, {"s1": ["X"], "s2": ["Y"]})


def test_modules_from_labels_exact():
    labels = ["a", "b", "a", None, "b", "a", "a", "a", float("nan")]
    assert modules_from_labels(labels) == [[0, 2, 5, 6, 7], [1, 4], [3, 8]]
    assert modules_from_labels(labels, max_size=3) == [[0, 2, 5], [6, 7], [1, 4], [3, 8]]


# -- codecs ----------------------------------------------------------------------------
def test_pca_codec_matches_sklearn_and_is_exact_on_its_subspace():
    from sklearn.decomposition import PCA

    X = low_rank()
    codec = PCACodec(40, 5).fit(X)
    x = torch.from_numpy(X)
    ref = PCA(5).fit(X)
    recon = ref.inverse_transform(ref.transform(X))
    np.testing.assert_allclose(codec.decode(codec.encode(x)).numpy(), recon, atol=1e-4)
    W = codec.components
    torch.testing.assert_close(W.T @ W, torch.eye(5), atol=1e-5, rtol=0)
    # a point of the subspace round-trips exactly
    z = torch.randn(4, 5)
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, atol=1e-4, rtol=0)
    # decode_velocity is linear, and moving x by it keeps x's orthogonal residual
    dz1, dz2 = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(
        codec.decode_velocity(2 * dz1 - 3 * dz2), 2 * codec.decode_velocity(dz1) - 3 * codec.decode_velocity(dz2)
    )
    x4 = torch.randn(4, 40)
    moved = x4 + codec.decode_velocity(dz1)
    torch.testing.assert_close(codec.encode(moved), codec.encode(x4) + dz1, atol=1e-4, rtol=0)
    residual = lambda v: v - codec.decode(codec.encode(v))
    torch.testing.assert_close(residual(moved), residual(x4), atol=1e-4, rtol=0)
    # sparse input fits the same codec; nothing is trainable
    sparse = PCACodec(40, 5).fit(sp.csr_matrix(X))
    torch.testing.assert_close(sparse.components, codec.components, atol=1e-4, rtol=0)
    assert list(codec.parameters()) == [] and codec.is_fitted


def test_autoencoder_codec_improves_and_is_frozen():
    torch.manual_seed(0)
    X = low_rank(n=300, g=30, rank=6, noise=0.1)
    x = torch.from_numpy(X)
    codec = AutoencoderCodec(30, 3, hidden=32)
    mse = lambda: ((codec.decode(codec.encode(x)) - x) ** 2).mean().item()
    before = mse()
    codec.fit(X, epochs=5, batch_size=64)
    after = mse()
    pca = PCACodec(30, 3).fit(X)
    pca_mse = ((pca.decode(pca.encode(x)) - x) ** 2).mean().item()
    # a linear decoder can at best reach the PCA optimum (Eckart-Young)
    assert after < 0.5 * before and after <= 1.01 * pca_mse
    assert codec.is_fitted and all(not p.requires_grad for p in codec.parameters())
    z = torch.randn(2, 3)
    torch.testing.assert_close(codec.decode(z) - codec.mean, codec.decode_velocity(z))
    assert set(CODECS) == {"pca", "autoencoder"}


# -- latent tokenizer ------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["pca", "autoencoder"])
def test_latent_tokenizer_fit_round_trip_and_subspace(codec):
    torch.manual_seed(0)
    X = low_rank(n=200, g=30, rank=8, noise=0.1)
    kwargs = {"codec_kwargs": {"hidden": 16}} if codec == "autoencoder" else {}
    tok = LatentTokenizer(30, 16, latent_dim=6, token_dim=4, codec=codec, **kwargs)  # N = 2, 2 padded
    x = torch.from_numpy(X[:5])
    with pytest.raises(RuntimeError, match=r"call fit\(X\) on training cells first"):
        tok.encode(x)
    fit_kwargs = {"epochs": 2} if codec == "autoencoder" else {}
    assert tok.fit(X, seed=0, **fit_kwargs) is tok and tok.is_fitted
    tokens = tok.encode(x)
    assert tokens.shape == (5, 2, 16)

    clone = TOKENIZERS["latent"](**json.loads(json.dumps(tok.config)))
    assert not clone.is_fitted
    clone.load_state_dict(tok.state_dict())
    assert clone.is_fitted and torch.equal(clone.encode(x), tokens)

    W, _ = torch.linalg.qr(tok.codec.decoder_matrix())  # orthonormal basis of the span
    out = torch.randn(5, 2, 4)
    v = tok.decode(out)
    assert v.shape == (5, 30) and in_span(v, W) < 1e-5
    out[:, 1, 2:] = 99.0  # padded latent slots are dropped
    assert torch.equal(tok.decode(out), v)
    noise = tok.project_noise(torch.randn(7, 30))
    assert in_span(noise - tok.codec.mean, W) < 1e-5


def test_only_latent_tokenizer_projects_noise():
    assert getattr(GeneTokenizer(4, 8), "project_noise", None) is None
    assert getattr(GeneModuleTokenizer(12, 8, MODULES), "project_noise", None) is None


# -- gene tokenizer --------------------------------------------------------------------
def test_gene_token_depends_on_its_gene_only():
    torch.manual_seed(0)
    tok = GeneTokenizer(10, 16, value_hidden=8)
    x = torch.randn(2, 10)
    x2 = x.clone()
    x2[:, 4] += 1.0
    a, b = tok(x), tok(x2)
    changed = (a != b).any(-1).any(0)
    assert changed.tolist() == [i == 4 for i in range(10)]
    torch.testing.assert_close(a[:, 3], tok.value_embedding(x[:, 3:4]) + tok.gene_embedding.weight[3])
    assert torch.equal(tok.decode(torch.arange(20.0).reshape(2, 10, 1)), torch.arange(20.0).reshape(2, 10))


def test_gene_latents_read_every_gene_and_cost_grows_linearly():
    """Perceiver IO read-in/read-out: L latent tokens whatever G; every gene moves every
    latent, and each gene reads its own output from the latents."""
    torch.manual_seed(0)
    tok = GeneTokenizer(50, 16, value_hidden=8, latent_tokens=4, num_heads=4)
    assert tok.num_tokens == 4 and tok.token_out_dim == 16
    x = torch.randn(3, 50)
    z = tok.encode(x)
    assert z.shape == (3, 4, 16)
    x2 = x.clone()
    x2[:, 17] += 2.0
    assert (tok.encode(x2) != z).all(-1).all()  # a single gene reaches every latent
    tokens = torch.randn(3, 4, 16)
    out = tok.decode(tokens, x)
    assert out.shape == (3, 50) and torch.isfinite(out).all()
    assert out.std(dim=1).min() > 1e-3  # each gene its own read-out, even with near-uniform attention
    # the same backbone output read out with gene 17's value changed: gene 17 alone moves
    moved = (tok.decode(tokens, x2) != out).any(0)
    assert moved.tolist() == [i == 17 for i in range(50)]
    with pytest.raises(ValueError, match="needs the input x"):
        tok.decode(tokens)
    assert GeneTokenizer(**tok.config).config == tok.config
    with pytest.raises(ValueError, match="latent_tokens=0"):
        GeneTokenizer(10, 16, latent_tokens=0)


def test_modules_in_a_reduced_space_for_many_genes(monkeypatch):
    """Beyond EXACT_GENES genes, modules come from the squared correlation approximated in
    a reduced space (no G x G matrix): the planted blocks are found as exactly."""
    import celldit.tokenizers.gene_module_builders as builders

    rng = np.random.default_rng(1)
    n, g, k = 800, 120, 6
    factors = rng.standard_normal((n, k))
    X = np.repeat(factors, g // k, axis=1) * rng.choice([-1.0, 1.0], g) + 0.7 * rng.standard_normal((n, g))
    exact = modules_from_correlation(X, k, seed=0)
    monkeypatch.setattr(builders, "EXACT_GENES", 50)
    assert modules_from_correlation(X, k, seed=0) == exact == [list(range(i, i + 20)) for i in range(0, g, 20)]


# -- inside the DiT backbone -----------------------------------------------------------
def _fitted_latent() -> LatentTokenizer:
    tok = LatentTokenizer(12, 32, latent_dim=5, token_dim=2, codec="autoencoder", codec_kwargs={"hidden": 8})
    return tok.fit(low_rank(n=100, g=12, rank=5, noise=0.1), epochs=1)


@pytest.mark.parametrize("name", ["gene", "gene_latents", "module", "latent"])
def test_tokenizers_inside_dit(name):
    torch.manual_seed(0)
    tok = {
        "gene": lambda: GeneTokenizer(12, 32, value_hidden=8),
        "gene_latents": lambda: GeneTokenizer(12, 32, value_hidden=8, latent_tokens=3, num_heads=4),
        "module": lambda: GeneModuleTokenizer(12, 32, MODULES),
        "latent": _fitted_latent,
    }[name]()
    codec_state = {k: v.clone() for k, v in tok.state_dict().items() if k.startswith("codec.")}
    model = DiT(tok, hidden_size=32, depth=2, num_heads=4, context_dim=None)
    for k, v in codec_state.items():  # DiT's init must not touch a fitted codec
        assert torch.equal(tok.state_dict()[k], v), k
    assert model.pos_embed is None
    x, t = torch.randn(4, 12), torch.rand(4) * 1000
    out = model(x, t)
    assert out.shape == (4, 12) and torch.equal(out, torch.zeros(4, 12))
    with pytest.raises(ValueError, match="n_genes=12"):
        model(torch.randn(4, 11), t)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = ((model(x, t) - torch.randn(4, 12)) ** 2).mean()
    loss.backward()
    opt.step()
    out = model(x, t)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    # the step reached the path through the backbone, not only a bias: outputs differ between cells
    # (two zero-initialised factors in series would leave both without gradient)
    assert out.std(dim=0).max() > 1e-6
