"""A checkpoint's config.json, read as JSON (a local directory or a hub id): the registry picks a backend
by its `model_type`, and family loaders read their own fields from it. Reading the JSON runs no
remote code."""

from __future__ import annotations

import json
from pathlib import Path


def _hub_config(repo_id: str) -> dict:
    """config.json of a hub checkpoint (AutoConfig would refuse remote-code checkpoints such as
    DeepSeek-OCR v1 without trust_remote_code; reading the JSON runs nothing)."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, "config.json")
    except Exception as err:  # offline, missing repo, gated repo, ...: all reported with the cause
        raise OSError(f"cannot read the config of {repo_id!r}: {err}") from err
    return _parse_config(Path(config), repo_id)


def _parse_config(file: Path, where: str) -> dict:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json is not a JSON object")
    return config


def read_config(path: str) -> tuple[dict, str]:
    """(config.json as a dict, where it was read: the file's path or the hub id)."""
    local = Path(path)
    if local.exists():
        file = local / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"model directory {path!r} has no config.json (expected a save_pretrained "
                                    "directory or a hub checkpoint's files)")
        return _parse_config(file, str(file)), str(file)
    return _hub_config(path), path
