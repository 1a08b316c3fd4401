"""CellDiT model folders: what is saved, format versions, and the checks made before loading.

A folder (written atomically by :func:`celldit.io.save_model_folder`) holds

* ``model.safetensors``: ``network.*`` (the EMA weights), ``anchors``, ``groups.*`` (per
  covariate-group shifts and control means), ``bank_x`` (control cells for ``generate``),
  ``bank_batch`` (each bank cell's row of ``control_batches``; absent in older folders, whose
  ``generate`` then draws from the bank uniformly), ``reference`` (the training controls'
  mean) and ``control_batches.*`` (each training batch's mean control cell and size, for
  ``control_mean="pooled"`` and ``generate``'s batch weights; absent in folders saved before
  it);
* ``config.json``: ``format_version``, ``kind`` (``"celldit.CellDiT"``), ``config`` (every
  :class:`~celldit.cells.config.CellDiTConfig` field), the derived tokenizer settings,
  ``space``, ``is_trained`` and a summary of the training ``history``;
* ``genes.json``, ``vocab.json``, ``conditions.json``, ``trained_groups.json``,
  ``bank.json``; ``losses.csv`` and ``loss.png`` when the model was trained.

Before anything is built, :func:`read_model_folder` checks the format version, the settings
(types and ranges) and their agreement with the tensor shapes in the safetensors header
(read without loading a tensor), so a damaged or edited folder gives one clear error naming
the file instead of a huge allocation or an error deep inside torch. Folders of format
version 1 (celldit 0.1) load through :func:`upgrade_v1`.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data.spec import PerturbationSpec
from ..io import CONFIG_NAME, WEIGHTS_NAME, load_model_folder, read_extra_json, save_model_folder, tensor_shapes
from ..options import to_dict
from .config import CellDiTConfig

__all__ = ["FORMAT_VERSION", "KIND", "read_model_folder", "upgrade_v1", "write_model_folder"]

FORMAT_VERSION = 2
KIND = "celldit.CellDiT"
SUPPORTED_VERSIONS = (1, 2)


def write_model_folder(model: Any, path: str | Path, overwrite: bool = False,
                       extra_files: dict[str, Any] | None = None, extra_text: dict[str, str] | None = None) -> Path:
    """Save ``model`` (a CellDiT) to ``path`` (see the module notes)."""
    from ..train.callbacks import write_loss_curve

    state = {f"network.{k}": v for k, v in model.network.state_dict().items()}
    state["anchors"] = torch.from_numpy(model.conditions.anchors)
    state.update({f"groups.{k}": torch.from_numpy(v) for k, v in model.conditions.group_tensors().items()})
    state["bank_x"] = model.bank_x
    if getattr(model, "bank_batch", None) is not None:
        state["bank_batch"] = torch.from_numpy(np.asarray(model.bank_batch, dtype=np.int64))
    state["reference"] = model.reference
    if model.control_batches is not None:
        means, sizes = model.control_batches
        state["control_batches.means"], state["control_batches.sizes"] = torch.from_numpy(means), torch.from_numpy(sizes)
    if model.bank_library is not None:
        state["bank_library"] = torch.from_numpy(np.asarray(model.bank_library, dtype=np.float64))
    if model.pca is not None:
        state["pca.mean"], state["pca.components"] = (torch.from_numpy(v) for v in model.pca)
    settings = to_dict(model.config)
    if isinstance(model.config.perturbation_features, pd.DataFrame):
        settings["perturbation_features"] = "dataframe"  # its rows are in the weights (network.encoder.prior)
    history = {k: v for k, v in model.history.items() if k not in ("losses", "loss_steps")}
    config = {"format_version": FORMAT_VERSION, "kind": KIND, "config": settings, "space": model.space,
              "tokenizer_kwargs": model.tokenizer_kwargs, "prior_dim": model.prior_dim,
              "noise_rank": model.noise_rank, "covariate_groups": model.covariate_groups,
              "is_trained": model.is_trained, "history": history}
    bank = {"names": list(model.bank_obs.index), "obs": model.bank_obs.to_dict(orient="list")}
    extra = {"genes": model.genes, "vocab": model.vocab.to_dict(), "conditions": model.conditions.to_dict(),
             "trained_groups": model.trained_groups, "bank": bank, "normalisation": model.normalisation,
             "var": json.loads(model.var.to_json(orient="split")), **(extra_files or {})}

    def curve_and_text(folder: Path) -> None:
        if model.history.get("losses"):
            write_loss_curve(folder, model.history["loss_steps"], model.history["losses"])
        for name, text in (extra_text or {}).items():
            (folder / name).write_text(text)

    return save_model_folder(path, state, config, extra_json=extra, overwrite=overwrite, write_extra=curve_and_text)


def upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 ``config.json`` (celldit 0.1: ``spec`` + ``settings``) in the format-2 layout."""
    spec, s = raw.get("spec", {}), dict(raw.get("settings", {}))
    config = {**{k: spec[k] for k in ("perturbation_key", "control", "delimiter", "dose_key", "covariate_keys")
                 if k in spec},
              **{k: s[k] for k in ("pair_keys", "tokenizer", "source", "anchor", "ot", "ot_dims", "center",
                                   "hidden_size", "depth", "num_heads", "mlp_ratio", "cfg_dropout",
                                   "covariate_dropout", "seed") if k in s},
              "perturbation_features": "expression" if s.get("prior_dim") else None}
    return {"format_version": 1, "kind": KIND, "config": config, "space": raw.get("space"),
            "tokenizer_kwargs": s.get("tokenizer_kwargs"), "prior_dim": s.get("prior_dim", 0),
            "is_trained": raw.get("is_trained", False), "history": raw.get("history", {})}


def _check(condition: bool, file: Path, message: str) -> None:
    if not condition:
        raise ValueError(f"{file}: {message}")


def _check_layout(raw: Any, file: Path) -> None:
    _check(isinstance(raw, dict), file, "must hold a JSON object")
    version = raw.get("format_version")
    _check(version in SUPPORTED_VERSIONS, file,
           f"format_version {version!r} is not one this celldit reads ({list(SUPPORTED_VERSIONS)}); "
           "a newer celldit wrote it, or the file was edited")
    kind = raw.get("kind")
    _check(kind in (KIND, "CellDiT"), file, f"holds a {kind!r} model, not a CellDiT")


def _check_shapes(cfg: CellDiTConfig, raw: dict[str, Any], genes: list, vocab: dict, conditions: list,
                  shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """The settings agree with the tensors in the file (module notes)."""
    weights = folder / WEIGHTS_NAME
    G, D = len(genes), cfg.hidden_size
    expect = {
        "reference": (G,),
        "anchors": (len(conditions), G),
        "network.dit.t_embedder.mlp.2.weight": (D, D),
        "network.encoder.embedding.weight": (max(len(vocab.get("perturbations", [])), 1), D),
        "network.encoder.prior": (len(vocab.get("perturbations", [])), int(raw.get("prior_dim") or 0)),
    }
    for key, shape in expect.items():
        _check(key in shapes, weights, f"tensor {key!r} is missing")
        _check(tuple(shapes[key]) == shape, weights,
               f"tensor {key!r} has shape {tuple(shapes[key])} but the settings in {CONFIG_NAME}, genes.json and "
               f"vocab.json imply {shape} (the files do not belong together)")
    if "control_batches.means" in shapes:
        means, sizes = shapes["control_batches.means"], shapes.get("control_batches.sizes")
        _check(len(means) == 2 and means[1] == G and sizes == (means[0],), weights,
               f"control_batches.means {tuple(means)} / sizes {sizes} do not match {G} genes")
    if "bank_batch" in shapes:
        _check(shapes["bank_batch"] == shapes["bank_x"][:1] and "control_batches.means" in shapes, weights,
               f"bank_batch {tuple(shapes['bank_batch'])} does not match bank_x {tuple(shapes['bank_x'])} "
               "(or control_batches is missing)")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"network\.dit\.blocks\.(\d+)\.", k))}
    _check(len(blocks) == cfg.depth, weights, f"holds {len(blocks)} transformer blocks but depth={cfg.depth}")
    tok = raw.get("tokenizer_kwargs")
    _check(isinstance(tok, dict) and tok.get("n_genes") == G and tok.get("hidden_size") == D, folder / CONFIG_NAME,
           "tokenizer_kwargs do not match the genes and hidden_size")
    if cfg.tokenizer == "module":
        modules = tok.get("modules")
        _check(isinstance(modules, list) and all(isinstance(m, list) for m in modules), folder / CONFIG_NAME,
               "tokenizer_kwargs.modules must be a list of gene-index lists")
        size = max((len(m) for m in modules), default=0)
        _check(shapes.get("network.dit.x_embedder.weight") == (len(modules), size, D), weights,
               "the module tokenizer's weight does not match tokenizer_kwargs.modules")


def _optional_json(folder: Path, name: str, default: Any) -> Any:
    """``name.json`` of a model folder, or ``default`` for folders written before it existed."""
    return read_extra_json(folder, name) if (folder / f"{name}.json").is_file() else default


def _read_var(folder: Path, genes: list[str]) -> pd.DataFrame:
    """The saved ``var`` annotations of the model's genes (an empty frame for older folders)."""
    if not (folder / "var.json").is_file():
        return pd.DataFrame(index=pd.Index(genes))
    var = pd.read_json(io.StringIO(json.dumps(read_extra_json(folder, "var"))), orient="split")
    var.index = var.index.astype(str)
    return var


def read_model_folder(path: str | Path) -> tuple[CellDiTConfig, dict[str, Any]]:
    """Check a model folder and read ``(config, state)`` for
    :meth:`CellDiT.from_config <celldit.cells.model.CellDiT.from_config>`."""
    from ..io import read_json

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not an exported celldit model: {CONFIG_NAME} is missing")
    raw = read_json(folder / CONFIG_NAME)
    _check_layout(raw, folder / CONFIG_NAME)
    if raw["format_version"] == 1:
        raw = upgrade_v1(raw)
    raw["config"].setdefault("on_target", False)  # saved before the rule: predict as it did
    try:
        config = CellDiTConfig(**raw["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: invalid model settings: {err}") from None
    genes = read_extra_json(folder, "genes")
    vocab = read_extra_json(folder, "vocab")
    conditions = read_extra_json(folder, "conditions")
    _check(isinstance(genes, list) and all(isinstance(g, str) for g in genes) and len(set(genes)) == len(genes),
           folder / "genes.json", "must be a list of distinct gene names")
    _check(isinstance(vocab, dict) and isinstance(conditions, list), folder, "vocab.json or conditions.json is malformed")
    shapes = tensor_shapes(folder / WEIGHTS_NAME)
    _check_shapes(config, raw, genes, vocab, conditions, shapes, folder)
    tensors, _ = load_model_folder(folder)
    bank = read_extra_json(folder, "bank")
    groups = {k[len("groups."):]: v.numpy() for k, v in tensors.items() if k.startswith("groups.")}
    state = {
        "spec": PerturbationSpec(config.perturbation_key, config.control, config.delimiter, config.dose_key,
                                 tuple(config.covariate_keys)),
        "genes": genes, "space": raw.get("space"), "vocab": vocab, "conditions": conditions,
        "anchors": tensors["anchors"].numpy(), "groups": groups, "reference": tensors["reference"],
        "trained_groups": read_extra_json(folder, "trained_groups"),
        "tokenizer_kwargs": raw["tokenizer_kwargs"], "prior_dim": int(raw.get("prior_dim") or 0),
        "noise_rank": int(raw.get("noise_rank") or 0), "covariate_groups": list(raw.get("covariate_groups") or []),
        "bank_x": tensors["bank_x"],
        "bank_library": tensors["bank_library"].numpy() if "bank_library" in tensors else None,
        "bank_batch": tensors["bank_batch"].numpy() if "bank_batch" in tensors else None,  # saved since stop 24
        "control_batches": (tensors["control_batches.means"].numpy(), tensors["control_batches.sizes"].numpy())
        if "control_batches.means" in tensors else None,
        "pca": (tensors["pca.mean"].numpy(), tensors["pca.components"].numpy()) if "pca.mean" in tensors else None,
        "normalisation": _optional_json(folder, "normalisation", {"space": "counts" if raw.get("space") ==
                                        "log1p_normalized" else "log1p", "basis": {"kind": "unknown"}}),
        "var": _read_var(folder, genes),
        "bank_obs": pd.DataFrame(bank["obs"], index=bank["names"], columns=list(config.covariate_keys)),
        "network": {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")},
        "is_trained": bool(raw.get("is_trained")), "history": dict(raw.get("history") or {}),
    }
    if state["history"].get("losses") is None and (folder / "losses.csv").is_file():
        curve = np.loadtxt(folder / "losses.csv", delimiter=",", skiprows=1, ndmin=2)
        state["history"].update(loss_steps=curve[:, 0].astype(int).tolist(), losses=curve[:, 1].tolist())
    return config, state
