"""What a prepared folder is: the names of its files, who owns it (the manifest `prepare` writes)
and which shards it holds; shared by prepare, validate, upload and the training data reader.

The layout (written by :func:`deepsynth.data.prepare.prepare`)::

    OUT/data/{split}-00000-of-0000N.parquet   the examples (+ ``num_pages`` and ``Image`` with --render)
    OUT/manifest.json                          plan, counts, render settings, shards, ``files``; ``complete``
    OUT/rejected.jsonl                         records that failed validation or rendering, with why
    OUT/skipped.jsonl                          records a policy left out (e.g. unanswerable), with why
    OUT/.prepare/shard-0000i.done              completion marker of each written shard
"""

from __future__ import annotations

import json
from pathlib import Path

from deepsynth.atomic import write_text_atomic

MANIFEST = "manifest.json"
DATA_DIR = "data"
MARKER_DIR = ".prepare"
REJECTED = "rejected.jsonl"
SKIPPED = "skipped.jsonl"
CARD = "README.md"
TOOL = "deepsynth prepare"
FORMAT_VERSION = 1


class PrepareError(RuntimeError):
    """A preparation/validation/upload step cannot go on; the message says why and what to do."""


def read_own_manifest(out: Path) -> dict:
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


def shard_files(folder: Path, manifest: dict) -> list[Path]:
    """The shards a complete prepare manifest lists (not whatever else lies in data/)."""
    files = [folder / s["file"] for s in manifest.get("shards") or [] if s.get("rows", 1)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PrepareError(f"{folder}: shard(s) listed in {MANIFEST} are missing: {missing}; "
                           "run the prepare command again")
    return files


def write_manifest(path: Path, manifest: dict) -> None:
    write_text_atomic(path, json.dumps(manifest, indent=1, ensure_ascii=False))
