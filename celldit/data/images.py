"""Precomputed image latents (with class labels) for training ImageDiT, and an optional VAE.

Files
-----
* ``.npy``: the (N, C, H, W) latents; labels in a separate (N,) ``.npy`` (``labels=``).
* ``.npz``: arrays ``latents`` (N, C, H, W) and ``labels`` (N,).
* ``.safetensors``: tensors ``latents`` and ``labels``.

Files are read without unpickling (``allow_pickle=False``). The VAE (a diffusers
``AutoencoderKL``, e.g. the SD VAE used by DiT) is loaded from a local folder only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

SD_VAE_SCALE = 0.18215
LATENT_SUFFIXES = (".npy", ".npz", ".safetensors")


def load_latent_arrays(path: str | Path, labels: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(latents, labels)`` from a ``.npy`` (+ labels ``.npy``), ``.npz`` or ``.safetensors`` file.

    Raises
    ------
    FileNotFoundError
        The file (or the labels file) does not exist.
    KeyError
        An ``.npz``/``.safetensors`` file lacks the ``latents`` or ``labels`` array.
    ValueError
        Unknown suffix, or a ``.npy`` without a labels file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if labels is None:
            raise ValueError(f"{path} holds only latents: pass the labels .npy as `labels=`")
        lab_path = Path(labels)
        if not lab_path.is_file():
            raise FileNotFoundError(f"labels file not found: {lab_path}")
        return np.load(path, allow_pickle=False), np.load(lab_path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ("latents", "labels")}
            available = list(z.files)
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        loaded = load_file(str(path))
        available = list(loaded)
        arrays = {k: v for k, v in loaded.items() if k in ("latents", "labels")}
    else:
        raise ValueError(f"unsupported latent file {path}: use one of {LATENT_SUFFIXES}")
    for key in ("latents", "labels"):
        if key not in arrays:
            raise KeyError(f"{path} has no array named {key!r} (it has {available})")
    if labels is not None:
        raise ValueError(f"{path} already holds labels; `labels=` is only for .npy latents")
    return arrays["latents"], arrays["labels"]


def expected_latent_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) an :class:`~celldit.models.ImageDiT` expects, from its ``config``."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "in_channels" not in config or "input_size" not in config:
        raise TypeError(f"{type(model).__name__} has no image config (in_channels, input_size)")
    return (int(config["in_channels"]), int(config["input_size"]), int(config["input_size"]))


class LatentDataset(Dataset):
    """(latent, label) pairs held in memory as float32 / int64 tensors.

    Parameters
    ----------
    latents
        (N, C, H, W) array or tensor.
    labels
        (N,) integer class labels.
    expected_shape
        (C, H, W) the model expects (see :func:`expected_latent_shape`); checked here so a
        mismatch fails before training rather than inside the first forward.
    num_classes
        If given, labels must lie in ``[0, num_classes)``.
    """

    def __init__(
        self,
        latents: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
        expected_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ):
        x = torch.as_tensor(np.asarray(latents) if not torch.is_tensor(latents) else latents).float()
        y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        if x.ndim != 4:
            raise ValueError(f"latents must be (N, C, H, W), got shape {tuple(x.shape)}")
        if y.ndim != 1:
            raise ValueError(f"labels must be (N,), got shape {tuple(y.shape)}")
        if len(x) != len(y):
            raise ValueError(f"length mismatch: {len(x)} latents but {len(y)} labels")
        if len(x) == 0:
            raise ValueError("the latents hold 0 samples")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"latents hold {bad} non-finite values (NaN or inf); re-encode or drop those samples")
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise ValueError("labels must be integer class ids")
        y = y.long()
        if len(y) and int(y.min()) < 0:
            raise ValueError(f"labels must be class ids 0, 1, ...; the smallest is {int(y.min())}")
        if expected_shape is not None and tuple(x.shape[1:]) != tuple(expected_shape):
            raise ValueError(
                f"latent shape {tuple(x.shape[1:])} (C, H, W) does not match the model, which expects "
                f"{tuple(expected_shape)} (in_channels, input_size, input_size)"
            )
        if num_classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels span [{int(y.min())}, {int(y.max())}] but the model has num_classes={num_classes} "
                f"(valid labels 0..{num_classes - 1})"
            )
        self.latents, self.labels = x, y

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        labels: str | Path | None = None,
        expected_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> LatentDataset:
        """Load a latent file (see the module notes for the formats)."""
        x, y = load_latent_arrays(path, labels)
        return cls(x, y, expected_shape=expected_shape, num_classes=num_classes)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[i], self.labels[i]


def save_latents(path: str | Path, latents: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Path:
    """Write latents and labels as ``.npz`` or ``.safetensors`` (by suffix)."""
    path = Path(path)
    x = latents.detach().cpu().numpy() if torch.is_tensor(latents) else np.asarray(latents)
    y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, latents=x, labels=y)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"latents": np.ascontiguousarray(x), "labels": np.ascontiguousarray(y.astype(np.int64))}, str(path))
    else:
        raise ValueError(f"save_latents writes .npz or .safetensors, not {path.suffix!r}")
    return path


class LatentDataModule(L.LightningDataModule):
    """Training batches ``(latents, labels)`` from a latent file or a :class:`LatentDataset`.

    Parameters
    ----------
    data
        A path (see :func:`load_latent_arrays`) or a ready dataset.
    labels
        Labels ``.npy`` for a ``.npy`` latent file.
    batch_size
        Per-process batch size (with DDP the global batch is ``batch_size * world_size``).
    expected_shape, num_classes
        Checks, see :class:`LatentDataset`.
    num_workers
        DataLoader workers (latents are in memory; 0 is usually fine).
    shuffle, drop_last
        DataLoader options (Lightning swaps in a ``DistributedSampler`` under DDP).
    """

    def __init__(
        self,
        data: str | Path | Dataset,
        labels: str | Path | None = None,
        batch_size: int = 256,
        expected_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        super().__init__()
        if isinstance(data, Dataset):
            self.dataset: Dataset = data
        else:
            self.dataset = LatentDataset.from_file(data, labels, expected_shape=expected_shape, num_classes=num_classes)
        if drop_last and len(self.dataset) < batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(self.dataset)} samples and drop_last=True "  # type: ignore[arg-type]
                "would leave no batch: lower batch_size"
            )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.drop_last = shuffle, drop_last

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )  # fmt: skip


# -- optional VAE (local folder only) ------------------------------------------------------
def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, subfolder: str | None = None) -> Any:
    """Load a diffusers ``AutoencoderKL`` from a local folder, never from the network.

    Parameters
    ----------
    path
        A folder written by ``AutoencoderKL.save_pretrained`` (``config.json`` + weights),
        e.g. a local copy of ``stabilityai/sd-vae-ft-ema``.
    subfolder
        Sub-folder holding the VAE (``"vae"`` inside a full Stable Diffusion folder).
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the VAE needs diffusers: pip install 'celldit[parity]' (or diffusers)") from err
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder not found: {folder} (only local folders are loaded, nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a saved diffusers AutoencoderKL")
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, scale: float = SD_VAE_SCALE, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> latents ``scale * z`` (mean of the posterior, or a sample)."""
    vae_dtype = next(vae.parameters()).dtype
    dist = vae.encode(images.to(vae.device, vae_dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * scale


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, scale: float = SD_VAE_SCALE) -> torch.Tensor:
    """Latents ``scale * z`` -> images in [-1, 1] (clamped)."""
    vae_dtype = next(vae.parameters()).dtype
    return vae.decode(latents.to(vae.device, vae_dtype) / scale).sample.clamp(-1, 1)
