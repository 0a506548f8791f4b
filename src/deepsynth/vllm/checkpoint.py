"""Where vLLM loads a model from, and with what: the project's resolver (`resolve_source`) plus
what vLLM needs on top, before it starts (`deepsynth.vllm.engine.VLLMEngine` starts it).

* `resolve_model`: weights on disk (a preset is saved to a temporary bundle first), in
  transformers' layout (`vllm_checkpoint`: DeepSeek's own DeepSeek-OCR-2 layout is converted once
  into the cache as `load_bundle` converts it; DeepSeek-OCR v1 is refused), the processor
  configured for the bundle's crop mode, the adapter as a LoRA module;
* `vllm_processor_kwargs`, `vllm_hf_overrides`: what vLLM's own processor and model class need to
  read pages and pick the class as the project does;
* `vllm_adapter`, `vllm_lora_rank`: a LoRA adapter in the key names and rank vLLM accepts.

Nothing here imports vLLM: the helpers run in the project's environment too (`export-vllm`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from deepsynth.models.bundle import BundleError, ModelSource, ModelSpec, read_spec, resolve_source

__all__ = ["ResolvedModel", "native_layout", "resolve_model", "vllm_adapter", "vllm_checkpoint", "vllm_hf_overrides",
           "vllm_lora_rank", "vllm_processor_kwargs"]

#: Backend name of DeepSeek-OCR v1 (`deepsynth.models.deepseek_ocr_v1`), which vLLM does not serve here.
V1_BACKEND = "deepseek-ocr-v1"


@dataclass
class ResolvedModel:
    """A model as vLLM loads it: a directory of weights (+ a LoRA adapter directory)."""

    # Directory vLLM loads the (base) weights from.
    path: str
    # The bundle's spec (the adapter bundle's when serving an adapter).
    spec: ModelSpec
    # The processor, configured for the bundle's crop mode.
    processor: object
    # LoRA adapter directory served on top of `path`, or None.
    lora: str | None
    # Directory whose generation_config.json holds the decoding defaults.
    generation_dir: str
    # Temporary directories made for presets; removed by `VLLMEngine.close`.
    temporary: list[str] = field(default_factory=list)


def native_layout(path: str) -> bool:
    """Whether `path` holds vLLM's own DeepSeek-OCR(-2) config layout (as `export-vllm` writes)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return "language_config" in data and "projector_config" in data


def vllm_checkpoint(path: str, config: dict | None = None) -> str:
    """The directory vLLM loads for the checkpoint at `path` (a directory or hub id; `config`: its
    config.json as `resolve_source` read it, None: read here).

    DeepSeek's own DeepSeek-OCR-2 layout (remote-code config.json) is converted once into the cache,
    as `load_bundle` converts it (`deepseek_ocr2.convert_official`, same cache folder), since vLLM's
    Transformers backend reads transformers' layout; DeepSeek-OCR v1 (either layout) is refused;
    anything else is served from where it is.
    """
    from deepsynth.models import deepseek_ocr2 as ocr2
    from deepsynth.models.config_file import read_config
    from deepsynth.models.registry import backend_for_config

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        return path  # an adapter bundle: its base model is resolved on its own
    config, where = (config, path) if config is not None else read_config(path)
    if ocr2.is_official_config(config):
        return str(ocr2.converted_official(path))
    if backend_for_config(config, where).name == V1_BACKEND:
        raise BundleError(f"{path}: DeepSeek-OCR v1 checkpoints are not served by the vLLM engine (vLLM's "
                          "Transformers backend cannot build this project's v1 port); use the HF engine "
                          "(--engine hf)")
    return path


def resolve_model(name: str | ModelSource, adapter: str | None = None, seed: int = 0) -> ResolvedModel:
    """Where the weights, spec, processor and LoRA adapter of `name` are, for vLLM: the project's
    resolver (`resolve_source`: presets, aliases, shipped checkpoints, hub ids, directories, adapter
    bundles, URIs) plus what vLLM needs on top: weights on disk (a preset is saved to a temporary
    bundle first) in transformers' layout (`vllm_checkpoint`), the adapter as a LoRA module.
    """
    from transformers import AutoProcessor

    from deepsynth.models.bundle import load_bundle, save_bundle
    from deepsynth.vllm import register

    register()  # the plugin's processor back-ports, before a processor loads

    source = name if isinstance(name, ModelSource) else resolve_source(name, seed=seed)
    if source.is_preset:
        loaded = load_bundle(source)
        tmp = tempfile.mkdtemp(prefix="deepsynth-vllm-")
        save_bundle(tmp, loaded.model, loaded.processor, loaded.spec)
        found = resolve_model(tmp, adapter)
        found.temporary.append(tmp)
        return found
    if source.adapter is not None:
        if adapter is not None:
            raise BundleError(f"{source.name} is an adapter bundle already; serve one adapter at a time "
                              f"(adapter={adapter})")
        base = resolve_model(source.base)
        base.spec = source.spec if source.has_bundle else dataclasses.replace(
            base.spec, weights="adapter", base_model=source.base.name)
        base.lora = source.adapter
        if source.generation_dir == source.adapter:  # the adapters' own decoding defaults
            base.generation_dir = source.adapter
        return base
    path = vllm_checkpoint(source.path, source.config)
    processor = AutoProcessor.from_pretrained(path)
    spec = source.spec_for(processor)
    source.backend.configure_processor(processor, spec.crop_mode)
    found = ResolvedModel(path=path, spec=spec, processor=processor, lora=None, generation_dir=path)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter directory {adapter!r} has no adapter_config.json")
        found.lora = str(adapter)
        found.spec = read_spec(adapter) or spec
    return found


def vllm_processor_kwargs(processor) -> dict:
    """The call-time image settings of our processor (what `set_crop_mode` put on it: crops or not,
    the view and tile sides, the crop counts), as `mm_processor_kwargs` for the processor vLLM builds
    from the checkpoint, so that vLLM draws every page as ours does. vLLM's copy draws pages by
    DeepSeek's rules too: the plugin gives it the same page image processor (`deepsynth.vllm`)."""
    settings = getattr(processor, "images_kwargs", None) or {}
    image_processor = getattr(processor, "image_processor", None)
    valid = getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})
    return {key: value for key, value in settings.items() if key in valid}


def vllm_hf_overrides(config) -> dict:
    """`hf_overrides` for vLLM: vLLM picks its model class by the config's `architectures`, which a
    config saved from a bare config object (DeepSeek's layout converted, `convert_official`) lacks;
    the class is then the one transformers' image-text-to-text Auto class maps the config to."""
    if getattr(config, "architectures", None):
        return {}
    from transformers import AutoModelForImageTextToText

    cls = AutoModelForImageTextToText._model_mapping.get(type(config), None)
    return {"architectures": [cls.__name__]} if cls is not None else {}


#: peft key prefixes of DeepSeek-OCR-2 adapters in transformers' module names, and the checkpoint
#: names vLLM expects: vLLM renames LoRA keys with the checkpoint-to-module renames of transformers
#: (`(^|model.)layers.` -> `language_model.layers.`), which would rename module names a second time.
_ADAPTER_RENAMES = {"deepseek_ocr2": (("base_model.model.model.language_model.", "base_model.model.model."),),
                    "deepseek_ocr2_patches": (("base_model.model.model.language_model.", "base_model.model.model."),)}


def vllm_adapter(adapter: str, model_type: str | None) -> tuple[str, str | None]:
    """(directory vLLM loads the adapter from, temporary directory to remove or None).

    Adapters of model types whose checkpoint names differ from their module names are copied with
    their keys in checkpoint names; any other adapter is served from where it is.
    """
    renames = _ADAPTER_RENAMES.get(model_type or "")
    weights = Path(adapter) / "adapter_model.safetensors"
    if not renames or not weights.is_file():
        return adapter, None
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    renamed = {}
    for key, value in tensors.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    tmp = tempfile.mkdtemp(prefix="deepsynth-vllm-lora-")
    shutil.copy2(Path(adapter) / "adapter_config.json", Path(tmp) / "adapter_config.json")
    save_file(renamed, str(Path(tmp) / "adapter_model.safetensors"))
    return tmp, tmp


def vllm_lora_rank(config: dict, where: str) -> int:
    """The smallest rank vLLM accepts (its max_lora_rank choices) that holds the rank of the adapter
    whose adapter_config.json is `config` (`where`: the adapter, named in the error)."""
    rank = max([int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise ValueError(f"{where}: LoRA rank {rank} is above vLLM's largest max_lora_rank (512)")
