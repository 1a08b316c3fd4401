"""How a benchmark script hands back its result: one JSON object on stdout and, with ``--out``,
the same text in a file written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import write_text_atomic

__all__ = ["emit_report"]


def emit_report(result: dict[str, Any], out: str | Path | None = None, *, indent: int = 2, default: Any = None,
                echo: bool = True) -> str:
    """``json.dumps(result)`` printed (unless ``echo`` is false) and written to ``out`` (when
    given); returns the text."""
    text = json.dumps(result, indent=indent, default=default)
    if echo:
        print(text)
    if out is not None:
        write_text_atomic(text + "\n", out)
    return text
