"""One type check for vitlab's config dataclasses (``TrainConfig``, ``ViTConfig``): every field's value against
its annotation, read from the class itself, so a ``Literal`` of choices is written once, where the field is.

Values from YAML, JSON or the command line come as lists and ints where the annotation says tuple and float; the
check converts those (and only those) in place, so that a config equals the one built in Python.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: configs are built often)."""
    return typing.get_type_hints(cls)


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (Literal, Union/Optional, tuple (fixed or ``...``), list,
    dict, bool, int, float (an int is accepted), str, or a class)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if origin is list:
        return isinstance(value, list) and all(matches(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    """An annotation as a user reads it: ``'token' | 'gap'``, ``int | null``, ``list of int``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {describe(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {describe(args[0])}"
        return f"[{', '.join(describe(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _tuples(value: Any, tp: Any) -> Any:
    """Lists (from YAML/JSON) as tuples where the annotation, or one of its Union members, is a tuple."""
    if not isinstance(value, list):
        return value
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if any(typing.get_origin(o) is tuple for o in options) and not any(typing.get_origin(o) is list for o in options):
        return tuple(value)
    return value


def check_types(config: Any) -> None:
    """Raise a ``ValueError`` naming every field of the dataclass ``config`` whose value does not match its
    annotation; lists become tuples and ints floats where the annotation asks (frozen dataclasses too)."""
    annotations = hints(type(config))
    errors = []
    for f in dataclasses.fields(config):
        tp = annotations[f.name]
        value = getattr(config, f.name)
        fixed = _tuples(value, tp)
        if not matches(fixed, tp):
            errors.append(f"{f.name}={value!r} (expected {describe(tp)})")
            continue
        if tp is float and isinstance(fixed, int):
            fixed = float(fixed)
        if fixed is not value:
            object.__setattr__(config, f.name, fixed)
    if errors:
        raise ValueError(f"invalid {type(config).__name__}: " + "; ".join(errors))
