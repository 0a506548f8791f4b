"""Backend registry: one `load_model` for training, evaluation and serving.

A model is named by a preset ("tiny", "tiny-reader"), an alias of a real checkpoint
("deepseek-ocr-2"), a hub id, or a local directory written by `save_pretrained`. Backends are
chosen by the checkpoint's `model_type`; each one loads the model and its processor with
`from_pretrained` (never remote code).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, DeepseekOcr2ForConditionalGeneration

from deepsynth.models.deepseek_ocr2 import CHECKPOINT, apply_vision_readout, build_tiny
from deepsynth.models.generic import IMAGE_TEXT_TO_TEXT_TYPES, TINY_PRESETS, load_generic
from deepsynth.models.text_encoder import is_soft_prompt_dir, load_soft_prompt_model

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
ALIASES = {"deepseek-ocr-2": CHECKPOINT}


@dataclass(frozen=True)
class Backend:
    """How to load one family of checkpoints."""

    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values this backend serves
    load: Callable[..., tuple[torch.nn.Module, object]]  # (path_or_id, dtype) -> (model, processor)


def _load_deepseek_ocr2(path: str, dtype: torch.dtype | None = None):
    model = DeepseekOcr2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    return apply_vision_readout(model), processor


def _with_text_encoder(model, path: str):
    """Directories trained with the text-encoder channel carry the encoder beside the model."""
    if is_soft_prompt_dir(path):
        return load_soft_prompt_model(model, path)
    return model


BACKENDS: dict[str, Backend] = {
    "deepseek-ocr-2": Backend("deepseek-ocr-2", ("deepseek_ocr2",), _load_deepseek_ocr2),
    # Any AutoModelForImageTextToText + AutoProcessor checkpoint (Qwen2-VL, Qwen2.5-VL, Idefics3,
    # SmolVLM, ...); tried after the backends above, prompts through the processor's chat template.
    "generic": Backend("generic", tuple(t for t in IMAGE_TEXT_TO_TEXT_TYPES if t != "deepseek_ocr2"), load_generic),
}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def resolve(name: str) -> str:
    """Map a preset or alias to a loadable path or hub id."""
    if name in ALIASES:
        return ALIASES[name]
    shipped = CHECKPOINT_DIR / name
    if (shipped / "config.json").is_file():
        return str(shipped)
    return name


def load_model(name: str, dtype: torch.dtype | None = None, seed: int = 0):
    """Return (model, processor) for a preset, alias, hub id or local directory.

    "tiny" builds a randomly initialised tiny DeepSeek-OCR-2 (seeded); "tiny-reader" is the
    shipped pre-trained tiny reader; "tiny-qwen2-vl", "tiny-qwen2.5-vl" and "tiny-idefics3" are
    randomly initialised tiny models of those families (generic backend). Anything else goes through the backend registry.
    """
    if name == "tiny":
        return build_tiny(seed=seed)
    if name in TINY_PRESETS:  # "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-idefics3": random, seeded
        return TINY_PRESETS[name](seed=seed)
    path = resolve(name)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path!r} has no config.json (expected a save_pretrained directory)")
    if (local / "config.json").is_file():
        model_type = json.loads((local / "config.json").read_text()).get("model_type")
    else:
        model_type = AutoConfig.from_pretrained(path).model_type
    for backend in BACKENDS.values():
        if model_type in backend.model_types:
            logger.info("loading %s with backend %s", path, backend.name)
            model, processor = backend.load(path, dtype=dtype)
            return _with_text_encoder(model, path), processor
    known = sorted(t for b in BACKENDS.values() for t in b.model_types)
    raise ValueError(f"no backend for model_type {model_type!r} of {name!r}; known: {known}")
