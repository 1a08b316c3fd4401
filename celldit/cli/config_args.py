"""Command lines generated from settings classes, parsed by jsonargparse.

:func:`config_parser` builds a parser with ``--config FILE.yaml`` and ``--print-config``;
:func:`add_dataclass_options` adds one ``--flag`` per field of a settings dataclass (type,
default, choices and help taken from the class), nested dataclass fields as dotted flags
(``--trainer.accelerator``) and YAML sections (``trainer:``). YAML keys are the field names;
flags are the same names with dashes. A list setting takes several values after its flag
(``--covariate-keys cell_type donor``) or a YAML/JSON list.

Parse errors are one line (``celldit fit: error: ...``) with exit code 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ..options import field_docs

__all__ = ["add_dataclass_options", "add_signature_options", "config_parser", "join_list_values", "section"]


def config_parser(prog: str, description: str) -> ArgumentParser:
    """A jsonargparse parser with ``--config`` and ``--print-config`` that raises instead of exiting."""
    parser = ArgumentParser(prog=prog, description=description, print_config="--print-config", exit_on_error=False,
                            default_env=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML file of settings (the keys printed by --print-config); flags given after it "
                             "override it")
    return parser


def _with_choices(hint: Any, choices: Sequence[Any] | None) -> Any:
    if not choices:
        return hint
    literal = Literal[tuple(choices)]  # type: ignore[valid-type]
    args = typing.get_args(hint)
    return literal | None if type(None) in args else literal


def _is_list(hint: Any) -> bool:
    return any(typing.get_origin(h) in (list, tuple) for h in (hint, *typing.get_args(hint)))


def _is_bool(hint: Any) -> bool:
    return hint is bool or bool in typing.get_args(hint)


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def add_dataclass_options(parser: ArgumentParser, cls: type, *, prefix: str = "", title: str | None = None,
                          skip: Sequence[str] = (), rename: dict[str, str] | None = None,
                          defaults: dict[str, Any] | None = None, lists: set[str] | None = None) -> list[str]:
    """Add a flag per field of the dataclass ``cls``; returns the destinations added.

    Parameters
    ----------
    prefix
        Dotted prefix of nested sections (``"trainer."``).
    title
        Title of the help section (default: the class's first docstring line).
    skip
        Fields left out.
    rename
        ``{field: destination}`` for a field whose name is taken by another class's field.
    defaults
        Defaults overriding the class's (e.g. an image model's preset).
    lists
        Filled with the flags that take several values (see :func:`join_list_values`).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rename, defaults = rename or {}, defaults or {}
    summary = (inspect.getdoc(cls) or cls.__name__).splitlines()[0]
    group = parser.add_argument_group(title or summary)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints.get(f.name, Any)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            added += add_dataclass_options(parser, hint, prefix=f"{prefix}{f.name}.", title=f"{f.name}: {docs.get(f.name, '')}",
                                           lists=lists)
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        dest = prefix + rename.get(f.name, f.name)
        if hint is Any:  # a path or a name on the command line (Python also takes objects)
            hint = str | None
        flag = _flag(prefix, rename.get(f.name, f.name))
        group.add_argument(flag, dest=dest, type=_with_choices(hint, f.metadata.get("choices")), default=default,
                           help=docs.get(f.name, ""))
        if lists is not None and _is_list(hint):
            lists.add(flag)
        if lists is not None and _is_bool(hint):
            lists.add(flag + "?")  # a switch: a bare --flag means true
        added.append(dest)
    return added


def add_signature_options(parser: ArgumentParser, function: Callable, *, title: str, skip: Sequence[str] = (),
                          defaults: dict[str, Any] | None = None) -> list[str]:
    """Add a flag per keyword argument of ``function`` (e.g. a model constructor), with help
    from its numpydoc ``Parameters``; returns the destinations added."""
    import docstring_parser

    doc = docstring_parser.parse(inspect.getdoc(function) or "", style=docstring_parser.DocstringStyle.NUMPYDOC)
    docs = {name.strip(): " ".join((p.description or "").split()) for p in doc.params for name in p.arg_name.split(",")}
    hints = typing.get_type_hints(function)
    group = parser.add_argument_group(title)
    added = []
    for name, param in inspect.signature(function).parameters.items():
        if name in skip or name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = (defaults or {}).get(name, None if param.default is param.empty else param.default)
        hint = hints.get(name, Any)
        group.add_argument(_flag("", name), dest=name, type=hint | None if param.default is param.empty else hint,
                           default=default, help=docs.get(name, ""))
        added.append(name)
    return added


def join_list_values(argv: Sequence[str], list_flags: set[str], positional: str | None = None) -> list[str]:
    """Bring a command line to jsonargparse's one-token-per-flag form.

    ``--flag a b c`` -> ``--flag ["a", "b", "c"]`` for the flags taking several values;
    a bare switch (``--backed``, listed as ``"--backed?"``) -> ``--backed true``; and a
    free token (not a flag's value) -> ``positional TOKEN`` (e.g. ``--data train.h5ad``),
    so that a YAML ``--config`` can set it too.
    """
    import json

    out: list[str] = []
    free: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("-") or token == "-":
            free.append(token)
            continue
        out.append(token)
        if "=" in token or token in ("-h", "--help"):
            continue
        if token + "?" in list_flags:  # a switch
            if i < len(argv) and argv[i].lower() in ("true", "false", "null"):
                out.append(argv[i])
                i += 1
            else:
                out.append("true")
        elif token in list_flags:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out.append(values[0] if len(values) == 1 else json.dumps(values))
        elif i < len(argv) and (token != "--print-config"):
            out.append(argv[i])
            i += 1
    if positional is not None and free:
        if len(free) > 1:
            from jsonargparse import ArgumentError

            raise ArgumentError(None, f"unexpected arguments {free[1:]} (one {positional[2:].upper()} is taken)")
        out = [positional, free[0], *out]
    elif free:
        out.extend(free)
    return out


def section(cfg: Namespace, names: Sequence[str], rename: dict[str, str] | None = None) -> dict[str, Any]:
    """``{field: value}`` of ``names`` in the parsed ``cfg`` (nested sections as dicts);
    ``rename`` maps a field to its destination when they differ."""
    rename = rename or {}
    flat = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg)
    return {name: flat[rename.get(name, name)] for name in names}
