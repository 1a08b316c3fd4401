"""Codecs: fitted maps between a cell's G genes and a k-dimensional latent vector.

A codec's decoder is affine, ``decode(z) = mean + z @ W^T``, so a latent velocity maps to
gene space exactly and linearly (``decode_velocity(dz) = dz @ W^T``). Fitted state lives in
buffers and frozen parameters: it is saved with the tokenizer's ``state_dict`` and never
trained by the flow network.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

#: above this many matrix entries a fit uses a random subsample of cells
MAX_DENSE_ENTRIES = 200_000_000
#: cells in that subsample
MAX_FIT_CELLS = 50_000


def dense_training_matrix(X, seed: int = 0) -> np.ndarray:
    """Cells x genes (dense or scipy sparse) -> dense float32 array, subsampled to
    ``MAX_FIT_CELLS`` cells when it has more than ``MAX_DENSE_ENTRIES`` entries."""
    n_cells, n_genes = X.shape
    if n_cells * n_genes > MAX_DENSE_ENTRIES and n_cells > MAX_FIT_CELLS:
        rows = np.sort(np.random.default_rng(seed).choice(n_cells, MAX_FIT_CELLS, replace=False))
        X = X[rows]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return np.ascontiguousarray(X, dtype=np.float32)


class Codec(nn.Module):
    """Base class: an encoder to (B, k) and an affine decoder back to (B, G).

    Subclasses hold ``mean`` (G,) as a buffer and implement :meth:`fit`, :meth:`encode`
    and :meth:`decoder_matrix` (the (G, k) map W of the decoder).
    """

    def __init__(self, n_genes: int, latent_dim: int):
        super().__init__()
        if not 0 < latent_dim <= n_genes:
            raise ValueError(f"latent_dim={latent_dim} must be in [1, n_genes={n_genes}]")
        self.n_genes, self.latent_dim = n_genes, latent_dim
        self.register_buffer("mean", torch.zeros(n_genes))  # (G,)
        self.register_buffer("fitted", torch.tensor(False))  # a buffer so it survives state_dict

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def _check_fit_shape(self, X) -> None:
        if X.ndim != 2 or X.shape[1] != self.n_genes:
            raise ValueError(f"training matrix of shape {X.shape}: expected (cells, {self.n_genes}) genes")
        if X.shape[0] < self.latent_dim:
            raise ValueError(f"{X.shape[0]} training cells cannot fit latent_dim={self.latent_dim}")

    def fit(self, X, seed: int = 0) -> Codec:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G) cells -> (B, k) latents."""
        raise NotImplementedError

    def decoder_matrix(self) -> torch.Tensor:
        """The decoder's linear map W, (G, k)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, k) latents -> (B, G) cells: ``mean + z @ W^T``."""
        return self.mean + self.decode_velocity(z)

    def decode_velocity(self, dz: torch.Tensor) -> torch.Tensor:
        """(B, k) latent velocity -> (B, G) gene-space velocity ``dz @ W^T`` (no mean)."""
        return dz @ self.decoder_matrix().T


class PCACodec(Codec):
    """PCA: ``encode(x) = (x - mean) @ W``, ``decode(z) = mean + z @ W^T``.

    Parameters
    ----------
    n_genes
        Genes G.
    latent_dim
        Principal components k (W has orthonormal columns).
    """

    def __init__(self, n_genes: int, latent_dim: int):
        super().__init__(n_genes, latent_dim)
        self.register_buffer("components", torch.zeros(n_genes, latent_dim))  # W (G, k)

    @torch.no_grad()
    def fit(self, X, seed: int = 0) -> PCACodec:
        """Fit mean and the top-k components on training cells X (cells x genes)."""
        from sklearn.decomposition import PCA

        self._check_fit_shape(X)
        X = dense_training_matrix(X, seed)
        pca = PCA(n_components=self.latent_dim, random_state=seed).fit(X)
        self.mean.copy_(torch.from_numpy(pca.mean_.astype(np.float32)))
        self.components.copy_(torch.from_numpy(pca.components_.T.astype(np.float32)))
        self.fitted.fill_(True)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components

    def decoder_matrix(self) -> torch.Tensor:
        return self.components


class AutoencoderCodec(Codec):
    """Nonlinear encoder, linear decoder: ``z = (x - mean) @ E + MLP(x - mean)``,
    ``decode(z) = mean + z @ D^T``.

    The decoder is linear so latent velocities map to gene space exactly; the encoder is
    PCA plus a residual one-hidden-layer MLP, so it starts at (and can only improve on) the
    PCA solution. Weights are raw frozen parameters, not ``nn.Linear`` modules, because
    ``DiT.initialize_weights`` re-initialises every ``nn.Linear`` it contains.

    Parameters
    ----------
    n_genes
        Genes G.
    latent_dim
        Latent width k.
    hidden
        Hidden width of the encoder's MLP.
    """

    def __init__(self, n_genes: int, latent_dim: int, hidden: int = 256):
        super().__init__(n_genes, latent_dim)
        self.hidden = hidden
        self.enc_linear = nn.Parameter(torch.zeros(n_genes, latent_dim))  # E (G, k)
        self.enc_w1 = nn.Parameter(torch.zeros(hidden, n_genes))
        self.enc_b1 = nn.Parameter(torch.zeros(hidden))
        self.enc_w2 = nn.Parameter(torch.zeros(latent_dim, hidden))
        self.enc_b2 = nn.Parameter(torch.zeros(latent_dim))
        self.dec_weight = nn.Parameter(torch.zeros(n_genes, latent_dim))  # D (G, k)
        self.requires_grad_(False)  # the flow network never trains the codec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - self.mean  # (B, G)
        h = F.silu(F.linear(xc, self.enc_w1, self.enc_b1))  # (B, hidden)
        return xc @ self.enc_linear + F.linear(h, self.enc_w2, self.enc_b2)  # (B, k)

    def decoder_matrix(self) -> torch.Tensor:
        return self.dec_weight

    def fit(
        self, X, seed: int = 0, epochs: int = 30, batch_size: int = 256, lr: float = 1e-3
    ) -> AutoencoderCodec:
        """Train on cells X (cells x genes): reconstruction MSE with Adam, from PCA.

        E and D start at the PCA components and the MLP's output layer at zero, so the
        first step is the PCA reconstruction. Parameters are frozen again afterwards.
        """
        self._check_fit_shape(X)
        X = dense_training_matrix(X, seed)
        pca = PCACodec(self.n_genes, self.latent_dim).fit(X, seed)
        X = torch.from_numpy(X).to(self.mean.device)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.mean.copy_(pca.mean)
            self.enc_linear.copy_(pca.components)
            self.dec_weight.copy_(pca.components)
            bound = 1.0 / math.sqrt(self.n_genes)
            self.enc_w1.copy_(torch.empty_like(self.enc_w1, device="cpu").uniform_(-bound, bound, generator=gen))
            for p in (self.enc_b1, self.enc_w2, self.enc_b2):
                p.zero_()
        params = list(self.parameters())
        try:
            self.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            with torch.enable_grad():
                for _ in range(epochs):
                    for idx in torch.randperm(len(X), generator=gen).split(batch_size):
                        xb = X[idx.to(X.device)]
                        loss = F.mse_loss(self.decode(self.encode(xb)), xb)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
        finally:
            self.requires_grad_(False)
        self.fitted.fill_(True)
        return self


CODECS: dict[str, type[Codec]] = {"pca": PCACodec, "autoencoder": AutoencoderCodec}
