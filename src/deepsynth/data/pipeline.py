"""Dataset preparation: ``prepare`` (load -> convert -> validate -> [render] -> sharded Parquet),
``validate_path`` (report on a prepared folder or an examples file) and ``upload`` (to the hub).

Output folder of :func:`prepare`::

    OUT/data/{split}-00000-of-0000N.parquet   the examples (+ ``num_pages`` and ``Image`` with --render)
    OUT/manifest.json                          plan, counts, render settings, shards, ``files``; ``complete``
    OUT/rejected.jsonl                         records that failed validation or rendering, with why
    OUT/skipped.jsonl                          records a policy left out (e.g. unanswerable), with why
    OUT/.prepare/shard-0000i.done              completion marker of each written shard

Columns: ``id, text, instruction, answer, source`` (strings), ``meta`` (a JSON string, as
:func:`deepsynth.data.write_parquet` writes it), and with ``render=True`` ``num_pages`` (int32) and
``Image`` (a list of ``datasets.Image()``: PNG bytes, one per page; pages whose colours are grey
are stored as 8-bit grey PNGs, which is lossless for them). ``datasets.load_dataset(OUT)`` loads it.

Resuming: the plan (source, converter, options, render settings, input fingerprint) is stored in
``manifest.json``. Running the same command again skips every shard whose marker and file are
complete; a different plan in the same folder is refused unless ``overwrite=True``. Conversion
uses ``datasets.map`` (``num_proc`` workers) and its cache; rendering runs ``datasets.map`` per
shard, so an interruption (even SIGKILL) loses at most the shard in progress. With
``engine="ray"`` the same converter and renderer run in Ray Data tasks instead
(`deepsynth.data.ray_prepare`); the files are the same, byte for byte (each shard is written from
one Arrow chunk per column, so its bytes depend on its rows only), and either engine resumes the
other's folder. Every file is
written with :mod:`deepsynth.atomic` (fsync, then rename), and the temporary files a killed run
left are removed when the next run starts.

Ownership: the manifest names its writer (``tool``) and lists in ``files`` every file the run
writes, before writing it. ``overwrite=True`` deletes only those files; a ``manifest.json`` that
`prepare` did not write, or that cannot be read, is an error that deletes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import statistics
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from deepsynth import storage
from deepsynth.atomic import TMP_MARK, clean_stale_temps, write_atomic, write_text_atomic
from deepsynth.cluster import RaySettings, check_engine, ray_session, require_ray
from deepsynth.data.converters import (
    CONVERTERS,
    KNOWN_DATASETS,
    KnownDataset,
    check_options,
    convert_record,
    detect_converter,
    fiqa_relevant,
)
from deepsynth.data.schema import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    DataValidationError,
    InstructionExample,
    iter_jsonl,
    parse_json,
    read_examples,
    read_text_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PrepareError",
    "PrepareResult",
    "prepare",
    "load_source",
    "resolve_mapping",
    "validate_path",
    "format_report",
    "build_dataset_card",
    "upload",
    "public_manifest",
    "MANIFEST",
    "DATA_DIR",
]

MANIFEST = "manifest.json"
DATA_DIR = "data"
MARKER_DIR = ".prepare"
REJECTED = "rejected.jsonl"
SKIPPED = "skipped.jsonl"
CARD = "README.md"
TOOL = "deepsynth prepare"
FORMAT_VERSION = 1
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_PRIVATE_COLUMNS = ("_status", "_reason", "_row")
_EXTRA_COLUMNS = ("num_pages", "Image")


class PrepareError(RuntimeError):
    """A preparation/validation/upload step cannot go on; the message says why and what to do."""


@dataclass
class PrepareResult:
    out: str
    examples: int
    input_rows: int
    skipped: dict[str, int]
    rejected: int
    shards: int
    shards_written: int
    shards_reused: int
    manifest: dict = field(repr=False, default_factory=dict)


# --------------------------------------------------------------------------------------------
# loading


def _datasets():
    import datasets

    return datasets


def _load_dataset(*args: Any, **kwargs: Any):
    """``datasets.load_dataset`` with errors that name the source (one place, easy to stub)."""
    return _datasets().load_dataset(*args, **kwargs)


def _load_local_file(path: Path, cache_dir: str | None):
    suffix = path.suffix.lower()
    if suffix not in _LOCAL_BUILDERS:
        raise PrepareError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                           f"{sorted(_LOCAL_BUILDERS)} (or a dataset folder / hub name)")
    if suffix in (".json", ".jsonl") and _looks_like_examples(path):
        # InstructionExample files: read them exactly (meta dicts of any shape), not via schema
        # inference, which would add null keys to every meta.
        items = read_examples(path, validate=False)
        rows = {k: [] for k in REQUIRED_FIELDS + OPTIONAL_FIELDS}
        for ex in items:
            d = ex.to_dict()
            for k in REQUIRED_FIELDS + ("source",):
                rows[k].append(d[k])
            rows["meta"].append(json.dumps(d["meta"], ensure_ascii=False))
        return _datasets().Dataset.from_dict(rows)
    if suffix != ".parquet":
        # the datasets text loaders accept some damage (bytes that are not UTF-8) and fail later,
        # inside conversion, without naming the line: read every line once first
        problem = _locate_problem(path)
        if problem:
            raise PrepareError(problem)
    return _load_dataset(_LOCAL_BUILDERS[suffix], data_files=str(path), split="train", cache_dir=cache_dir)


def _looks_like_examples(path: Path) -> bool:
    with open(path, "rb") as f:
        # bad bytes are reported with their line by the reader that runs next; this only sniffs
        raw = f.read(1 << 16).decode("utf-8", errors="replace")
    head = raw.lstrip()
    if not head:
        raise PrepareError(f"{path}: the file is empty")
    if head.startswith("["):
        head = head[1:].lstrip()
    try:
        first, _ = json.JSONDecoder().raw_decode(head)
    except RecursionError:
        line = raw[:len(raw) - len(head)].count("\n") + 1
        raise PrepareError(f"{path} line {line}: JSON nested too deeply to read (more than about "
                           f"{sys.getrecursionlimit()} levels of arrays/objects)") from None
    except ValueError:  # not JSON (or not readable as such): let the datasets loader decide
        return False
    return isinstance(first, dict) and set(REQUIRED_FIELDS) - {"id"} <= set(first)


def _locate_problem(path: Path) -> str | None:
    """The first unreadable place in a local file (file and line/row), or None when every
    record reads; used to explain a failure of the datasets loader, which rarely names it."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".parquet"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f"{path} line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        return None
    for _, row, _ in _iter_rows(path):
        if isinstance(row, DataValidationError):
            return str(row)
    return None


def _is_beir_dir(path: Path) -> bool:
    return path.is_dir() and (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file()


def _read_qrels_tsv(path: Path) -> list[dict]:
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        need = {"query-id", "corpus-id"}
        if not need <= set(reader.fieldnames or []):
            raise PrepareError(f"{path}: BEIR qrels need the columns query-id, corpus-id, score "
                               f"(found {reader.fieldnames})")
        return [dict(r) for r in reader]


def load_source(source: str, *, config: str | None = None, split: str | None = None,
                cache_dir: str | None = None) -> tuple[Any, dict]:
    """Load ``source`` and describe it.

    Returns ``(data, info)``. ``data`` is a ``datasets.Dataset``, or for FiQA/BEIR a dict with
    ``corpus``, ``queries`` (Datasets) and ``qrels`` (list of dicts). ``info`` holds ``kind``
    (``file``, ``folder``, ``beir``, ``hub``), the resolved name/config/split, the converter the
    source implies (or ``None``) and its licence when known."""
    # a remote file or folder is read from a local copy; the plan keeps the URI as the source
    path = storage.local_input(source, what="source") if storage.is_uri(source) else Path(source).expanduser()
    known: KnownDataset | None = None
    info: dict[str, Any] = {"source": source, "config": config, "split": split}
    try:
        if path.is_file():
            info.update(kind="file", split="train")
            return _load_local_file(path, cache_dir), info
        if _is_beir_dir(path):
            split = split or "test"
            qrels_path = path / "qrels" / f"{split}.tsv"
            if not qrels_path.is_file():
                have = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
                raise PrepareError(f"{path}: no qrels/{split}.tsv for split {split!r} (have: {have})")
            data = {
                "corpus": _load_dataset("json", data_files=str(path / "corpus.jsonl"), split="train",
                                        cache_dir=cache_dir),
                "queries": _load_dataset("json", data_files=str(path / "queries.jsonl"), split="train",
                                         cache_dir=cache_dir),
                "qrels": _read_qrels_tsv(qrels_path),
            }
            info.update(kind="beir", split=split, converter="fiqa")
            return data, info
        split = split or "train"
        info["split"] = split
        if path.is_dir():
            info["kind"] = "folder"
            known = KNOWN_DATASETS.get(path.name)
            ds = _load_dataset(str(path), config, split=split, cache_dir=cache_dir)
        else:
            known = KNOWN_DATASETS.get(source)
            info["kind"] = "hub"
            if known is not None and known.converter == "fiqa":
                data = {
                    "corpus": _load_dataset(known.hub_id, "corpus", split="corpus", cache_dir=cache_dir),
                    "queries": _load_dataset(known.hub_id, "queries", split="queries", cache_dir=cache_dir),
                    "qrels": list(_load_dataset(known.qrels_id, split=split, cache_dir=cache_dir)),
                }
                info.update(name=known.hub_id, converter="fiqa", license=known.license)
                return data, info
            name = known.hub_id if known else source
            config = config or (known.config if known else None)
            info.update(name=name, config=config)
            ds = _load_dataset(name, config, split=split, cache_dir=cache_dir)
    except PrepareError:
        raise
    except DataValidationError as exc:
        raise PrepareError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - load_dataset raises many types; name the source
        where = _locate_problem(path) if path.is_file() else None
        raise PrepareError(where or f"cannot load {source!r} (config={config!r}, split={split!r}): "
                           f"{type(exc).__name__}: {exc}") from None
    if known is not None:
        info.update(converter=known.converter, license=known.license)
    if not hasattr(ds, "map"):
        raise PrepareError(f"{source!r} loaded as {type(ds).__name__}; pass --split to choose one split")
    return ds, info


def resolve_mapping(mapping: Mapping[str, str] | Sequence[str] | str | None) -> dict[str, str]:
    """``{"text": col, "answer": col, "instruction": col, "id": col}`` from a dict, from
    ``"text=body,answer=summary"`` or from a list of ``key=value`` items (``target`` is a synonym of
    ``answer``). Unknown keys raise ValueError naming the allowed ones."""
    if mapping is None:
        return {}
    items: list[str] = []
    if isinstance(mapping, Mapping):
        pairs = list(mapping.items())
    else:
        for part in [mapping] if isinstance(mapping, str) else mapping:
            items.extend(p for p in part.split(",") if p.strip())
        pairs = []
        for item in items:
            if "=" not in item:
                raise ValueError(f"mapping item {item!r} is not KEY=COLUMN (e.g. text=article)")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    allowed = {"text", "answer", "target", "instruction", "id"}
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in allowed:
            raise ValueError(f"mapping key {k!r} is unknown; use {sorted(allowed)}")
        if not v:
            raise ValueError(f"mapping key {k!r} has an empty column name")
        out["answer" if k == "target" else k] = v
    return out


# --------------------------------------------------------------------------------------------
# conversion (runs in datasets.map workers: module-level, picklable)


def _convert_batch(batch: dict[str, list], indices: list[int], *, converter: str,
                   options: dict) -> dict[str, list]:
    fn = CONVERTERS[converter]
    keys = list(batch)
    out: dict[str, list] = {k: [] for k in ("id", "text", "instruction", "answer", "source", "meta",
                                            *_PRIVATE_COLUMNS)}
    for j, index in enumerate(indices):
        row = {k: batch[k][j] for k in keys}
        ex, status, reason = convert_record(fn, row, index, options)
        rid = ex.id if ex is not None and isinstance(ex.id, str) else str(row.get("id", row.get("_id", "")) or "")
        if status == "ok":
            out["id"].append(ex.id)
            out["text"].append(ex.text)
            out["instruction"].append(ex.instruction)
            out["answer"].append(ex.answer)
            out["source"].append(ex.source)
            out["meta"].append(json.dumps(ex.meta, ensure_ascii=False))
        else:
            for k in ("text", "instruction", "answer", "source", "meta"):
                out[k].append("")
            out["id"].append(rid)
        out["_status"].append(status)
        out["_reason"].append(reason)
        out["_row"].append(int(index))
    return out


def _converted_features():
    ds = _datasets()
    f = {k: ds.Value("string") for k in ("id", "text", "instruction", "answer", "source", "meta")}
    f.update(_status=ds.Value("string"), _reason=ds.Value("string"), _row=ds.Value("int64"))
    return ds.Features(f)


def _nproc(num_proc: int, n: int) -> int | None:
    k = min(max(1, int(num_proc)), max(1, n))
    return k if k > 1 else None


def _conversion_input(data: Any, converter: str, options: dict, limit: int | None) -> tuple[Any, dict]:
    """The rows the converter reads (FiQA: the queries with relevant passages) and its options."""
    if converter == "fiqa":
        corpus = {str(r["_id"]): {"title": str(r.get("title") or ""), "text": str(r.get("text") or "")}
                  for r in data["corpus"]}
        relevant = fiqa_relevant(data["qrels"])
        queries = data["queries"]
        qids = [str(q) for q in queries["_id"]]
        keep = [i for i, q in enumerate(qids) if q in relevant]
        queries = queries.select(keep)
        if limit is not None:
            queries = queries.select(range(min(limit, len(queries))))
        queries = queries.add_column("relevant", [relevant[str(q)] for q in queries["_id"]])
        return queries, dict(options, corpus=corpus, corpus_ids=list(corpus))
    source_ds = data
    if limit is not None:
        source_ds = source_ds.select(range(min(limit, len(source_ds))))
    return source_ds, dict(options)


def _convert(data: Any, converter: str, options: dict, num_proc: int, limit: int | None,
             engine: str = "local"):
    source_ds, opts = _conversion_input(data, converter, options, limit)
    if engine == "ray":
        from deepsynth.data import ray_prepare

        return source_ds, ray_prepare.convert(source_ds, converter, opts, _converted_features(), _convert_batch)
    n = len(source_ds)
    converted = source_ds.map(
        _convert_batch, batched=True, batch_size=200, with_indices=True,
        remove_columns=source_ds.column_names, features=_converted_features(),
        fn_kwargs={"converter": converter, "options": opts}, num_proc=_nproc(num_proc, n),
        desc=f"convert ({converter})",
    )
    return source_ds, converted


# --------------------------------------------------------------------------------------------
# rendering (datasets.map workers)


def _render_features():
    ds = _datasets()
    f = {k: ds.Value("string") for k in ("id", "text", "instruction", "answer", "source", "meta")}
    f.update(num_pages=ds.Value("int32"), Image=ds.List(ds.Image()), _error=ds.Value("string"))
    return ds.Features(f)


_RENDER_CACHE: dict[str, Any] = {}


def _render_config_from(d: Mapping):
    from deepsynth.render import RenderConfig

    key = json.dumps(d, sort_keys=True)
    cfg = _RENDER_CACHE.get(key)
    if cfg is None:
        cfg = _RENDER_CACHE[key] = RenderConfig(**d)
    return cfg


def png_bytes(image, grey: bool) -> bytes:
    """PNG bytes of a page (8-bit grey when ``grey``, which is lossless for grey-on-grey pages)."""
    buf = io.BytesIO()
    (image.convert("L") if grey else image).save(buf, format="PNG")
    return buf.getvalue()


def _render_batch(batch: dict[str, list], *, config: dict) -> dict[str, list]:
    from deepsynth.render import render_text

    cfg = _render_config_from(config)
    grey = len(set(cfg.background)) == 1 and len(set(cfg.foreground)) == 1
    images, pages, errors = [], [], []
    for text in batch["text"]:
        try:
            rendered = render_text(text, cfg)
        except ValueError as exc:
            images.append([])
            pages.append(0)
            errors.append(f"render: {exc}")
            continue
        images.append([{"bytes": png_bytes(p.image, grey), "path": None} for p in rendered])
        pages.append(len(rendered))
        errors.append("")
    return {"Image": images, "num_pages": pages, "_error": errors}


# --------------------------------------------------------------------------------------------
# prepare


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _write_manifest(path: Path, manifest: dict) -> None:
    write_text_atomic(path, json.dumps(manifest, indent=1, ensure_ascii=False))


def _split_name(split: str | None) -> str:
    base = (split or "train").split("[", 1)[0].split("+", 1)[0]
    return re.sub(r"[^A-Za-z0-9_]", "_", base) or "train"


def _fingerprint(data: Any) -> str:
    if isinstance(data, dict):
        return _hash({k: (getattr(v, "_fingerprint", None) or _hash(v)) for k, v in data.items()})
    return getattr(data, "_fingerprint", "") or ""


def _shard_done(out: Path, marker: Path, plan_hash: str) -> dict | None:
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("plan_hash") != plan_hash:
        return None
    f = out / info.get("file", "")
    if not f.is_file():
        return None
    try:
        import pyarrow.parquet as pq

        if pq.ParquetFile(f).metadata.num_rows != info.get("rows"):
            return None
    except Exception:  # noqa: BLE001 - unreadable file: redo the shard
        return None
    return info


def _read_own_manifest(out: Path) -> dict:
    """The manifest in ``out`` when `prepare` wrote it; anything else raises PrepareError.

    A manifest this tool did not write (another program's, a `deepsynth render` one) or one
    that cannot be read says nothing about which files in ``out`` are ours, so the caller must
    stop before deleting or replacing anything."""
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PrepareError(f"{path} cannot be read ({type(exc).__name__}: {exc}); nothing was deleted: "
                           "remove the folder yourself or choose another --out") from None
    plan = manifest.get("plan") if isinstance(manifest, dict) else None
    if not (isinstance(plan, dict) and isinstance(manifest.get("plan_hash"), str)
            and manifest.get("tool", TOOL) == TOOL and "format_version" in plan):
        raise PrepareError(f"{path} was not written by `deepsynth prepare`; nothing was deleted: "
                           "choose another --out (or remove that folder yourself)")
    return manifest


def _owned_files(out: Path, manifest: dict) -> list[Path]:
    """Files a `prepare` manifest says its run wrote (listed before they were written), checked
    to be plain relative paths inside ``out``; a listing that points elsewhere raises PrepareError."""
    listed = manifest.get("files")
    if listed is None:  # written before manifests listed their files: what they did record
        shards = [s.get("file") for s in manifest.get("shards") or [] if isinstance(s, dict)]
        listed = shards + [f"{MARKER_DIR}/shard-{i:05d}.done" for i in range(len(shards))] + [REJECTED, SKIPPED]
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        raise PrepareError(f"{out / MANIFEST}: 'files' is not a list of paths; nothing was deleted")
    root = out.resolve()
    files = []
    for name in listed:
        rel = Path(name)
        target = out / rel
        if (not name or rel.is_absolute() or ".." in rel.parts or rel == Path(MANIFEST) or target.is_symlink()
                or not target.resolve().is_relative_to(root) or (target.exists() and not target.is_file())):
            raise PrepareError(f"{out / MANIFEST} lists {name!r}, which is not a file of this folder; "
                               "nothing was deleted")
        files.append(target)
    return files


def _clear_outputs(out: Path, manifest: dict) -> list[str]:
    """Delete the files the earlier run's manifest lists (and its folders when that empties them);
    returns their names. Every entry is checked before the first deletion."""
    files = _owned_files(out, manifest)
    removed = []
    for f in files:
        if f.exists():
            f.unlink()
            removed.append(str(f.relative_to(out)))
    for name in (DATA_DIR, MARKER_DIR):
        folder = out / name
        if folder.is_dir():
            clean_stale_temps(folder)
            if not any(folder.iterdir()):
                folder.rmdir()
    (out / MANIFEST).unlink()
    logger.info("--overwrite: removed %d file(s) of the earlier prepare run in %s", len(removed), out)
    return removed


def _clean_stale(out: Path) -> None:
    """Remove temporary files a killed run of ours left: every one under data/ and .prepare/
    (folders only prepare writes), and in ``out`` itself only those of the names prepare writes."""
    removed = []
    for name in (DATA_DIR, MARKER_DIR):
        removed += [f"{name}/{r}" for r in clean_stale_temps(out / name)]
    ours = tuple(f".{n}." for n in (MANIFEST, REJECTED, SKIPPED, CARD))
    for child in out.iterdir() if out.is_dir() else []:
        if child.is_file() and child.name.startswith(ours) and child.name.endswith(TMP_MARK):
            child.unlink()
            removed.append(child.name)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s: %s", len(removed), out,
                    ", ".join(sorted(removed)[:10]))


def _write_shard(out: Path, part: Any, name: str, marker: Path, plan_hash: str) -> dict:
    """Write one shard (records whose rendering failed go to its ``rejected`` list), then its marker."""
    shard_rejected: list[dict] = []
    if "_error" in part.column_names:
        errs = part["_error"]
        bad = [i for i, e in enumerate(errs) if e]
        if bad:
            bad_ids = part.select(bad)["id"]
            shard_rejected = [{"id": rid, "reason": f"record {rid!r}: {errs[i]}"} for rid, i in zip(bad_ids, bad)]
            part = part.select([i for i in range(len(part)) if not errs[i]])
        part = part.remove_columns(["_error"])
    # Parquet pages follow the Arrow chunks, which follow how the rows were computed (num_proc,
    # Ray blocks): one chunk per column makes the file a function of the rows alone.
    table = part.with_format("arrow")[:].combine_chunks()
    part = _datasets().Dataset(table, info=_datasets().DatasetInfo(features=part.features))
    write_atomic(out / name, part.to_parquet)
    info = {"file": name, "rows": len(part), "rejected": shard_rejected, "plan_hash": plan_hash,
            "first_id": part[0]["id"] if len(part) else None}
    write_text_atomic(marker, json.dumps(info, ensure_ascii=False))
    return info


def prepare(
    source: str,
    out: str | os.PathLike,
    *,
    config: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    converter: str | None = None,
    mapping: Mapping[str, str] | Sequence[str] | str | None = None,
    options: Mapping[str, Any] | None = None,
    render: bool = False,
    preset: str = "base",
    render_overrides: Mapping[str, Any] | None = None,
    num_proc: int = 1,
    shard_size: int = 500,
    cache_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    engine: str = "local",
    ray_settings: RaySettings | None = None,
) -> PrepareResult:
    """Load ``source``, convert it to instruction examples, validate them, optionally render
    their pages, and write sharded Parquet to ``out`` (see the module docstring).

    source:    a known name (``squad_v2``, ``natural_questions``, ``ms_marco``, ``cnn_dailymail``,
               ``xsum``, ``fiqa``, or their hub ids), any hub id or local dataset folder that
               ``datasets.load_dataset`` reads, a BEIR folder (corpus.jsonl, queries.jsonl,
               qrels/<split>.tsv), or a local .json/.jsonl/.csv/.parquet file.
    converter: which converter to use; by default the one the known name implies, else the one
               the columns match (:func:`deepsynth.data.converters.detect_converter`), else
               ``generic`` when ``mapping`` is given.
    mapping:   columns for the generic converter: text=..., answer=..., [instruction=...], [id=...].
    options:   converter options (e.g. ``no_answer="unanswerable"``, ``instruction_variants=[...]``).
    render:    also render every document (``preset`` + ``render_overrides``) into ``Image``.
    engine:    ``local`` (``datasets.map`` with ``num_proc`` processes) or ``ray``: the same
               converter and renderer run in Ray Data tasks (``ray_settings``: which instance, how
               many CPUs for a local one; see `deepsynth.data.ray_prepare`). Both write the same folder, byte
               for byte, so a run started with one engine can be finished with the other.
    """
    from deepsynth.render import RenderConfig

    if check_engine(engine) == "ray":
        require_ray()  # before any work: a missing extra is the first thing to hear about

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: must be >= 1")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit!r}: must be >= 0")
    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc!r}: must be >= 1")
    # Object storage: the run writes into a local stage holding what the remote folder already
    # has (so an interrupted run resumes), and each finished file is uploaded at once, the
    # complete manifest last (storage.RemoteMirror).
    mirror = storage.mirror_for(out)
    shown = mirror.uri or str(out)
    options = dict(options or {})
    mapping_d = resolve_mapping(mapping)
    render_cfg = RenderConfig.from_preset(preset, **dict(render_overrides or {})) if render else None

    data, info = load_source(source, config=config, split=split, cache_dir=cache_dir)
    columns = list(data["queries"].column_names) if isinstance(data, dict) else list(data.column_names)
    if mapping_d:
        if converter not in (None, "generic"):
            raise ValueError(f"--mapping is for the generic converter, not {converter!r}")
        missing = sorted(v for v in mapping_d.values() if v not in columns)
        if missing:
            raise PrepareError(f"{source}: mapping names column(s) {missing} that the data lacks "
                               f"(columns: {columns})")
        if "text" not in mapping_d or "answer" not in mapping_d:
            raise ValueError("mapping needs at least text=COLUMN and answer=COLUMN")
        converter = "generic"
        options = {"text_field": mapping_d["text"], "target_field": mapping_d["answer"],
                   **({"instruction_field": mapping_d["instruction"]} if "instruction" in mapping_d else {}),
                   **({"id_field": mapping_d["id"]} if "id" in mapping_d else {}), **options}
    converter = converter or info.get("converter") or detect_converter(columns)
    if converter is None:
        raise PrepareError(f"{source}: cannot tell which converter fits the columns {columns}; pass "
                           f"--converter ({', '.join(CONVERTERS)}) or --mapping text=COL,answer=COL")
    if converter == "fiqa" and not isinstance(data, dict):
        raise PrepareError(f"{source}: the fiqa converter needs a BEIR folder (corpus.jsonl, "
                           "queries.jsonl, qrels/<split>.tsv) or the hub name 'fiqa'")
    if converter != "fiqa" and isinstance(data, dict):
        raise PrepareError(f"{source}: a BEIR folder can only be converted with 'fiqa'")
    check_options(converter, options)
    if converter == "generic" and not {"text_field", "target_field"} <= set(options):
        raise ValueError("the generic converter needs --mapping text=COLUMN,answer=COLUMN")

    split_name = _split_name(info.get("split"))
    plan = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "kind": info.get("kind"),
        "name": info.get("name", source),
        "config": info.get("config"),
        "split": info.get("split"),
        "limit": limit,
        "converter": converter,
        "options": options,
        "render": asdict(render_cfg) if render_cfg else None,
        "preset": preset if render else None,
        "shard_size": shard_size,
        "input_fingerprint": _fingerprint(data),
    }
    plan_hash = _hash(plan)
    mirror.pull()
    out = mirror.stage
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = _read_own_manifest(out)
        if old.get("plan_hash") != plan_hash:
            if not overwrite:
                diff = sorted(k for k in plan if old.get("plan", {}).get(k) != plan[k])
                raise PrepareError(f"{shown} holds the output of a different prepare run (differs in: "
                                   f"{', '.join(diff) or 'format'}); use --overwrite or another --out")
            for name in _clear_outputs(out, old) + [MANIFEST]:
                mirror.delete(name)
        else:
            logger.info("resuming the prepare run in %s", out)
        _clean_stale(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"tool": TOOL, "plan": plan, "plan_hash": plan_hash, "complete": False,
                                "license": info.get("license", "unknown"), "files": [REJECTED, SKIPPED]}
    _write_manifest(manifest_path, manifest)
    mirror.put(MANIFEST)

    # convert + validate (datasets.map with num_proc, cached for on-disk sources; or Ray Data tasks)
    with ray_session(ray_settings) if engine == "ray" else contextlib.nullcontext():
        source_ds, converted = _convert(data, converter, options, num_proc, limit, engine)
        import numpy as np

        status = np.asarray(converted.data.column("_status").to_pylist(), dtype=object)
        ids = converted.data.column("id").to_pylist()
        reasons = converted.data.column("_reason").to_pylist()
        rows = converted.data.column("_row").to_pylist()
        skipped_rows = [{"row": rows[i], "id": ids[i], "reason": reasons[i]}
                        for i in np.flatnonzero(status == "skipped")]
        rejected_rows = [{"row": rows[i], "id": ids[i], "reason": reasons[i]}
                         for i in np.flatnonzero(status == "rejected")]
        ok_idx: list[int] = []
        first_seen: dict[str, int] = {}
        for i in np.flatnonzero(status == "ok"):
            rid = ids[i]
            if rid in first_seen:
                rejected_rows.append({"row": rows[i], "id": rid, "reason":
                                      f"row {rows[i]}: duplicate id {rid!r} (first at row {first_seen[rid]})"})
                continue
            first_seen[rid] = rows[i]
            ok_idx.append(int(i))
        n_shards = max(1, math.ceil(len(ok_idx) / shard_size)) if ok_idx else 0
        shard_names = [f"{DATA_DIR}/{split_name}-{s:05d}-of-{n_shards:05d}.parquet" for s in range(n_shards)]
        marker_names = [f"{MARKER_DIR}/shard-{s:05d}.done" for s in range(n_shards)]
        # listed before they exist, so --overwrite after a kill still knows every file this run may have written
        manifest["files"] = shard_names + marker_names + [REJECTED, SKIPPED]
        _write_manifest(manifest_path, manifest)
        mirror.put(MANIFEST)
        (out / MARKER_DIR).mkdir(exist_ok=True)
        done_infos: dict[int, dict] = {}
        for s in range(n_shards):
            done = _shard_done(out, out / marker_names[s], plan_hash)
            if done is not None:
                done_infos[s] = done
        reused = len(done_infos)
        pending = [s for s in range(n_shards) if s not in done_infos]

        def part_of(s: int):
            part = converted.select(ok_idx[s * shard_size:(s + 1) * shard_size])
            return part.remove_columns(list(_PRIVATE_COLUMNS))

        if render_cfg is None:
            parts: Any = ((s, part_of(s)) for s in pending)
        elif engine == "ray":
            from deepsynth.data import ray_prepare

            parts = ray_prepare.render_shards(((s, part_of(s)) for s in pending), asdict(render_cfg),
                                              _render_features(), _render_batch)
        else:
            def render_local(s: int):
                part = part_of(s)
                return part.map(
                    _render_batch, batched=True, batch_size=8, features=_render_features(),
                    fn_kwargs={"config": asdict(render_cfg)}, keep_in_memory=True, load_from_cache_file=False,
                    num_proc=_nproc(num_proc, len(part)), desc=f"render shard {s + 1}/{n_shards}",
                )

            parts = ((s, render_local(s)) for s in pending)
        # shards are written (each with its marker) as they come, so a kill loses only those in progress
        for s, part in tqdm(parts, total=len(pending), desc="shards", unit="shard", disable=not progress):
            done_infos[s] = _write_shard(out, part, shard_names[s], out / marker_names[s], plan_hash)
            mirror.put(shard_names[s])
            mirror.put(marker_names[s])  # after its shard: a marker never names a missing upload
        written = len(pending)
        shard_infos = [done_infos[s] for s in range(n_shards)]

    for si in shard_infos:
        rejected_rows.extend(si.get("rejected", []))
    n_examples = sum(si["rows"] for si in shard_infos)
    _write_jsonl(out / REJECTED, rejected_rows)
    _write_jsonl(out / SKIPPED, skipped_rows)
    mirror.put(REJECTED)
    mirror.put(SKIPPED)
    skipped_counts = dict(Counter(r["reason"] for r in skipped_rows))
    manifest.update({
        "complete": True,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": {"input_rows": len(source_ds), "examples": n_examples, "skipped": skipped_counts,
                   "rejected": len(rejected_rows)},
        "shards": [{"file": si["file"], "rows": si["rows"]} for si in shard_infos],
        "split": split_name,
        "columns": ["id", "text", "instruction", "answer", "source", "meta"]
                   + (["num_pages", "Image"] if render_cfg else []),
    })
    if render_cfg is not None:
        manifest["render"] = {"preset": preset, "config": asdict(render_cfg)}
    _write_manifest(manifest_path, manifest)
    mirror.put(MANIFEST)  # last: a complete manifest in the bucket means every file it lists is there
    if rejected_rows:
        logger.warning("%d record(s) rejected; reasons in %s (first: %s)", len(rejected_rows),
                       storage.join(shown, REJECTED), rejected_rows[0]["reason"])
    return PrepareResult(out=shown, examples=n_examples, input_rows=len(source_ds),
                         skipped=skipped_counts, rejected=len(rejected_rows), shards=n_shards,
                         shards_written=written, shards_reused=reused, manifest=manifest)


# --------------------------------------------------------------------------------------------
# validate

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


def _shard_files(folder: Path, manifest: dict) -> list[Path]:
    """The shards a complete prepare manifest lists (not whatever else lies in data/)."""
    files = [folder / s["file"] for s in manifest.get("shards") or [] if s.get("rows", 1)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PrepareError(f"{folder}: shard(s) listed in {MANIFEST} are missing: {missing}; "
                           "run the prepare command again")
    return files


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrepareError(f"{path}: no such file or folder")
    data = path / DATA_DIR
    manifest = None
    if (path / MANIFEST).is_file() and data.is_dir():
        try:
            manifest = _read_own_manifest(path)
        except PrepareError:  # another tool's folder: check the files it holds
            manifest = None
    if manifest is not None and manifest.get("complete"):
        files = _shard_files(path, manifest)
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


def _iter_rows(path: Path):
    """Yield (where, row dict or exception, num_pages or None); a file that cannot be read
    (damaged Parquet, bytes that are not UTF-8, JSON nested too deeply) yields a
    DataValidationError naming the file and the line/row instead of raising."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet_rows(path)
        return
    if suffix not in (".jsonl", ".json"):
        raise PrepareError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .jsonl or .json")
    if suffix == ".json":
        try:
            content = read_text_file(path)
        except DataValidationError as exc:
            yield str(path), exc, None
            return
        if content.lstrip().startswith("["):
            try:
                data = parse_json(content, str(path))
            except DataValidationError as exc:
                yield str(path), exc, None
                return
            if not isinstance(data, list):
                yield f"{path}", DataValidationError(f"{path}: expected a JSON array of records"), None
                return
            for i, row in enumerate(data, start=1):
                yield f"{path} record {i}", row, None
            return
    for where, record in iter_jsonl(path):
        yield where, record, None


def _iter_parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    i = 0
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        lengths = None
        if "num_pages" not in names and "Image" in names:  # page counts without decoding images
            lengths = pc.list_value_length(pf.read(columns=["Image"]).column("Image")).to_pylist()
        for batch in pf.iter_batches(batch_size=1000, columns=[c for c in names if c != "Image"]):
            pages = batch.column("num_pages").to_pylist() if "num_pages" in names else None
            for j, row in enumerate(batch.to_pylist()):
                n_pages = pages[j] if pages is not None else (lengths[i] if lengths is not None else None)
                i += 1
                yield f"{path} row {i}", row, n_pages
    except (OSError, pa.ArrowException, ValueError) as exc:
        where = f"{path} row {i + 1}" if i else str(path)
        yield where, DataValidationError(f"{where}: not a readable Parquet file ({type(exc).__name__}: "
                                         f"{str(exc).strip()})"), None


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
    from deepsynth.render.renderer import layout

    path = storage.local_input(path, what="file or folder")
    files = _files_of(path)
    cfg = RenderConfig.from_preset(preset) if count_pages else None
    n = 0
    errors: list[dict] = []
    error_fields: Counter = Counter()
    empty_ids = 0
    first_at: dict[str, str] = {}
    duplicates: list[dict] = []
    n_duplicates = 0
    text_len: list[int] = []
    answer_len: list[int] = []
    instr_len: list[int] = []
    pages: list[int] = []
    page_source = "rendered" if count_pages else None
    pages_cache: dict[str, int] = {}
    over_max = 0
    sources: Counter = Counter()
    extractive = found = 0
    for file in files:
        for where, row, n_pages in tqdm(_iter_rows(file), desc=f"validate {file.name}", unit="rec",
                                        disable=not progress):
            n += 1
            if isinstance(row, Exception):
                errors.append({"where": where, "id": None, "field": None, "message": str(row)})
                error_fields["(unreadable)"] += 1
                continue
            if isinstance(row, dict):
                row = {k: v for k, v in row.items() if k not in _EXTRA_COLUMNS}
                if isinstance(row.get("meta"), str):
                    try:
                        row["meta"] = parse_json(row["meta"], f"{where}: field 'meta'") if row["meta"].strip() else {}
                    except DataValidationError as exc:
                        errors.append({"where": where, "id": row.get("id"), "field": "meta", "message": str(exc)})
                        error_fields["meta"] += 1
                        continue
                for k in ("source", "meta"):
                    if k in row and row[k] is None:
                        row.pop(k)
            try:
                ex = InstructionExample.from_dict(row, where=where)
            except DataValidationError as exc:
                errors.append({"where": where, "id": exc.record_id, "field": exc.field, "message": str(exc)})
                error_fields[exc.field or "(record)"] += 1
                continue
            if not ex.id.strip():
                empty_ids += 1
            elif ex.id in first_at:
                n_duplicates += 1
                if len(duplicates) < max_error_samples:
                    duplicates.append({"id": ex.id, "where": where, "first": first_at[ex.id]})
            else:
                first_at[ex.id] = where
            try:
                ex.validate()
            except DataValidationError as exc:  # counted as an error, left out of the statistics
                errors.append({"where": where, "id": exc.record_id, "field": exc.field, "message": f"{where}: {exc}"})
                error_fields[exc.field or "(record)"] += 1
                continue
            sources[ex.source] += 1
            text_len.append(len(ex.text))
            answer_len.append(len(ex.answer))
            instr_len.append(len(ex.instruction))
            if ex.meta.get("extractive"):
                extractive += 1
                spans = ex.meta.get("answer_spans") or [ex.answer]
                if all(isinstance(s, str) and s in ex.text for s in spans):
                    found += 1
            if count_pages:
                if n_pages is not None:
                    pages.append(int(n_pages))
                elif ex.text.strip():
                    key = hashlib.sha1(ex.text.encode("utf-8")).hexdigest()
                    if key not in pages_cache:
                        # stops at page max_pages + 1: an over-long text costs what the limit allows
                        text = ex.text.replace("\r\n", "\n").replace("\r", "\n").rstrip()
                        pages_cache[key] = len(layout(text, cfg, page_limit=cfg.max_pages))
                        page_source = f"layout with preset {preset!r}"
                    pages.append(pages_cache[key])
                    if pages_cache[key] > cfg.max_pages:
                        over_max += 1
    n_errors = len(errors) + empty_ids + n_duplicates
    report = {
        "path": str(path),
        "files": [str(f) for f in files],
        "ok": n_errors == 0 and n > 0,
        "records": n,
        "valid_records": n - len(errors),
        "errors": {"count": len(errors), "by_field": dict(error_fields), "samples": errors[:max_error_samples]},
        "empty_ids": empty_ids,
        "duplicate_ids": {"count": n_duplicates, "samples": duplicates},
        "sources": dict(sources),
        "text_chars": {**_summary(text_len), "histogram": _histogram(text_len, TEXT_BINS)},
        "answer_chars": {**_summary(answer_len), "histogram": _histogram(answer_len, ANSWER_BINS)},
        "instruction_chars": _summary(instr_len),
        "pages_per_document": ({**_summary(pages), "histogram": _histogram(pages, PAGE_BINS), "from": page_source,
                                "over_max_pages": over_max} if count_pages else None),
        "extractive": {"records": extractive, "answer_found_verbatim": found,
                       "share": round(found / extractive, 4) if extractive else None},
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


# --------------------------------------------------------------------------------------------
# upload


def build_dataset_card(manifest: Mapping, *, license: str | None = None, repo_id: str | None = None) -> str:
    """A dataset card (README.md with YAML metadata) from a prepare manifest: source, licence,
    counts, converter options and render settings."""
    from huggingface_hub import DatasetCard, DatasetCardData

    manifest = public_manifest(manifest)  # no local paths in a public card
    plan = dict(manifest.get("plan", {}))
    counts = manifest.get("counts", {})
    split = manifest.get("split", "train")
    lic = license or manifest.get("license") or "unknown"
    n = counts.get("examples", 0)
    size = ("n<1K" if n < 1_000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000
            else "100K<n<1M" if n < 1_000_000 else "n>1M")
    summarisation = plan.get("converter") in ("cnn_dailymail", "xsum")
    data = DatasetCardData(
        license=lic,
        pretty_name=f"DeepSynth instructions from {plan.get('name', plan.get('source'))}",
        task_categories=["summarization" if summarisation else "question-answering"],
        size_categories=[size],
        tags=["deepsynth", "document-understanding", "instruction"] + (["rendered-pages"] if manifest.get("render") else []),
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": f"{DATA_DIR}/{split}-*.parquet"}]}],
    )
    render = manifest.get("render")
    render_text = ("Pages are rendered: `Image` holds one PNG per page, `num_pages` their count.\n\n"
                   f"Render settings (preset `{render['preset']}`):\n\n```json\n"
                   f"{json.dumps(render['config'])}\n```") if render else \
        "Pages are not pre-rendered; render `text` with `deepsynth.render` at training time."
    skipped = counts.get("skipped") or {}
    body = f"""
# {data.pretty_name}

Instruction data prepared with `deepsynth prepare` (DeepSynth): each record is a document (`text`),
an instruction about it (`instruction`) and the expected `answer`; `meta` is a JSON string.

- **Source:** `{plan.get('name', plan.get('source'))}` (config `{plan.get('config')}`, split `{plan.get('split')}`)
- **Licence:** `{lic}` (the source dataset's licence applies to this derived data)
- **Converter:** `{plan.get('converter')}` with options `{json.dumps(plan.get('options', {}), ensure_ascii=False)}`
- **Examples:** {n} (from {counts.get('input_rows', 0)} input records; skipped by policy: {skipped or 0}; rejected: {counts.get('rejected', 0)})
- **Shards:** {len(manifest.get('shards', []))} Parquet file(s) under `{DATA_DIR}/`

{render_text}

```python
from datasets import load_dataset
ds = load_dataset("{repo_id or 'REPO_ID'}", split="{split}")
```
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def public_manifest(manifest: Mapping) -> dict:
    """The manifest as it may be published: local paths (the source file or folder, any absolute
    or home-relative path in the plan or options) reduced to their last component."""
    local_roots = []
    plan = manifest.get("plan") or {}
    if plan.get("kind") in ("file", "folder", "beir") and isinstance(plan.get("source"), str):
        src = Path(plan["source"]).expanduser()
        # longest first, so a folder inside home is cut before home itself
        local_roots = sorted({str(src.resolve().parent), str(Path.home())}, key=len, reverse=True)

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if not isinstance(value, str):
            return value
        if os.path.isabs(value) or value.startswith("~"):
            return Path(value).name
        for root in local_roots:
            if root not in ("", ".", "/") and root in value:
                value = value.replace(root, Path(root).name)
        return value

    out = scrub(dict(manifest))
    if plan.get("kind") in ("file", "folder", "beir"):
        out["plan"]["source"] = out["plan"]["name"] = Path(str(plan.get("source", ""))).name
    return out


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


def upload(path: str | os.PathLike, repo_id: str, *, private: bool = False, license: str | None = None,
           token: str | None = None, commit_message: str | None = None) -> str:
    """Push a prepared folder to the hub as a dataset repo, with a generated dataset card.

    The published manifest.json is :func:`public_manifest`'s copy: no local paths.

    The token comes from ``token``, else the environment (``HF_TOKEN``) or the stored login
    (``huggingface_hub.get_token``); it is never printed or logged. Returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    path = storage.local_input(path, what="prepared folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise PrepareError(f"{path}: not a prepared folder (no {MANIFEST}); run `deepsynth prepare` first")
    manifest = _read_own_manifest(path)
    if not manifest.get("complete"):
        raise PrepareError(f"{path}: the prepare run is not complete; run the same prepare command again to finish it")
    files = _shard_files(path, manifest)
    if not files:
        raise PrepareError(f"{path}: no Parquet shards under {DATA_DIR}/")
    card = build_dataset_card(manifest, license=license, repo_id=repo_id)
    if CARD not in manifest.setdefault("files", [REJECTED, SKIPPED]):
        manifest["files"].append(CARD)  # recorded before it is written: a later --overwrite may remove it
        _write_manifest(manifest_path, manifest)
    write_text_atomic(path / CARD, card)
    token = token or get_token()
    if not token:
        raise PrepareError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi()
    published = json.dumps(public_manifest(manifest), indent=1, ensure_ascii=False).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=str(path / CARD)),
                  CommitOperationAdd(path_in_repo=MANIFEST, path_or_fileobj=published)]
    operations += [CommitOperationAdd(path_in_repo=f"{DATA_DIR}/{f.name}", path_or_fileobj=str(f)) for f in files]
    try:
        repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
        api.create_commit(repo_id=repo_id, repo_type="dataset", operations=operations, token=token,
                          commit_message=commit_message or
                          f"Upload {manifest.get('counts', {}).get('examples', '?')} examples (deepsynth prepare)")
    except Exception as exc:  # noqa: BLE001 - re-raise without any chance of echoing the token
        raise PrepareError(f"upload to {repo_id!r} failed: {_scrub(f'{type(exc).__name__}: {exc}', token)}") from None
    url = str(getattr(repo, "url", "") or f"https://huggingface.co/datasets/{repo_id}")
    logger.info("uploaded %d shard(s) to %s", len(files), url)
    return url
