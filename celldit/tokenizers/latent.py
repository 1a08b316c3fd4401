"""Latent tokenizer: a fitted codec maps a cell to k latent values, split into tokens."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import CellTokenizer
from .codecs import CODECS, Codec


class LatentTokenizer(CellTokenizer):
    """Encode gene-space cells with a codec and cut the latent into ``token_dim`` chunks.

    ``encode``: x (B, G) -> z = codec.encode(x) (B, k) -> zero-padded to N * token_dim
    -> (B, N, token_dim) -> per-token linear map plus a learned token embedding
    -> (B, N, hidden_size). ``decode``: (B, N, token_dim) -> latent velocity (B, k)
    (padding dropped) -> gene space through the codec's linear decoder map,
    ``dz @ W^T``. The output therefore lies in the codec's k-dimensional subspace, and a
    cell's component orthogonal to it is never moved by the flow (a counterfactual keeps
    the control cell's residual).

    The codec must be fitted on training cells (:meth:`fit`) before encoding; its state
    lives in buffers and frozen parameters, so ``load_state_dict`` restores it.

    Parameters
    ----------
    n_genes
        Genes G of the input.
    hidden_size
        Token width D.
    latent_dim
        Latent width k of the codec.
    token_dim
        Latent values per token; N = ceil(k / token_dim) tokens.
    codec
        Name of the codec in :data:`~celldit.tokenizers.codecs.CODECS` (``"pca"`` or
        ``"autoencoder"``).
    codec_kwargs
        Extra constructor arguments of the codec (e.g. ``{"hidden": 256}``).
    """

    def __init__(
        self,
        n_genes: int,
        hidden_size: int,
        latent_dim: int = 32,
        token_dim: int = 4,
        codec: str = "pca",
        codec_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
        if token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {token_dim}")
        self.n_genes, self.hidden_size = n_genes, hidden_size
        self.latent_dim, self.token_dim = latent_dim, token_dim
        self.codec_name, self.codec_kwargs = codec, dict(codec_kwargs or {})
        self.codec: Codec = CODECS[codec](n_genes, latent_dim, **self.codec_kwargs)
        self.num_tokens = math.ceil(latent_dim / token_dim)
        self.token_out_dim = token_dim
        # Per-token weights rather than one shared Linear: the chunks hold unrelated
        # coordinates (leading vs trailing components differ in variance by orders of
        # magnitude), and the cost is only k * D weights, as much as one Linear(k, D).
        self.weight = nn.Parameter(torch.empty(self.num_tokens, token_dim, hidden_size))  # (N, d, D)
        self.token_embedding = nn.Parameter(torch.empty(self.num_tokens, hidden_size))  # (N, D), also the bias
        self.reset_parameters()

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``TOKENIZERS["latent"](**config)`` rebuilds the architecture."""
        return {
            "n_genes": self.n_genes,
            "hidden_size": self.hidden_size,
            "latent_dim": self.latent_dim,
            "token_dim": self.token_dim,
            "codec": self.codec_name,
            "codec_kwargs": dict(self.codec_kwargs),
        }

    @property
    def is_fitted(self) -> bool:
        """Whether the codec has been fitted (a buffer, so it survives ``state_dict``)."""
        return self.codec.is_fitted

    def reset_parameters(self) -> None:
        """Xavier-uniform per-token maps, N(0, 0.02) token embeddings; the codec is untouched."""
        bound = math.sqrt(6.0 / (self.token_dim + self.hidden_size))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.normal_(self.token_embedding, std=0.02)

    def fit(self, X, seed: int = 0, **fit_kwargs: Any) -> LatentTokenizer:
        """Fit the codec on training cells X (cells x genes, dense or scipy sparse, in
        expression space); ``fit_kwargs`` go to the codec's ``fit``. Returns self."""
        self.codec.fit(X, seed=seed, **fit_kwargs)
        return self

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"the {self.codec_name!r} codec of LatentTokenizer is not fitted: call fit(X) on training cells first"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        z = self.codec.encode(x)  # (B, k)
        pad = self.num_tokens * self.token_dim - self.latent_dim
        z = nn.functional.pad(z, (0, pad)).reshape(len(z), self.num_tokens, self.token_dim)  # (B, N, d)
        return torch.einsum("bnd,ndh->bnh", z, self.weight) + self.token_embedding  # (B, N, D)

    def decode(self, tokens: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, token_dim) -> (B, G) gene-space velocity in the codec's subspace."""
        self._check_fitted()
        dz = tokens.reshape(len(tokens), -1)[:, : self.latent_dim]  # (B, k), padding dropped
        return self.codec.decode_velocity(dz)

    def project_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """(B, G) iid N(0, 1) noise -> a source sample on the codec's affine subspace,
        ``mean + decode_velocity(eps[:, :k])``."""
        self._check_fitted()
        return self.codec.mean + self.codec.decode_velocity(eps[:, : self.latent_dim])

    def fixed_positions(self) -> None:
        return None
