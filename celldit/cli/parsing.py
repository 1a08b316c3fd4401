"""argparse pieces shared by the subcommands: checked number types and one-line errors."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch

__all__ = ["OneLineParser", "at_least", "device", "finite", "positive", "seed"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def finite(text: str) -> float:
    """A finite float (``nan`` and ``inf`` refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def positive(text: str) -> float:
    """A finite float > 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in 0 .. 2**32 - 1 (numpy's range)."""
    value = at_least(0)(text)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{value}: a seed must be at most 2**32 - 1")
    return value


def at_least(low: int) -> Callable[[str], int]:
    """An integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def device(text: str) -> str:
    """A torch device that exists here: ``cpu``, ``cuda``/``cuda:N`` (with that GPU) or ``mps``."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: only {count} CUDA GPU(s) here (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here (use cpu)")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: celldit runs on cpu, cuda or mps")
    return text
