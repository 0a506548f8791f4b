"""`--set key=value` overrides of recipe fields, typed by the dataclass they override.

A field whose type takes text (``str``, ``str | None``) keeps the value as written (``--set
instruction_prompt=Answer: briefly`` is not a YAML mapping), except that ``null`` / ``~`` / ``None``
is None where the field allows it. Other values are read as YAML scalars or lists (``5`` -> int,
``true`` -> bool, ``null`` -> None, ``[a, b]`` -> list) and validated against the field's type
with pydantic (strict: ``1`` is not a bool, ``true`` not an integer); a value YAML leaves as text is
then parsed as that type from text, so a float field also takes ``1e-4`` (a string to YAML 1.1). A
list field also takes a single value (a one-element list) or nothing (an empty list). Range checks
stay with the dataclass itself (`TrainerConfig.__post_init__`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

__all__ = ["OverrideError", "parse_overrides"]

_NULLS = ("null", "~", "None", "none")
#: How an error names a field's type.
_KINDS = {bool: "a bool (true or false)", int: "an integer", float: "a number", str: "text"}


class OverrideError(ValueError):
    """A ``key=value`` override names no field or carries a value of the wrong type."""


@lru_cache(maxsize=None)
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def _accepts(adapter: TypeAdapter, value: Any) -> bool:
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def _describe(key: str, tp: Any) -> str:
    """The field's type in words, e.g. "an integer or null", "a list of strings, e.g. k=[a,b]"."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        named = [_describe(key, a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        what = "strings" if item is str else f"{getattr(item, '__name__', item)} values"
        return f"a list of {what}, e.g. {key}=[a,b]"
    return _KINDS.get(tp, f"of type {getattr(tp, '__name__', tp)}")


def _convert(key: str, raw: str, tp: Any) -> Any:
    adapter = _adapter(tp)
    if raw.strip() in _NULLS and _accepts(adapter, None):
        return None
    if _accepts(adapter, raw):  # a text field: the value as written
        return raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise OverrideError(f"--set {key}={raw}: not a valid value ({exc.__class__.__name__})") from exc
    read = value
    if typing.get_origin(tp) is list and not isinstance(value, list):
        value = [] if value is None else [value]
    try:
        return adapter.validate_python(value, strict=True)
    except ValidationError as exc:
        error = exc
    if isinstance(value, str):
        try:
            return adapter.validate_strings(value, strict=True)
        except ValidationError as exc:
            error = exc
    reason = error.errors()[0]["msg"]
    raise OverrideError(f"--set {key}={raw}: {key} is {_describe(key, tp)}; got {read!r} ({reason})") from None


def parse_overrides(items: Sequence[str], cls: type) -> dict[str, Any]:
    """``["max_steps=5", "use_lora=true"]`` -> ``{"max_steps": 5, "use_lora": True}`` for the
    fields of dataclass ``cls``. A later item for the same key wins. Raises `OverrideError`
    naming the item for a missing ``=``, an unknown field or a value of the wrong type."""
    # the real types, not the strings that postponed annotations leave in ``Field.type``
    hints = typing.get_type_hints(cls)
    annotations = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OverrideError(f"--set {item!r}: expected key=value, e.g. --set max_steps=100")
        if key not in annotations:
            raise OverrideError(f"--set {item!r}: {cls.__name__} has no field {key!r} "
                                f"(fields: {', '.join(sorted(annotations))})")
        out[key] = _convert(key, raw, annotations[key])
    return out
