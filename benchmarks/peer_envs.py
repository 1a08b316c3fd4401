"""The peers' virtual environments: pinned installs, the runners' environment variables, and
whether a peer's Python imports it (used by ``benchmarks/peers.py``; see ``benchmarks/PEERS.md``).

Each peer runs in its own virtual environment, never in celldit's or in CI: CellFlow on Python
3.11, CPA on Python 3.10 (cpa-tools 0.8 needs torch < 2, and torch 1.13 does not import on
Python 3.11).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_VENV_DIR = Path.home() / ".cache" / "celldit-peers"
CELLFLOW_PINS = ["cellflow-tools==0.0.9", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "ott-jax==0.6.0",
                 "optax==0.2.8", "anndata==0.12.19", "scanpy==1.11.5", "requests"]
# cpa-tools 0.8.1 lists its development tools (jupyter, black, flake8, pytest...) as requirements,
# on which pip's resolver backtracks for a long time: its runtime requirements are installed
# first (pinned to the torch < 2 era), then cpa-tools itself with --no-deps.
CPA_PINS = ["torch==1.13.1", "setuptools<70", "scvi-tools==0.20.3", "pytorch-lightning<2", "rdkit-pypi", "adjustText",
            "seaborn", "numpy<2", "pandas<2", "anndata<0.10", "scanpy<1.10", "jax<0.4.24", "jaxlib<0.4.24", "flax<0.8",
            "chex<0.1.86", "optax<0.1.8", "ml-dtypes<0.3", "scipy<1.12", "pyro-ppl<1.9", "torchmetrics<1.3",
            "orbax-checkpoint<0.5", "requests"]
PYTHONS = {"cellflow": "3.11", "cpa": "3.10"}
DISTRIBUTIONS = {"cellflow": "cellflow-tools", "cpa": "cpa-tools"}
PINS = {"cellflow": CELLFLOW_PINS, "cpa": CPA_PINS}
NO_DEPS = {"cellflow": [], "cpa": ["cpa-tools==0.8.1"]}
ENV = {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}


def runner_env(threads: int) -> dict[str, str]:
    """The runners' environment: ``threads`` for OpenMP / BLAS / torch, and XLA on one thread
    (its Eigen pool) when ``threads`` is 1."""
    env = {**os.environ, **ENV}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


# ---------------------------------------------------------------------------------------------
# Peer environments


def peer_python(args: argparse.Namespace, peer: str) -> str:
    """``--python-PEER`` when given, else ``--venv-dir``/PEER/bin/python."""
    given = getattr(args, f"python_{peer}")
    return str(given) if given else str(Path(args.venv_dir).expanduser() / peer / "bin" / "python")


def check_peer(python: str, peer: str, env: dict[str, str]) -> tuple[bool, str]:
    """Whether ``python`` imports ``peer``: ``(True, version)`` or ``(False, reason)``."""
    if not Path(python).exists():
        return False, f"no Python at {python}"
    code = f"import importlib.metadata, {peer}; print(importlib.metadata.version({DISTRIBUTIONS[peer]!r}))"
    try:
        proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False, f"{python} -c 'import {peer}' did not finish in 600 s"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return False, f"{python} cannot import {peer}: {lines[-1] if lines else f'exit {proc.returncode}'}"
    return True, proc.stdout.strip().splitlines()[-1]


def not_installed(peer: str, python: str, reason: str) -> dict:
    return {"status": "not installed", "python": python, "reason": reason,
            "setup": f"python benchmarks/peers.py --setup --peer {peer} --venv-dir DIR (then --venv-dir DIR), "
                     f"or --python-{peer} PATH to a Python that imports {peer}"}


def setup(venv_dir: Path, peers: list[str], env: dict[str, str], installer: str = "pip") -> dict[str, dict]:
    """Create (or re-create) each peer's virtual environment under ``venv_dir``; return, per
    peer, its Python and whether it imports (a failed install is reported, not raised).
    ``installer``: ``pip`` (the environment's own) or ``uv`` (``uv pip install --python``, whose
    resolver settles CPA's pins in seconds where pip backtracks for long)."""
    out = {}
    for peer in peers:
        folder = venv_dir / peer
        python = os.environ.get(f"PEERS_PYTHON{PYTHONS[peer].replace('.', '')}", f"python{PYTHONS[peer]}")
        pip = ([installer, "pip", "install", "--python", str(folder / "bin" / "python")] if installer != "pip"
               else [str(folder / "bin" / "pip"), "install", "-q"])
        print(f"[peers] setup {peer}: {python} -m venv {folder}; {' '.join(pip)} {' '.join(PINS[peer])}"
              + (f"; {' '.join(pip)} --no-deps {' '.join(NO_DEPS[peer])}" if NO_DEPS[peer] else ""),
              file=sys.stderr, flush=True)
        try:
            subprocess.run([python, "-m", "venv", "--clear", str(folder)], check=True)
            subprocess.run([*pip, *PINS[peer]], check=True)
            if NO_DEPS[peer]:
                subprocess.run([*pip, "--no-deps", *NO_DEPS[peer]], check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            out[peer] = {"python": str(folder / "bin" / "python"), "installed": False, "reason": str(err)}
            continue
        ok, message = check_peer(str(folder / "bin" / "python"), peer, env)
        out[peer] = {"python": str(folder / "bin" / "python"), "installed": ok,
                     ("version" if ok else "reason"): message}
    return out
