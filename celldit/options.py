"""Typed settings: dataclass fields with their valid range, checked in one place.

Every configuration dataclass of celldit (:class:`~celldit.cells.config.CellDiTConfig`,
:class:`~celldit.train.config.FitConfig`, :class:`~celldit.train.config.TrainerConfig`, the
flow and sampler settings) declares its fields with :func:`option`, which records the
valid range or choices next to the default, and calls :func:`check_options` in
``__post_init__``. A value of the wrong type, outside its range, NaN or infinite raises a
``ValueError`` naming the setting (``hidden_size=0: must be >= 1``), whether it came from
Python, a YAML file or the command line.

The help text of each field is the numpydoc ``Attributes`` section of its class, read by
:func:`field_docs` (the command line shows it).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["check_options", "field_docs", "from_mapping", "option", "to_dict"]


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its valid range: ``ge``/``gt``/``le``/``lt`` bounds for numbers
    (NaN and infinities are always refused) or a tuple of ``choices``."""
    meta = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}.items() if v is not None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the simple types celldit uses)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            return False
        k_hint, v_hint = typing.get_args(hint) or (Any, Any)
        return all(_type_ok(k, k_hint) and _type_ok(v, v_hint) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # anything fancier is the class's own business


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None").replace("<class '", "").replace("'>", "")


def check_options(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its type and range.

    Raises
    ------
    ValueError
        ``"<Class>: name=value: <what is wrong>"`` for the first bad field.
    """
    hints = typing.get_type_hints(type(obj))
    cls = type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue  # a nested section checks itself
        hint = hints.get(f.name, Any)
        if not _type_ok(value, hint):
            raise ValueError(f"{cls}: {f.name}={value!r} has the wrong type (expected {_type_name(hint)})")
        meta = f.metadata
        if "choices" in meta and value is not None and value not in meta["choices"]:
            raise ValueError(f"{cls}: {f.name}={value!r}: choose one of {list(meta['choices'])}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{cls}: {f.name}={value!r}: must be a finite number")
            for key, test, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                    ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
                if key in meta and not test(value, meta[key]):
                    raise ValueError(f"{cls}: {f.name}={value!r}: must be {word} {meta[key]}")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the numpydoc ``Attributes`` sections of ``cls`` and its
    bases (a subclass documents only what it adds or changes)."""
    import docstring_parser

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = docstring_parser.parse(klass.__doc__ or "", style=docstring_parser.DocstringStyle.NUMPYDOC)
        for p in doc.params:  # numpydoc "Attributes" entries come back as params
            for name in p.arg_name.split(","):
                out[name.strip()] = " ".join((p.description or "").split())
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass; tuples become lists."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def from_mapping(cls: type, data: Mapping[str, Any] | Any | None, what: str | None = None) -> Any:
    """An instance of the dataclass ``cls`` from a mapping (nested sections too), an
    instance (returned as is) or None (the defaults). Unknown keys raise a ``ValueError``
    naming them and the known ones."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{what or cls.__name__}: expected a mapping of settings, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{what or cls.__name__}: unknown setting(s) {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = from_mapping(hint, value, f"{what or cls.__name__}.{key}")
        kwargs[key] = value
    return cls(**kwargs)
