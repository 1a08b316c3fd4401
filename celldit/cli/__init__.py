"""The ``celldit`` command line.

Each subcommand lives in its own module of this package. Most expose
``add_parser(subparsers)`` (an argparse subparser whose ``func`` takes the parsed
``argparse.Namespace`` and returns an exit code). The training commands, whose options are
generated from settings classes, expose ``build_parser()`` (jsonargparse, with ``--config``
and ``--print-config``) and ``run(cfg, parser)``; they are listed in :data:`CONFIG_COMMANDS`.
A new subcommand is one module and one entry in :data:`SUBCOMMANDS`.

User errors (a missing file, a bad value, a key not in ``obs``) end in one line on stderr
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse  # noqa: F401 - the parsers are argparse's
import importlib
import sys
import warnings
from pathlib import Path

# name of the module under ``celldit.cli`` for each subcommand, in ``--help`` order
SUBCOMMANDS: dict[str, str] = {
    "demo": "demo",
    "fit": "fit",
    "counterfactual": "counterfactual",
    "generate": "generate",
    "evaluate": "evaluate",
    "simulate": "simulate",
    "bench": "bench",
    "image": "image",
}
#: commands parsed by jsonargparse from settings classes: argv prefix -> (module, one-line help)
CONFIG_COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("fit",): ("fit", "train a CellDiT on an AnnData and save the model folder"),
    ("image", "train"): ("image_train", "train a class-conditional ImageDiT with rectified flow"),
}
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, IsADirectoryError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..train.callbacks import NonFiniteLossError  # a diverged run: the settings (lr) are to fix

    return (*USER_ERRORS, NonFiniteLossError)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every registered subcommand."""
    from .parsing import OneLineParser

    parser = OneLineParser(
        prog="celldit",
        description="Diffusion Transformers with rectified flow for images and perturbed cells.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name, module_name in SUBCOMMANDS.items():
        if (name,) in CONFIG_COMMANDS:  # listed here, parsed by its own parser
            sub.add_parser(name, help=CONFIG_COMMANDS[(name,)][1], add_help=False)
            continue
        importlib.import_module(f"celldit.cli.{module_name}").add_parser(sub)
    return parser


def _error(command: str, err: BaseException) -> int:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = " ".join(str(msg).split())  # one line
    print(f"celldit {command}: error: {text}", file=sys.stderr)
    return 2


def _run_config_command(prefix: tuple[str, ...], argv: list[str]) -> int:
    from jsonargparse import ArgumentError

    from .config_args import join_list_values

    module = importlib.import_module(f"celldit.cli.{CONFIG_COMMANDS[prefix][0]}")
    command = " ".join(prefix)
    parser = module.build_parser()
    try:
        argv = join_list_values(argv, getattr(parser, "list_flags", set()), getattr(parser, "positional", None))
        cfg = parser.parse_args(argv)
    except ArgumentError as err:
        return _error(command, err)
    except SystemExit as stop:  # --help, --print-config (code 0) and usage errors already printed
        return int(stop.code or 0)
    try:
        return int(module.run(cfg, parser) or 0)
    except _user_errors() as err:
        return _error(command, err)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``celldit`` console script: returns the exit code (0 ok, 2 a usage
    or input error printed as one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for prefix in CONFIG_COMMANDS:
        if tuple(argv[: len(prefix)]) == prefix:
            return _run_config_command(prefix, argv[len(prefix):])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # usage errors (printed, code 2) and --help (code 0) return their code
        return int(stop.code or 0)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as err:
        return _error(args.command, err)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    parts = Path(str(filename)).parts
    origin = parts[parts.index("site-packages") + 1] if "site-packages" in parts else "celldit"
    print(f"{origin}: {category.__name__}: {' '.join(str(message).split())}", file=file or sys.stderr)


def console_main() -> int:
    """The ``celldit`` console script: :func:`main` with warnings shown as one line each
    (where they come from, the kind and the message; no source line)."""
    warnings.showwarning = _one_line_warning
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
