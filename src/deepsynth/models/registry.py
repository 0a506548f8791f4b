"""Backend registry: which family module loads a preset, alias, hub id or local directory.

Backends are chosen by the checkpoint's `model_type` (read from config.json, so no remote code
runs; `deepsynth.models.config_file.read_config`). Loading itself goes through
`deepsynth.models.bundle.load_bundle`, which also reads what the model directory says about its
pages, prompt and decoding; `deepsynth.models.bundle.load_model` is its (model, processor) shorthand.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepsynth.models import deepseek_ocr2, deepseek_ocr_v1, generic
from deepsynth.models.backend import Backend
from deepsynth.models.config_file import read_config

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


class UnknownModelType(ValueError):
    """A checkpoint whose config.json names a model type no backend serves."""


def backend_for_type(model_type: str | None, name: str = "") -> Backend:
    for backend in BACKENDS.values():
        if model_type in backend.model_types:
            return backend
    where = f"{name}: " if name else ""
    raise UnknownModelType(f"{where}no backend for model_type {model_type!r}; {_supported()}")


def _supported() -> str:
    named = [f"{b.name} ({', '.join(b.model_types)})" for b in BACKENDS.values() if b.name != "generic"]
    generic = BACKENDS.get("generic")
    tail = ""
    if generic is not None:
        some = ", ".join(sorted(generic.model_types)[:6])
        tail = f", or one of transformers' {len(generic.model_types)} image-text-to-text types ({some}, ...)"
    return ("DeepSynth loads " + "; ".join(named) + tail
            + ", and DeepSeek's original DeepSeek-OCR / DeepSeek-OCR-2 repositories (model_type deepseek_vl_v2)")


def backend_for_config(config: dict, where: str = "") -> Backend:
    """The backend of a checkpoint from its config.json: a backend that recognizes the layout
    (DeepSeek's remote-code checkpoints share `deepseek_vl_v2`, so their fields decide), else the
    one serving its `model_type`."""
    for backend in BACKENDS.values():
        if backend.recognizes is not None and backend.recognizes(config):
            return backend
    return backend_for_type(config.get("model_type"), where)


def backend_for_checkpoint(path: str) -> Backend:
    """The backend of a model directory or hub id (reads its config.json; runs no remote code)."""
    config, where = read_config(path)
    return backend_for_config(config, where)


def backend_of(model: torch.nn.Module) -> Backend:
    """The backend of a loaded model (looks through peft and text-encoder wrappers)."""
    config = model.config
    if hasattr(model, "get_base_model") and not hasattr(config, "model_type"):
        config = model.get_base_model().config
    return backend_for_type(getattr(config, "model_type", None), type(model).__name__)


def resolve(name: str) -> str:
    """Map an alias or a shipped checkpoint name to a loadable path or hub id."""
    known = aliases()
    found = known.get(name) or {alias.lower(): target for alias, target in known.items()}.get(name.lower())
    if found:
        return found
    shipped = CHECKPOINT_DIR / name
    if (shipped / "config.json").is_file():
        return str(shipped)
    return name


def model_type_of(path: str) -> str | None:
    return read_config(path)[0].get("model_type")
