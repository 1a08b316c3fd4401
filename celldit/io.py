"""Files written and read by celldit: model folders and AnnData outputs, always atomically.

A model folder holds ``model.safetensors`` and ``config.json`` (plus JSON tables and
figures). Loading never unpickles: weights come from safetensors, settings from JSON.
Saving writes into a hidden temporary sibling folder and renames it into place, so a crash
leaves no half-written model (and the next save removes such leftovers); an existing folder
is never overwritten unless asked. ``.h5ad`` outputs are written to a temporary file and
renamed likewise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_model_folder", "read_json", "read_extra_json", "save_model_folder",
           "physical_memory", "tensor_shapes", "write_h5ad_atomic", "write_text_atomic"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_TMP_TAG = ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete hidden temporaries ``.{name}.tmp-{pid}-*`` left beside ``path`` by a killed
    save (the writing process no longer exists)."""
    prefix = f".{path.name}{_TMP_TAG}"
    for entry in path.parent.glob(f"{prefix}*"):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _temporary_sibling(path: Path, folder: bool) -> Path:
    prefix = f".{path.name}{_TMP_TAG}{os.getpid()}-"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def save_model_folder(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    extra_json: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    write_extra: Callable[[Path], Any] | None = None,
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
    write_extra
        Called with the temporary folder to write further files (figures, CSV) that must
        appear together with the model.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another output folder or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temporary_sibling(path, folder=True)
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        for name, value in (extra_json or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(value, indent=2))
        if write_extra is not None:
            write_extra(tmp)
        # config.json last: a folder without it never loads as a model
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        if path.exists():  # overwrite: move the old folder aside first, then swap
            old = _temporary_sibling(path, folder=True)
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_json(file: str | Path) -> Any:
    """A JSON file; a ``ValueError`` naming the file when it is not valid JSON."""
    file = Path(file)
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a JSON text file") from None


def tensor_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only (no
    tensor is loaded); a ``ValueError`` naming the file when it is truncated or not safetensors."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupted?): {err}") from None


def load_model_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(state_dict, config)`` from a folder written by :func:`save_model_folder`."""
    path = Path(path)
    if path.is_file():
        raise NotADirectoryError(f"{str(path)!r} is a file, not a model folder")
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an exported celldit model: {name} is missing")
    config = read_json(path / CONFIG_NAME)
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME} must hold a JSON object")
    tensor_shapes(path / WEIGHTS_NAME)  # a clear error for a damaged file before loading it
    return load_file(str(path / WEIGHTS_NAME)), config


def read_extra_json(path: str | Path, name: str) -> Any:
    """Read ``{name}.json`` from a model folder."""
    file = Path(path) / f"{name}.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the model folder")
    return read_json(file)


@contextmanager
def _written_in_place_of(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed into place when the block ends without
    an error, removed otherwise (an interrupted write leaves no file that loads as complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temporary_sibling(path, folder=False)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_h5ad_atomic(adata: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write an AnnData to ``path`` through a temporary sibling file renamed into place (an
    interrupted write leaves no file that loads as complete); an existing ``path`` is an
    error unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another file")
    with _written_in_place_of(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` (its folder made as needed) through a temporary sibling
    renamed into place, replacing an existing file: a report rewritten after every stage of a
    long run is never left half-written."""
    path = Path(path)
    with _written_in_place_of(path) as tmp:
        tmp.write_text(text)
    return path


def physical_memory() -> int:
    """Bytes of physical memory of this machine (0 when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0
