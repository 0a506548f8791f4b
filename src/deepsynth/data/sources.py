"""Reading what `prepare` converts: a local file, a dataset folder, a BEIR folder or a hub name
(:func:`load_source`), the column mapping of the generic converter (:func:`resolve_mapping`), which
converter fits (:func:`choose_converter`), and the conversion itself (:func:`convert_source`:
``datasets.map`` workers, or Ray Data tasks with ``engine="ray"``). :func:`iter_rows` reads an
examples file record by record, naming the file and line/row of whatever cannot be read."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deepsynth import storage
from deepsynth.data.converters import (
    CONVERTERS,
    KNOWN_DATASETS,
    KnownDataset,
    check_options,
    convert_record,
    detect_converter,
    fiqa_relevant,
)
from deepsynth.data.prepared_folder import PrepareError
from deepsynth.data.schema import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    DataValidationError,
    iter_jsonl,
    parse_json,
    read_examples,
    read_text_file,
)

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
STATUS_COLUMNS = ("_status", "_reason", "_row")



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
    for _, row, _ in iter_rows(path):
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


def iter_rows(path: Path):
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


def choose_converter(source: str, data: Any, info: Mapping, converter: str | None, mapping: Mapping[str, str],
                     options: dict) -> tuple[str, dict]:
    """The converter for ``data`` and its options: ``generic`` when ``mapping`` is given (its columns
    become options), else ``converter``, else the one the source implies (``info``), else the one
    the columns match. A converter that cannot read ``data`` raises PrepareError; options it does
    not know raise ValueError."""
    columns = list(data["queries"].column_names) if isinstance(data, dict) else list(data.column_names)
    if mapping:
        if converter not in (None, "generic"):
            raise ValueError(f"--mapping is for the generic converter, not {converter!r}")
        missing = sorted(v for v in mapping.values() if v not in columns)
        if missing:
            raise PrepareError(f"{source}: mapping names column(s) {missing} that the data lacks "
                               f"(columns: {columns})")
        if "text" not in mapping or "answer" not in mapping:
            raise ValueError("mapping needs at least text=COLUMN and answer=COLUMN")
        converter = "generic"
        options = {"text_field": mapping["text"], "target_field": mapping["answer"],
                   **({"instruction_field": mapping["instruction"]} if "instruction" in mapping else {}),
                   **({"id_field": mapping["id"]} if "id" in mapping else {}), **options}
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
    return converter, options


# --------------------------------------------------------------------------------------------
# conversion (runs in datasets.map workers: module-level, picklable)


def _convert_batch(batch: dict[str, list], indices: list[int], *, converter: str,
                   options: dict) -> dict[str, list]:
    fn = CONVERTERS[converter]
    keys = list(batch)
    out: dict[str, list] = {k: [] for k in ("id", "text", "instruction", "answer", "source", "meta",
                                            *STATUS_COLUMNS)}
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


def map_workers(num_proc: int, n: int) -> int | None:
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


def convert_source(data: Any, converter: str, options: dict, num_proc: int, limit: int | None,
             engine: str = "local"):
    source_ds, opts = _conversion_input(data, converter, options, limit)
    if engine == "ray":
        from deepsynth.data import ray_prepare

        return source_ds, ray_prepare.convert(source_ds, converter, opts, _converted_features(), _convert_batch)
    n = len(source_ds)
    converted = source_ds.map(
        _convert_batch, batched=True, batch_size=200, with_indices=True,
        remove_columns=source_ds.column_names, features=_converted_features(),
        fn_kwargs={"converter": converter, "options": opts}, num_proc=map_workers(num_proc, n),
        desc=f"convert ({converter})",
    )
    return source_ds, converted
