"""Typed validation of nested dataclasses from plain dicts (YAML) with one-line errors.

Recipes are data (DESIGN.md principle 4): a YAML mapping is turned into the recipe dataclasses
here. Every problem is reported as one line naming the dotted key, the bad value and what is
allowed, before anything heavy (a model) is loaded.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


from petl.errors import PetlError


class RecipeError(PetlError, ValueError):
    """A recipe (or an override of it) is invalid. The message is one line a user can act on."""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def describe_type(tp: Any) -> str:
    """Human wording of a type annotation, used in error messages."""
    optional, inner = _is_optional(tp)
    if optional:
        return f"{describe_type(inner)} or null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {describe_type(arg)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (e.g. ``"1e-4"`` -> 1e-4).

    Strings are converted where the target type is numeric or boolean because command-line
    overrides arrive as text and YAML 1.1 reads ``1e-4`` as a string.
    """
    optional, inner = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and optional):
        if optional or tp is Any:
            return None
        raise RecipeError(f"recipe key '{key}' must not be null; expected {describe_type(tp)}")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(f"recipe key '{key}' has value {value!r}, which is not allowed; "
                              f"choose one of: {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise RecipeError(f"recipe key '{key}' has value {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"recipe key '{key}' has value {value!r}; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise RecipeError(f"recipe key '{key}' has value {value!r}; expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"recipe key '{key}' has value {value!r}; expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"recipe key '{key}' has value {value!r}; expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"recipe key '{key}' has value {value!r}; expected a string")
    raise TypeError(f"unsupported annotation {tp!r} for recipe key '{key}'")  # programming error


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise RecipeError(f"recipe key {where} is unknown; allowed keys{' in ' + repr(prefix) if prefix else ''}: "
                          f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"recipe section '{prefix or cls.__name__}': {exc}") from None


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a recipe dataclass (for YAML output and the resolved recipe file)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
