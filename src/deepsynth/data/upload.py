"""``upload``: push a complete prepared folder to the Hugging Face hub as a dataset repo, with a
generated dataset card and a manifest without local paths."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepsynth import storage
from deepsynth.atomic import write_text_atomic
from deepsynth.data.prepared_folder import (
    CARD,
    DATA_DIR,
    MANIFEST,
    REJECTED,
    SKIPPED,
    PrepareError,
    read_own_manifest,
    shard_files,
    write_manifest,
)

logger = logging.getLogger(__name__)


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
    manifest = read_own_manifest(path)
    if not manifest.get("complete"):
        raise PrepareError(f"{path}: the prepare run is not complete; run the same prepare command again to finish it")
    files = shard_files(path, manifest)
    if not files:
        raise PrepareError(f"{path}: no Parquet shards under {DATA_DIR}/")
    card = build_dataset_card(manifest, license=license, repo_id=repo_id)
    if CARD not in manifest.setdefault("files", [REJECTED, SKIPPED]):
        manifest["files"].append(CARD)  # recorded before it is written: a later --overwrite may remove it
        write_manifest(manifest_path, manifest)
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
