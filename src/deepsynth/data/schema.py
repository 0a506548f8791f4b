"""The instruction-data record and its on-disk formats (JSONL, JSON, Parquet).

Every reader reports the exact place of a bad record (file and 1-based line or row) and never
skips a record silently; every writer validates before it writes and writes atomically
(:mod:`deepsynth.atomic`). A record without an ``id`` gets one derived from its content
(:func:`content_id`), the same on every read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from deepsynth.atomic import write_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "DataValidationError",
    "InstructionExample",
    "REQUIRED_FIELDS",
    "content_id",
    "OPTIONAL_FIELDS",
    "write_jsonl",
    "iter_jsonl",
    "parse_json",
    "read_text_file",
    "read_parquet_table",
    "read_jsonl",
    "write_json",
    "read_json",
    "write_parquet",
    "read_parquet",
    "write_examples",
    "read_examples",
    "check_unique_ids",
]

REQUIRED_FIELDS: tuple[str, ...] = ("id", "text", "instruction", "answer")
OPTIONAL_FIELDS: tuple[str, ...] = ("source", "meta")
_STR_FIELDS: tuple[str, ...] = ("id", "text", "instruction", "answer", "source")

DEFAULT_MAX_TEXT_CHARS = 200_000
DEFAULT_MAX_INSTRUCTION_CHARS = 4_000
DEFAULT_MAX_ANSWER_CHARS = 20_000


class DataValidationError(ValueError):
    """A record or a file does not satisfy the instruction-data schema.

    The message always names the record (id or file position), the field and, where one
    applies, the limit. ``record_id`` and ``field`` are kept as attributes too.
    """

    def __init__(self, message: str, *, record_id: str | None = None, field: str | None = None):
        super().__init__(message)
        self.record_id = record_id
        self.field = field


AUTO_ID_PREFIX = "auto-"


def content_id(record: dict) -> str:
    """The id of a record that has none: a hash of its content (text, instruction, answer,
    source, meta, with their defaults), so the same record gets the same id on every read and in
    every format, and different records get different ids."""
    meta = record.get("meta")
    payload = {
        "text": record.get("text"),
        "instruction": record.get("instruction"),
        "answer": record.get("answer"),
        "source": "unknown" if record.get("source") is None else record.get("source"),
        "meta": {} if meta is None else meta,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return AUTO_ID_PREFIX + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


@dataclass
class InstructionExample:
    """One training/eval record: a document, an instruction about it, and the answer."""

    id: str
    text: str  # the document text (rendered into pages)
    instruction: str  # question or instruction; "" -> the trainer uses a default instruction
    answer: str
    source: str = "unknown"
    meta: dict = field(default_factory=dict)

    def validate(
        self,
        *,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        max_instruction_chars: int = DEFAULT_MAX_INSTRUCTION_CHARS,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        allow_empty_instruction: bool = True,
    ) -> None:
        """Raise :class:`DataValidationError` naming the record id, the field and the limit."""
        rid = self.id if isinstance(self.id, str) else repr(self.id)
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataValidationError(
                    f"record {rid!r}: field {name!r} must be str, got {type(value).__name__}",
                    record_id=rid,
                    field=name,
                )
        if not isinstance(self.meta, dict):
            raise DataValidationError(
                f"record {rid!r}: field 'meta' must be dict, got {type(self.meta).__name__}",
                record_id=rid,
                field="meta",
            )
        for name in ("id", "text", "answer"):
            if not getattr(self, name).strip():
                raise DataValidationError(
                    f"record {rid!r}: field {name!r} is empty (it must contain at least one "
                    "non-whitespace character)",
                    record_id=rid,
                    field=name,
                )
        if not allow_empty_instruction and not self.instruction.strip():
            raise DataValidationError(
                f"record {rid!r}: field 'instruction' is empty and allow_empty_instruction=False",
                record_id=rid,
                field="instruction",
            )
        for name, limit, limit_name in (
            ("text", max_text_chars, "max_text_chars"),
            ("instruction", max_instruction_chars, "max_instruction_chars"),
            ("answer", max_answer_chars, "max_answer_chars"),
        ):
            n = len(getattr(self, name))
            if n > limit:
                raise DataValidationError(
                    f"record {rid!r}: field {name!r} has {n} characters, more than the limit "
                    f"{limit_name}={limit}",
                    record_id=rid,
                    field=name,
                )
        try:
            json.dumps(self.meta, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise DataValidationError(
                f"record {rid!r}: field 'meta' is not JSON-serialisable ({exc})",
                record_id=rid,
                field="meta",
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "instruction": self.instruction,
            "answer": self.answer,
            "source": self.source,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "") -> "InstructionExample":
        """Build a record from a mapping; errors name missing/unknown fields, wrong types and
        ``where`` (e.g. ``"train.jsonl line 7"``). A record without an ``id`` (absent or null)
        gets :func:`content_id`."""
        p = _prefix(where)
        if not isinstance(d, dict):
            raise DataValidationError(f"{p}expected a JSON object (dict), got {type(d).__name__}")
        if d.get("id") is None:
            d = {**d, "id": content_id(d)}
        rid = d.get("id")
        rid_s = rid if isinstance(rid, str) else None
        known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
        missing = [k for k in REQUIRED_FIELDS if k not in d]
        if missing:
            raise DataValidationError(
                f"{p}record {rid!r}: missing required field(s) {missing} "
                f"(required: {list(REQUIRED_FIELDS)})",
                record_id=rid_s,
                field=missing[0],
            )
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise DataValidationError(
                f"{p}record {rid!r}: unknown field(s) {unknown} (allowed: "
                f"{list(REQUIRED_FIELDS) + list(OPTIONAL_FIELDS)}; put extra data in 'meta')",
                record_id=rid_s,
                field=unknown[0],
            )
        values = {k: d[k] for k in REQUIRED_FIELDS}
        values["source"] = d.get("source", "unknown")
        meta = d.get("meta", {})
        values["meta"] = {} if meta is None else meta
        for name in _STR_FIELDS:
            if not isinstance(values[name], str):
                raise DataValidationError(
                    f"{p}record {rid!r}: field {name!r} must be str, got "
                    f"{type(values[name]).__name__}",
                    record_id=rid_s,
                    field=name,
                )
        if not isinstance(values["meta"], dict):
            raise DataValidationError(
                f"{p}record {rid!r}: field 'meta' must be an object (dict), got "
                f"{type(values['meta']).__name__}",
                record_id=rid_s,
                field="meta",
            )
        return cls(**values)


# --------------------------------------------------------------------------------------------
# helpers


def check_unique_ids(examples: Iterable[InstructionExample], *, where: str = "") -> None:
    """Raise :class:`DataValidationError` naming the first duplicate id."""
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataValidationError(
                f"{_prefix(where)}duplicate id {ex.id!r}: ids must be unique within a file",
                record_id=ex.id,
                field="id",
            )
        seen.add(ex.id)


def _prepare_for_write(examples: Iterable[InstructionExample], path: Path) -> list[InstructionExample]:
    items = list(examples)
    for i, ex in enumerate(items):
        if not isinstance(ex, InstructionExample):
            raise DataValidationError(
                f"{path}: item {i} is a {type(ex).__name__}, expected InstructionExample"
            )
        ex.validate()
    check_unique_ids(items, where=str(path))
    return items


def _finish_read(
    items: list[tuple[str, InstructionExample]], path: Path, validate: bool
) -> list[InstructionExample]:
    if validate:
        first_at: dict[str, str] = {}
        for where, ex in items:
            try:
                ex.validate()
            except DataValidationError as exc:
                raise DataValidationError(
                    f"{where}: {exc}", record_id=exc.record_id, field=exc.field
                ) from exc
            if ex.id in first_at:
                raise DataValidationError(
                    f"{where}: duplicate id {ex.id!r} (first seen at {first_at[ex.id]})",
                    record_id=ex.id,
                    field="id",
                )
            first_at[ex.id] = where
    logger.debug("read %d examples from %s", len(items), path)
    return [ex for _, ex in items]


# --------------------------------------------------------------------------------------------
# JSONL / JSON


def write_jsonl(examples: Iterable[InstructionExample], path: str | os.PathLike) -> None:
    """Write one JSON object per line (UTF-8). Validates every record; ids must be unique."""
    path = Path(path)
    items = _prepare_for_write(examples, path)

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for ex in items:
                f.write(json.dumps(ex.to_dict(), ensure_ascii=False))
                f.write("\n")

    write_atomic(path, _write)


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure is a :class:`DataValidationError` naming ``where``.

    Besides syntax errors this covers values Python refuses to build: nesting deeper than the
    interpreter's recursion limit and integers longer than its digit limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno} column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
        raise DataValidationError(f"{where}: invalid JSON ({exc.msg} at {at})") from None
    except RecursionError:
        raise DataValidationError(f"{where}: JSON nested too deeply to read (more than about "
                                  f"{sys.getrecursionlimit()} levels of arrays/objects)") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        raise DataValidationError(f"{where}: JSON value cannot be read ({exc})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` per non-blank line of a JSONL file, where ``where`` is
    ``"{path} line {n}"`` and ``record`` is the parsed JSON value, or a
    :class:`DataValidationError` for a line that cannot be read (not UTF-8, not JSON, nested too
    deeply), so callers choose to stop or go on."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, DataValidationError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, parse_json(line, where)
            except DataValidationError as exc:
                yield where, exc


def read_text_file(path: str | os.PathLike) -> str:
    """A whole UTF-8 file; bad bytes raise :class:`DataValidationError` naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataValidationError(f"{path} line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_jsonl(path: str | os.PathLike, validate: bool = True) -> list[InstructionExample]:
    """Read a JSONL file. A bad line raises :class:`DataValidationError` naming the file and
    the 1-based line number; blank lines are skipped."""
    path = Path(path)
    items: list[tuple[str, InstructionExample]] = []
    for where, obj in iter_jsonl(path):
        if isinstance(obj, DataValidationError):
            raise obj
        items.append((where, InstructionExample.from_dict(obj, where=where)))
    return _finish_read(items, path, validate)


def write_json(examples: Iterable[InstructionExample], path: str | os.PathLike) -> None:
    """Write a JSON array of records."""
    path = Path(path)
    items = _prepare_for_write(examples, path)

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump([ex.to_dict() for ex in items], f, ensure_ascii=False, indent=1)
            f.write("\n")

    write_atomic(path, _write)


def read_json(path: str | os.PathLike, validate: bool = True) -> list[InstructionExample]:
    """Read a ``.json`` file: a JSON array of records (errors name the 1-based record number),
    or, if it does not start with ``[``, JSON Lines."""
    path = Path(path)
    content = read_text_file(path)
    if not content.lstrip().startswith("["):
        return read_jsonl(path, validate=validate)
    data = parse_json(content, str(path))
    if not isinstance(data, list):
        raise DataValidationError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    items = []
    for i, obj in enumerate(data, start=1):
        where = f"{path} record {i}"
        items.append((where, InstructionExample.from_dict(obj, where=where)))
    return _finish_read(items, path, validate)


# --------------------------------------------------------------------------------------------
# Parquet


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in REQUIRED_FIELDS + OPTIONAL_FIELDS])


def read_parquet_table(path: str | os.PathLike, columns: list[str] | None = None):
    """``pyarrow.parquet.read_table`` whose failures (not Parquet, a damaged footer or page)
    raise :class:`DataValidationError` naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise DataValidationError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                                  f"{str(exc).strip()})") from None


def write_parquet(examples: Iterable[InstructionExample], path: str | os.PathLike) -> None:
    """Write a Parquet file with string columns; ``meta`` is stored as a JSON string."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    items = _prepare_for_write(examples, path)
    columns: dict[str, list[str]] = {name: [] for name in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    for ex in items:
        d = ex.to_dict()
        for name in _STR_FIELDS:
            columns[name].append(d[name])
        columns["meta"].append(json.dumps(d["meta"], ensure_ascii=False))
    table = pa.table(columns, schema=_parquet_schema())
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet(path: str | os.PathLike, validate: bool = True) -> list[InstructionExample]:
    """Read a Parquet file written by :func:`write_parquet` (or any file with the same
    columns; ``source`` and ``meta`` are optional). Errors name the file and 1-based row."""
    path = Path(path)
    table = read_parquet_table(path)
    names = set(table.column_names)
    missing = [c for c in REQUIRED_FIELDS if c not in names and c != "id"]  # no id column: content ids
    if missing:
        raise DataValidationError(
            f"{path}: missing required column(s) {missing} (found: {table.column_names})",
            field=missing[0],
        )
    unknown = sorted(c for c in names if c not in set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS))
    if unknown:
        raise DataValidationError(
            f"{path}: unknown column(s) {unknown} (allowed: "
            f"{list(REQUIRED_FIELDS) + list(OPTIONAL_FIELDS)})",
            field=unknown[0],
        )
    rows = table.to_pylist()
    items = []
    for i, row in enumerate(rows, start=1):
        where = f"{path} row {i}"
        for name in (n for n in REQUIRED_FIELDS if n != "id"):  # a null id gets a content id
            if row.get(name) is None:
                raise DataValidationError(
                    f"{where}: field {name!r} is null", record_id=row.get("id"), field=name
                )
        if row.get("source") is None:
            row.pop("source", None)
        meta = row.get("meta")
        if meta is None:
            row.pop("meta", None)
        elif isinstance(meta, str):
            try:
                row["meta"] = parse_json(meta, f"{where}: field 'meta'") if meta.strip() else {}
            except DataValidationError as exc:
                raise DataValidationError(str(exc), record_id=row.get("id"), field="meta") from None
        items.append((where, InstructionExample.from_dict(row, where=where)))
    return _finish_read(items, path, validate)


# --------------------------------------------------------------------------------------------
# dispatch on suffix

_READERS = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}
_WRITERS = {".jsonl": write_jsonl, ".json": write_json, ".parquet": write_parquet}


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DataValidationError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"use one of {sorted(_READERS)}"
        )
    return suffix


def read_examples(path: str | os.PathLike, validate: bool = True) -> list[InstructionExample]:
    """Read ``.jsonl``, ``.json`` or ``.parquet`` (chosen by suffix)."""
    path = Path(path)
    return _READERS[_suffix(path)](path, validate=validate)


def write_examples(examples: Iterable[InstructionExample], path: str | os.PathLike) -> None:
    """Write ``.jsonl``, ``.json`` or ``.parquet`` (chosen by suffix)."""
    path = Path(path)
    _WRITERS[_suffix(path)](examples, path)
