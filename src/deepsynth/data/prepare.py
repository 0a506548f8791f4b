"""``prepare``: load -> convert -> validate -> [render] -> sharded Parquet, resumable, into a local
folder or object storage.

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
import hashlib
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from deepsynth import storage
from deepsynth.atomic import TMP_MARK, clean_stale_temps, write_atomic, write_text_atomic
from deepsynth.cluster import RaySettings, check_engine, ray_session, require_ray
from deepsynth.data.prepared_folder import (
    CARD,
    DATA_DIR,
    FORMAT_VERSION,
    MANIFEST,
    MARKER_DIR,
    REJECTED,
    SKIPPED,
    TOOL,
    PrepareError,
    read_own_manifest,
    write_manifest,
)
from deepsynth.data.sources import STATUS_COLUMNS, choose_converter, convert_source, load_source, map_workers, resolve_mapping

logger = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    out: str  # the output folder as given (a local path or an object-storage URI)
    examples: int  # examples written, over all shards
    input_rows: int  # rows the converter read (after ``limit``)
    skipped: dict[str, int]  # rows a policy left out, by reason
    rejected: int  # rows that failed conversion, validation or rendering, or repeated an id
    shards: int  # Parquet shards the folder holds
    shards_written: int  # ... written by this run
    shards_reused: int  # ... found complete from an earlier run (resumed)
    manifest: dict = field(repr=False, default_factory=dict)  # the complete manifest.json


# --------------------------------------------------------------------------------------------
# rendering (datasets.map workers)


def _render_features():
    import datasets as ds

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
    import datasets

    part = datasets.Dataset(table, info=datasets.DatasetInfo(features=part.features))
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

    _check_arguments(engine, shard_size, limit, num_proc)
    # Object storage: the run writes into a local stage holding what the remote folder already
    # has (so an interrupted run resumes), and each finished file is uploaded at once, the
    # complete manifest last (storage.RemoteMirror).
    mirror = storage.mirror_for(out)
    shown = mirror.uri or str(out)
    options = dict(options or {})
    mapping_d = resolve_mapping(mapping)
    render_cfg = RenderConfig.from_preset(preset, **dict(render_overrides or {})) if render else None

    data, info = load_source(source, config=config, split=split, cache_dir=cache_dir)
    converter, options = choose_converter(source, data, info, converter, mapping_d, options)
    split_name = _split_name(info.get("split"))
    plan = _plan(source, data, info, limit=limit, converter=converter, options=options, render_cfg=render_cfg,
                 preset=preset if render else None, shard_size=shard_size)
    manifest = _open_folder(mirror, shown, plan, info.get("license", "unknown"), overwrite)

    # convert + validate (datasets.map with num_proc, cached for on-disk sources; or Ray Data tasks)
    with ray_session(ray_settings) if engine == "ray" else contextlib.nullcontext():
        source_ds, converted = convert_source(data, converter, options, num_proc, limit, engine)
        ok_idx, skipped_rows, rejected_rows = _sort_records(converted)
        shard_infos, written, reused = _write_shards(
            mirror, manifest, converted, ok_idx, split_name=split_name, shard_size=shard_size,
            render_cfg=render_cfg, engine=engine, num_proc=num_proc, progress=progress)

    return _finish(mirror, shown, manifest, input_rows=len(source_ds), shard_infos=shard_infos,
                   skipped_rows=skipped_rows, rejected_rows=rejected_rows, split_name=split_name,
                   render_cfg=render_cfg, preset=preset, written=written, reused=reused)


def _check_arguments(engine: str, shard_size: int, limit: int | None, num_proc: int) -> None:
    if check_engine(engine) == "ray":
        require_ray()  # before any work: a missing extra is the first thing to hear about

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: must be >= 1")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit!r}: must be >= 0")
    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc!r}: must be >= 1")


def _plan(source: str, data: Any, info: Mapping, *, limit: int | None, converter: str, options: dict,
          render_cfg: Any, preset: str | None, shard_size: int) -> dict:
    """Everything the output depends on: a folder holding the same plan is resumed, any other
    refused (or cleared with ``overwrite``)."""
    return {
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
        "preset": preset,
        "shard_size": shard_size,
        "input_fingerprint": _fingerprint(data),
    }


def _open_folder(mirror: storage.RemoteMirror, shown: str, plan: dict, license: str, overwrite: bool) -> dict:
    """Make the output folder (the local stage of ``mirror``) ready for ``plan`` and write its first,
    incomplete manifest, which it returns. A folder of the same plan is resumed; one of another plan
    is refused, or with ``overwrite`` its files are deleted; what a killed run left is removed."""
    plan_hash = _hash(plan)
    mirror.pull()
    out = mirror.stage
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = read_own_manifest(out)
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
                                "license": license, "files": [REJECTED, SKIPPED]}
    write_manifest(manifest_path, manifest)
    mirror.put(MANIFEST)
    return manifest


def _sort_records(converted: Any) -> tuple[list[int], list[dict], list[dict]]:
    """The converted rows sorted out: the indices of the examples to write (the first record of
    each id), and the skipped and rejected rows (a repeated id is rejected), each with why."""
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
    return ok_idx, skipped_rows, rejected_rows


def _shard_parts(converted: Any, ok_idx: list[int], pending: list[int], *, shard_size: int, n_shards: int,
                 render_cfg: Any, engine: str, num_proc: int) -> Iterable[tuple[int, Any]]:
    """``(shard index, its rows)`` for each pending shard, rendered when ``render_cfg`` is set;
    lazily, so a shard is computed only when the writer is ready for it."""
    def part_of(s: int):
        part = converted.select(ok_idx[s * shard_size:(s + 1) * shard_size])
        return part.remove_columns(list(STATUS_COLUMNS))

    if render_cfg is None:
        return ((s, part_of(s)) for s in pending)
    if engine == "ray":
        from deepsynth.data import ray_prepare

        return ray_prepare.render_shards(((s, part_of(s)) for s in pending), asdict(render_cfg),
                                         _render_features(), _render_batch)

    def render_local(s: int):
        part = part_of(s)
        return part.map(
            _render_batch, batched=True, batch_size=8, features=_render_features(),
            fn_kwargs={"config": asdict(render_cfg)}, keep_in_memory=True, load_from_cache_file=False,
            num_proc=map_workers(num_proc, len(part)), desc=f"render shard {s + 1}/{n_shards}",
        )

    return ((s, render_local(s)) for s in pending)


def _write_shards(mirror: storage.RemoteMirror, manifest: dict, converted: Any, ok_idx: list[int], *,
                  split_name: str, shard_size: int, render_cfg: Any, engine: str, num_proc: int,
                  progress: bool) -> tuple[list[dict], int, int]:
    """Write every shard whose marker is not complete yet (uploading each with its marker); returns
    the info of every shard, how many were written and how many reused."""
    out = mirror.stage
    plan_hash = manifest["plan_hash"]
    n_shards = max(1, math.ceil(len(ok_idx) / shard_size)) if ok_idx else 0
    shard_names = [f"{DATA_DIR}/{split_name}-{s:05d}-of-{n_shards:05d}.parquet" for s in range(n_shards)]
    marker_names = [f"{MARKER_DIR}/shard-{s:05d}.done" for s in range(n_shards)]
    # listed before they exist, so --overwrite after a kill still knows every file this run may have written
    manifest["files"] = shard_names + marker_names + [REJECTED, SKIPPED]
    write_manifest(out / MANIFEST, manifest)
    mirror.put(MANIFEST)
    (out / MARKER_DIR).mkdir(exist_ok=True)
    done_infos: dict[int, dict] = {}
    for s in range(n_shards):
        done = _shard_done(out, out / marker_names[s], plan_hash)
        if done is not None:
            done_infos[s] = done
    reused = len(done_infos)
    pending = [s for s in range(n_shards) if s not in done_infos]
    parts = _shard_parts(converted, ok_idx, pending, shard_size=shard_size, n_shards=n_shards,
                         render_cfg=render_cfg, engine=engine, num_proc=num_proc)
    # shards are written (each with its marker) as they come, so a kill loses only those in progress
    for s, part in tqdm(parts, total=len(pending), desc="shards", unit="shard", disable=not progress):
        done_infos[s] = _write_shard(out, part, shard_names[s], out / marker_names[s], plan_hash)
        mirror.put(shard_names[s])
        mirror.put(marker_names[s])  # after its shard: a marker never names a missing upload
    return [done_infos[s] for s in range(n_shards)], len(pending), reused


def _finish(mirror: storage.RemoteMirror, shown: str, manifest: dict, *, input_rows: int,
            shard_infos: list[dict], skipped_rows: list[dict], rejected_rows: list[dict], split_name: str,
            render_cfg: Any, preset: str, written: int, reused: int) -> PrepareResult:
    """Write rejected.jsonl, skipped.jsonl and the complete manifest (uploaded last: a complete
    manifest in the bucket means every file it lists is there)."""
    out = mirror.stage
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
        "counts": {"input_rows": input_rows, "examples": n_examples, "skipped": skipped_counts,
                   "rejected": len(rejected_rows)},
        "shards": [{"file": si["file"], "rows": si["rows"]} for si in shard_infos],
        "split": split_name,
        "columns": ["id", "text", "instruction", "answer", "source", "meta"]
                   + (["num_pages", "Image"] if render_cfg else []),
    })
    if render_cfg is not None:
        manifest["render"] = {"preset": preset, "config": asdict(render_cfg)}
    write_manifest(out / MANIFEST, manifest)
    mirror.put(MANIFEST)  # last: a complete manifest in the bucket means every file it lists is there
    if rejected_rows:
        logger.warning("%d record(s) rejected; reasons in %s (first: %s)", len(rejected_rows),
                       storage.join(shown, REJECTED), rejected_rows[0]["reason"])
    return PrepareResult(out=shown, examples=n_examples, input_rows=input_rows,
                         skipped=skipped_counts, rejected=len(rejected_rows), shards=len(shard_infos),
                         shards_written=written, shards_reused=reused, manifest=manifest)
