"""Backend registry: one `load_model` for training, evaluation and serving.

A model is named by a preset ("tiny", "tiny-reader"), an alias of a real checkpoint
("deepseek-ocr-2", "deepseek-ocr" for v1), a hub id, or a local directory written by
`save_pretrained`. Backends are chosen by the checkpoint's `model_type` (read from config.json, so
no remote code runs); each one loads the model and its processor with `from_pretrained` (never
remote code). DeepSeek-OCR v1 checkpoints are converted once to the ported classes
(`deepseek_ocr_v1`, docs/backends.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, DeepseekOcr2ForConditionalGeneration

from deepsynth.models.deepseek_ocr2 import CHECKPOINT, apply_vision_readout, build_tiny
from deepsynth.models.deepseek_ocr_v1 import MODEL_TYPE as V1_MODEL_TYPE
from deepsynth.models.deepseek_ocr_v1 import V1_CHECKPOINT, build_tiny_v1, load_v1
from deepsynth.models.generic import IMAGE_TEXT_TO_TEXT_TYPES, TINY_PRESETS, load_generic
from deepsynth.models.text_encoder import is_soft_prompt_dir, load_soft_prompt_model

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
ALIASES = {"deepseek-ocr-2": CHECKPOINT, "deepseek-ocr": V1_CHECKPOINT}


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
    # DeepSeek-OCR v1: original checkpoints (remote-code layout, model_type "deepseek_vl_v2") are
    # converted once to the port; converted directories have model_type "deepseek_ocr_v1".
    "deepseek-ocr-v1": Backend("deepseek-ocr-v1", ("deepseek_vl_v2", V1_MODEL_TYPE), load_v1),
    # Any AutoModelForImageTextToText + AutoProcessor checkpoint (Qwen2-VL, Qwen2.5-VL, Idefics3,
    # SmolVLM, ...); tried after the backends above, prompts through the processor's chat template.
    "generic": Backend("generic", tuple(t for t in IMAGE_TEXT_TO_TEXT_TYPES if t != "deepseek_ocr2"), load_generic),
}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def _hub_model_type(repo_id: str) -> str | None:
    """`model_type` of a hub checkpoint from its config.json (AutoConfig would refuse remote-code
    checkpoints such as DeepSeek-OCR v1 without trust_remote_code; reading the JSON runs nothing)."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, "config.json")
    except Exception as err:  # offline, missing repo, gated repo, ...
        raise OSError(f"cannot read the config of {repo_id!r}: {err}") from err
    return json.loads(Path(config).read_text()).get("model_type")


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
    randomly initialised tiny models of those families (generic backend);
    "tiny-deepseek-ocr-v1" is a random tiny DeepSeek-OCR v1 (ported classes). Anything else goes through the backend registry.
    """
    if name == "tiny":
        return build_tiny(seed=seed)
    if name in TINY_PRESETS:  # "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-idefics3": random, seeded
        return TINY_PRESETS[name](seed=seed)
    if name == "tiny-deepseek-ocr-v1":
        return build_tiny_v1(seed=seed)
    path = resolve(name)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path!r} has no config.json (expected a save_pretrained directory)")
    if (local / "config.json").is_file():
        model_type = json.loads((local / "config.json").read_text()).get("model_type")
    else:
        model_type = _hub_model_type(path)
    for backend in BACKENDS.values():
        if model_type in backend.model_types:
            logger.info("loading %s with backend %s", path, backend.name)
            model, processor = backend.load(path, dtype=dtype)
            return _with_text_encoder(model, path), processor
    known = sorted(t for b in BACKENDS.values() for t in b.model_types)
    raise ValueError(f"no backend for model_type {model_type!r} of {name!r}; known: {known}")
