"""Exported models: a folder with ``model.safetensors`` and ``config.json``, written atomically.

Loading never unpickles: weights come from safetensors, settings from JSON. Saving writes
into a temporary sibling folder and renames it into place, so a crash leaves no
half-written model, and an existing folder is never overwritten unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_model_folder(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    extra_json: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state_dict`` and ``config`` (plus ``{name}.json`` for each extra) to ``path``.

    Parameters
    ----------
    path
        Destination folder.
    state_dict
        Tensors to store (made contiguous, moved to CPU; shared storage is copied).
    config
        JSON-serialisable settings needed to rebuild the model.
    extra_json
        Further JSON files, ``{"genes": [...]}`` -> ``genes.json``.
    overwrite
        Replace an existing folder (atomically). Without it an existing ``path`` is an error.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another output folder or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        for name, value in (extra_json or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(value, indent=2))
        if path.exists():  # overwrite: move the old folder aside first, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(state_dict, config)`` from a folder written by :func:`save_model_folder`."""
    path = Path(path)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an exported celldit model: {name} is missing")
    return load_file(str(path / WEIGHTS_NAME)), json.loads((path / CONFIG_NAME).read_text())


def read_extra_json(path: str | Path, name: str) -> Any:
    """Read ``{name}.json`` from a model folder."""
    file = Path(path) / f"{name}.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the model folder")
    return json.loads(file.read_text())
