"""`--set key=value` overrides of recipe fields, typed by the dataclass they override.

Values are read as YAML scalars (``5`` -> int, ``true`` -> bool, ``null`` -> None), then checked
against the field's annotation: a string field keeps the text as written (``--set
instruction_prompt=Answer: briefly`` is not a YAML mapping), and a float field also takes
``1e-4``, which YAML 1.1 reads as a string. Range checks stay with the dataclass itself
(`TrainerConfig.__post_init__`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import yaml

__all__ = ["OverrideError", "parse_overrides"]

_NULLS = ("null", "~", "None", "none")


class OverrideError(ValueError):
    """A ``key=value`` override names no field or carries a value of the wrong type."""


def _convert(key: str, raw: str, annotation: str) -> Any:
    if not isinstance(annotation, str):  # annotations not postponed: a type object
        annotation = getattr(annotation, "__name__", None) or str(annotation)
    kinds = [part.strip() for part in annotation.split("|")]
    optional = "None" in kinds
    base = next((k for k in kinds if k != "None"), "str")
    if optional and raw.strip() in _NULLS:
        return None
    if base == "str":
        return raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise OverrideError(f"--set {key}={raw}: not a valid value ({exc.__class__.__name__})") from exc
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise OverrideError(f"--set {key}={raw}: {key} is a bool; use true or false")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OverrideError(f"--set {key}={raw}: {key} is an integer{' or null' if optional else ''}")
    if base == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise OverrideError(f"--set {key}={raw}: {key} is a number{' or null' if optional else ''}")
    if base.startswith("list"):
        if isinstance(value, str):
            return [value]
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise OverrideError(f"--set {key}={raw}: {key} is a list of strings, e.g. {key}=[a,b]")
    return value


def parse_overrides(items: Sequence[str], cls: type) -> dict[str, Any]:
    """``["max_steps=5", "use_lora=true"]`` -> ``{"max_steps": 5, "use_lora": True}`` for the
    fields of dataclass ``cls``. A later item for the same key wins. Raises `OverrideError`
    naming the item for a missing ``=``, an unknown field or a value of the wrong type."""
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
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
