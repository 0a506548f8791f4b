"""Backend registry: which family module loads a preset, alias, hub id or local directory.

Backends are chosen by the checkpoint's `model_type` (read from config.json, so no remote code
runs). Loading itself goes through `deepsynth.models.bundle.load_bundle`, which also reads what
the model directory says about its pages, prompt and decoding; `load_model` is its
(model, processor) shorthand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepsynth.models import deepseek_ocr2, deepseek_ocr_v1, generic
from deepsynth.models.backend import Backend

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add a family; later registrations are tried after earlier ones."""
    BACKENDS[backend.name] = backend


# DeepSeek-OCR-2 and v1 first: the generic backend serves every other image-text-to-text type.
for _module in (deepseek_ocr2, deepseek_ocr_v1, generic):
    register_backend(_module.BACKEND)


def aliases() -> dict[str, str]:
    return {alias: target for b in BACKENDS.values() for alias, target in b.aliases.items()}


def preset_backend(name: str) -> Backend | None:
    """The backend whose tiny preset is called `name`, if any."""
    return next((b for b in BACKENDS.values() if name in b.presets), None)


def backend_for_type(model_type: str | None, name: str = "") -> Backend:
    for backend in BACKENDS.values():
        if model_type in backend.model_types:
            return backend
    known = sorted(t for b in BACKENDS.values() for t in b.model_types)
    raise ValueError(f"no backend for model_type {model_type!r} of {name!r}; known: {known}")


def backend_of(model: torch.nn.Module) -> Backend:
    """The backend of a loaded model (looks through peft and text-encoder wrappers)."""
    config = model.config
    if hasattr(model, "get_base_model") and not hasattr(config, "model_type"):
        config = model.get_base_model().config
    return backend_for_type(getattr(config, "model_type", None), type(model).__name__)


def _hub_model_type(repo_id: str) -> str | None:
    """`model_type` of a hub checkpoint from its config.json (AutoConfig would refuse remote-code
    checkpoints such as DeepSeek-OCR v1 without trust_remote_code; reading the JSON runs nothing)."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, "config.json")
    except Exception as err:  # offline, missing repo, gated repo, ...: all reported with the cause
        raise OSError(f"cannot read the config of {repo_id!r}: {err}") from err
    return json.loads(Path(config).read_text()).get("model_type")


def resolve(name: str) -> str:
    """Map an alias or a shipped checkpoint name to a loadable path or hub id."""
    found = aliases().get(name)
    if found:
        return found
    shipped = CHECKPOINT_DIR / name
    if (shipped / "config.json").is_file():
        return str(shipped)
    return name


def model_type_of(path: str) -> str | None:
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path!r} has no config.json (expected a save_pretrained directory)")
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text()).get("model_type")
    return _hub_model_type(path)


def load_model(name: str, dtype: torch.dtype | None = None, seed: int = 0):
    """(model, processor) of `deepsynth.models.bundle.load_bundle` (see there)."""
    from deepsynth.models.bundle import load_bundle

    loaded = load_bundle(name, dtype=dtype, seed=seed)
    return loaded.model, loaded.processor
