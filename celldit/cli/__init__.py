"""The ``celldit`` command line.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers the subcommand and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code). A new subcommand
is one module and one entry in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name of the module under ``celldit.cli`` for each subcommand, in ``--help`` order
SUBCOMMANDS: dict[str, str] = {
    "demo": "demo",
    "fit": "fit",
    "counterfactual": "counterfactual",
    "generate": "generate",
    "evaluate": "evaluate",
    "bench": "bench",
    "image": "image",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="celldit",
        description="Diffusion Transformers with rectified flow for images and perturbed cells.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(f"celldit.cli.{module_name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``celldit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:  # user errors: no traceback
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"celldit {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
