"""``validate_path``: check every record of a prepared folder or an examples file and describe
the data (errors naming file and row, duplicate ids, length and page histograms); ``format_report``
writes that report as text."""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from deepsynth import storage
from deepsynth.data.prepared_folder import DATA_DIR, MANIFEST, REJECTED, SKIPPED, PrepareError, read_own_manifest, shard_files
from deepsynth.data.schema import DataValidationError, InstructionExample, parse_json
from deepsynth.data.sources import iter_rows

logger = logging.getLogger(__name__)

_EXTRA_COLUMNS = ("num_pages", "Image")

TEXT_BINS = (0, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
ANSWER_BINS = (0, 10, 20, 50, 100, 200, 500, 1_000, 5_000)
PAGE_BINS = (1, 2, 3, 4, 5, 9, 17, 33, 65)


def _histogram(values: Sequence[int], edges: Sequence[int]) -> list[dict]:
    counts = [0] * len(edges)
    for v in values:
        k = 0
        for j, e in enumerate(edges):
            if v >= e:
                k = j
        counts[k] += 1
    out = []
    for j, e in enumerate(edges):
        hi = edges[j + 1] - 1 if j + 1 < len(edges) else None
        label = f"{e}+" if hi is None else (f"{e}" if hi == e else f"{e}-{hi}")
        out.append({"bin": label, "count": counts[j]})
    return out


def _summary(values: Sequence[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "mean": None, "max": None}
    return {"min": min(values), "median": statistics.median(values),
            "mean": round(statistics.fmean(values), 2), "max": max(values)}


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrepareError(f"{path}: no such file or folder")
    data = path / DATA_DIR
    manifest = None
    if (path / MANIFEST).is_file() and data.is_dir():
        try:
            manifest = read_own_manifest(path)
        except PrepareError:  # another tool's folder: check the files it holds
            manifest = None
    if manifest is not None and manifest.get("complete"):
        files = shard_files(path, manifest)
    elif manifest is not None:
        logger.warning("%s: `deepsynth prepare` has not finished writing this folder; checking the shards "
                       "written so far", path)
        files = [path / f for f in manifest.get("files", []) if f.endswith(".parquet") and (path / f).is_file()]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json")
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and p.name not in (MANIFEST, REJECTED, SKIPPED))
    if not files:
        raise PrepareError(f"{path}: no .parquet/.jsonl/.json files to validate")
    return files


def validate_path(path: str | os.PathLike, *, preset: str = "base", count_pages: bool = True,
                  max_error_samples: int = 20, progress: bool = False) -> dict:
    """Check every record of a prepared folder or an examples file and describe the data.

    Returns a JSON-able report: ``ok``, ``records``, ``errors`` (count, by field, samples naming
    file and row), ``empty_ids``, ``duplicate_ids``, length and pages-per-document histograms and,
    for records marked extractive, the share whose answer occurs verbatim in the text. Page counts
    come from a rendered ``num_pages``/``Image`` column, else from laying the text out with
    ``preset`` (no drawing; the layout stops at page ``max_pages + 1``, so a text over the limit
    counts as ``max_pages + 1`` pages and in ``over_max_pages``); ``count_pages=False`` skips that."""
    from deepsynth.render import RenderConfig

    path = storage.local_input(path, what="file or folder")
    files = _files_of(path)
    cfg = RenderConfig.from_preset(preset) if count_pages else None
    tally = _Tally(page_source="rendered" if count_pages else None)
    for file in files:
        for where, row, n_pages in tqdm(iter_rows(file), desc=f"validate {file.name}", unit="rec",
                                        disable=not progress):
            tally.records += 1
            ex = _example_of(where, row, tally, max_error_samples)
            if ex is not None:
                _measure(ex, n_pages, tally, cfg, preset)
    return _report(path, files, tally, count_pages, max_error_samples)


@dataclass
class _Tally:
    """What `validate_path` has counted so far."""

    page_source: str | None  # where page counts come from (rendered, or the layout of a preset)
    records: int = 0  # records read, readable or not
    errors: list[dict] = field(default_factory=list)  # one per invalid record: where, id, field, message
    error_fields: Counter = field(default_factory=Counter)  # those errors by field
    empty_ids: int = 0  # valid records whose id is blank
    first_at: dict[str, str] = field(default_factory=dict)  # where each id was first seen
    duplicates: list[dict] = field(default_factory=list)  # the first repeated ids, with both places
    n_duplicates: int = 0  # records whose id was seen before
    text_len: list[int] = field(default_factory=list)  # characters of each valid record's text
    answer_len: list[int] = field(default_factory=list)  # ... of its answer
    instr_len: list[int] = field(default_factory=list)  # ... of its instruction
    pages: list[int] = field(default_factory=list)  # pages of each valid record with text
    pages_cache: dict[str, int] = field(default_factory=dict)  # pages by text hash: a repeated text is laid out once
    over_max: int = 0  # records needing more pages than the preset's max_pages
    sources: Counter = field(default_factory=Counter)  # valid records by source
    extractive: int = 0  # valid records marked extractive
    found: int = 0  # ... whose answer (every span) occurs verbatim in the text


def _example_of(where: str, row: Any, tally: _Tally, max_error_samples: int) -> InstructionExample | None:
    """The record as a valid example, or None after counting why it is not one (a repeated or empty
    id is counted but still returns the example: it is an error of the data set, not of the record)."""
    if isinstance(row, Exception):
        tally.errors.append({"where": where, "id": None, "field": None, "message": str(row)})
        tally.error_fields["(unreadable)"] += 1
        return None
    if isinstance(row, dict):
        row = {k: v for k, v in row.items() if k not in _EXTRA_COLUMNS}
        if isinstance(row.get("meta"), str):
            try:
                row["meta"] = parse_json(row["meta"], f"{where}: field 'meta'") if row["meta"].strip() else {}
            except DataValidationError as exc:
                tally.errors.append({"where": where, "id": row.get("id"), "field": "meta", "message": str(exc)})
                tally.error_fields["meta"] += 1
                return None
        for k in ("source", "meta"):
            if k in row and row[k] is None:
                row.pop(k)
    try:
        ex = InstructionExample.from_dict(row, where=where)
    except DataValidationError as exc:
        tally.errors.append({"where": where, "id": exc.record_id, "field": exc.field, "message": str(exc)})
        tally.error_fields[exc.field or "(record)"] += 1
        return None
    if not ex.id.strip():
        tally.empty_ids += 1
    elif ex.id in tally.first_at:
        tally.n_duplicates += 1
        if len(tally.duplicates) < max_error_samples:
            tally.duplicates.append({"id": ex.id, "where": where, "first": tally.first_at[ex.id]})
    else:
        tally.first_at[ex.id] = where
    try:
        ex.validate()
    except DataValidationError as exc:  # counted as an error, left out of the statistics
        tally.errors.append({"where": where, "id": exc.record_id, "field": exc.field, "message": f"{where}: {exc}"})
        tally.error_fields[exc.field or "(record)"] += 1
        return None
    return ex


def _measure(ex: InstructionExample, n_pages: int | None, tally: _Tally, cfg: Any, preset: str) -> None:
    """Add a valid example to the statistics; its pages from ``n_pages`` (a rendered column) or, when
    ``cfg`` is set, from laying its text out."""
    tally.sources[ex.source] += 1
    tally.text_len.append(len(ex.text))
    tally.answer_len.append(len(ex.answer))
    tally.instr_len.append(len(ex.instruction))
    if ex.meta.get("extractive"):
        tally.extractive += 1
        spans = ex.meta.get("answer_spans") or [ex.answer]
        if all(isinstance(s, str) and s in ex.text for s in spans):
            tally.found += 1
    if cfg is None:
        return
    if n_pages is not None:
        tally.pages.append(int(n_pages))
    elif ex.text.strip():
        from deepsynth.render.renderer import layout

        key = hashlib.sha1(ex.text.encode("utf-8")).hexdigest()
        if key not in tally.pages_cache:
            # stops at page max_pages + 1: an over-long text costs what the limit allows
            text = ex.text.replace("\r\n", "\n").replace("\r", "\n").rstrip()
            tally.pages_cache[key] = len(layout(text, cfg, page_limit=cfg.max_pages))
            tally.page_source = f"layout with preset {preset!r}"
        tally.pages.append(tally.pages_cache[key])
        if tally.pages_cache[key] > cfg.max_pages:
            tally.over_max += 1


def _report(path: Path, files: list[Path], tally: _Tally, count_pages: bool, max_error_samples: int) -> dict:
    t = tally
    n = t.records
    n_errors = len(t.errors) + t.empty_ids + t.n_duplicates
    report = {
        "path": str(path),
        "files": [str(f) for f in files],
        "ok": n_errors == 0 and n > 0,
        "records": n,
        "valid_records": n - len(t.errors),
        "errors": {"count": len(t.errors), "by_field": dict(t.error_fields), "samples": t.errors[:max_error_samples]},
        "empty_ids": t.empty_ids,
        "duplicate_ids": {"count": t.n_duplicates, "samples": t.duplicates},
        "sources": dict(t.sources),
        "text_chars": {**_summary(t.text_len), "histogram": _histogram(t.text_len, TEXT_BINS)},
        "answer_chars": {**_summary(t.answer_len), "histogram": _histogram(t.answer_len, ANSWER_BINS)},
        "instruction_chars": _summary(t.instr_len),
        "pages_per_document": ({**_summary(t.pages), "histogram": _histogram(t.pages, PAGE_BINS),
                                "from": t.page_source, "over_max_pages": t.over_max} if count_pages else None),
        "extractive": {"records": t.extractive, "answer_found_verbatim": t.found,
                       "share": round(t.found / t.extractive, 4) if t.extractive else None},
    }
    if n == 0:
        report["errors"]["samples"].append({"where": str(path), "id": None, "field": None, "message": "no records"})
    return report

def format_report(report: dict) -> str:
    """The validation report as readable text."""
    lines = [f"{report['path']}: {report['records']} record(s), {report['valid_records']} valid "
             f"-> {'OK' if report['ok'] else 'ERRORS'}"]
    if report["sources"]:
        lines.append("sources: " + ", ".join(f"{k} {v}" for k, v in sorted(report["sources"].items())))
    e = report["errors"]
    lines.append(f"errors: {e['count']}" + (f" (by field: {e['by_field']})" if e["by_field"] else ""))
    for s in e["samples"][:10]:
        lines.append(f"  - {s['message']}")
    lines.append(f"empty ids: {report['empty_ids']}")
    d = report["duplicate_ids"]
    lines.append(f"duplicate ids: {d['count']}")
    for s in d["samples"][:10]:
        lines.append(f"  - {s['id']!r} at {s['where']} (first at {s['first']})")

    def hist(title: str, block: dict | None) -> None:
        if not block:
            return
        lines.append(f"{title}: min {block['min']}, median {block['median']}, mean {block['mean']}, "
                     f"max {block['max']}" + (f" [{block['from']}]" if block.get("from") else ""))
        total = max(1, max(b["count"] for b in block["histogram"]))
        for b in block["histogram"]:
            if b["count"]:
                lines.append(f"  {b['bin']:>12} {b['count']:>8} {'#' * max(1, round(30 * b['count'] / total))}")

    hist("text length (chars)", report["text_chars"])
    hist("answer length (chars)", report["answer_chars"])
    hist("pages per document", report["pages_per_document"])
    if report["pages_per_document"] and report["pages_per_document"].get("over_max_pages"):
        lines.append(f"  warning: {report['pages_per_document']['over_max_pages']} document(s) need more "
                     "pages than max_pages")
    x = report["extractive"]
    if x["records"]:
        lines.append(f"extractive answers found verbatim: {x['answer_found_verbatim']}/{x['records']} "
                     f"({100 * x['share']:.1f}%)")
    return "\n".join(lines)
