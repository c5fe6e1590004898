"""Config fields that carry their help text and allowed values, and one check for all of them.

Every config dataclass of the package (engine, rollout, PPO, tasks, SFT, evaluation, the run)
declares its fields with `setting`, so a field's default, help and allowed range sit in one
place: `--help` prints them, and `check_settings` rejects a bad value with one line that names
the field and what it allows, before any work starts. `coerce` and `set_field` turn YAML values
and command-line strings into a field's type.

    page_size: int = setting(16, "tokens per KV page", check=">= 1")
    top_p: float = setting(0.9, "nucleus sampling threshold", check="(0, 1]")
    tree_decode: str = setting("auto", "prefix-shared decode", choices=("auto", "always", "never"))
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field

import yaml

_BOUND = re.compile(r"^(>=|<=|>|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


def setting(default, help: str, *, check: str | None = None, choices: tuple | None = None, **kw):
    """A dataclass field with a help string and, optionally, its allowed values.

    `check` is a bound (``"> 0"``, ``">= 1"``, ``"<= 10"``) or an interval (``"(0, 1]"``,
    ``"[0, 1)"``); for a list field it applies to every item. `choices` lists the allowed values
    of a str field. Mutable defaults go through default_factory.
    """
    if check is not None:
        _parse_check(check)  # a malformed spec fails where it is written
    metadata = {"help": help, "check": check, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _parse_check(spec: str) -> list[tuple[str, float]]:
    """[(operator, bound)] of a check spec."""
    spec = spec.strip()
    m = _BOUND.match(spec)
    if m:
        return [(m.group(1), float(m.group(2)))]
    m = _INTERVAL.match(spec)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        return [(">=" if m.group(1) == "[" else ">", lo), ("<=" if m.group(4) == "]" else "<", hi)]
    raise ValueError(f"bad check spec {spec!r}: expected e.g. '> 0', '>= 1' or '(0, 1]'")


def _words(check: str) -> str:
    """'> 0' as is, '(0, 1]' as 'in (0, 1]'."""
    return check if _BOUND.match(check.strip()) else f"in {check.strip()}"


_OPS = {">": lambda v, b: v > b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b,
        "<=": lambda v, b: v <= b}


def allowed(f: dataclasses.Field) -> str:
    """What a field allows, in words, for help texts (empty when anything goes)."""
    check, choices = f.metadata.get("check"), f.metadata.get("choices")
    if choices:
        return "one of " + ", ".join(map(str, choices))
    return f"must be {_words(check)}" if check else ""


def check_value(name: str, value, f: dataclasses.Field) -> None:
    """ValueError naming `name` unless `value` is allowed by field `f`'s check and choices."""
    check, choices = f.metadata.get("check"), f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if check is None or value is None:
        return
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"{name} must be a number {_words(check)}; got {item!r}")
        if math.isnan(item) or not all(_OPS[op](item, bound) for op, bound in _parse_check(check)):
            raise ValueError(f"{name} must be {_words(check)}; got {item!r}")


def check_settings(obj, prefix: str | None = None) -> None:
    """Checks every `setting` field of dataclass `obj`, nested dataclasses included.

    Errors name a field as ``prefix + name`` (default: the class name and a dot, e.g.
    ``EngineConfig.page_size``; the command line passes ``--section.`` prefixes)."""
    if prefix is None:
        prefix = type(obj).__name__ + "."
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_settings(value, f"{prefix}{f.name}.")
        else:
            check_value(prefix + f.name, value, f)


# ---------------------------------------------------------------------------------------------
# typed values from YAML and the command line

def base_type(tp):
    """(type, optional) for `T` or `T | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def type_name(tp) -> str:
    tp, optional = base_type(tp)
    if typing.get_origin(tp) is list:
        name = f"list[{typing.get_args(tp)[0].__name__}]"
    else:
        name = tp.__name__
    return name + (" | None" if optional else "")


def coerce(value, tp, name: str, source: str):
    """Converts `value` (a YAML value or a command-line string) to the field type `tp`."""
    tp, optional = base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{source}: {name} cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError("expected an integer")
                return int(value)
            return int(str(value).strip().replace("_", ""))
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            return str(value)
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            if isinstance(value, str):
                text = value.strip()
                value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(v.strip() if isinstance(v, str) else v, item, name, source) for v in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: bad value {value!r} for {name} ({type_name(tp)}): {exc}") from None
    raise ValueError(f"{source}: unsupported field type {tp} for {name}")


def set_field(obj, name: str, value, source: str) -> None:
    """Sets field `name` of dataclass `obj` from a YAML value or a command-line string."""
    hints = typing.get_type_hints(type(obj))
    if name not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"{source}: {type(obj).__name__} has no field {name!r}")
    setattr(obj, name, coerce(value, hints[name], name, source))
