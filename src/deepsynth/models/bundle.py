"""The model bundle: a model directory that says how its pages were drawn, prompted and decoded.

Beside `config.json`, the weights and the processor files, every directory the project writes
(a trainer's `final/`, `checkpoint-*/`, `adapter/`, a pushed model, the shipped reader) holds:

* `generation_config.json`: the decoding defaults (`GenerationSettings.write_to`), loop guards
  included (n-gram blocking);
* `deepsynth.json`: a versioned `ModelSpec`: the full render config, the processor's crop mode,
  the prompt layout and instruction channel (prompt text, or text-encoder id + projection file),
  the default instruction, the loop-stop policy, the base model of adapters, the training config,
  the training data and evaluation results.

`resolve_source` is the one resolver: it turns a model name (preset, alias, shipped reader, hub id,
directory, object-storage URI) into a `ModelSource` (where the weights are, the spec read once,
the backend, an adapter's base, the decoding defaults' folder) without loading weights.
`load_bundle` is the one loader of the project (training, evaluation, the engine, `ask`, `serve`,
`push`) on top of it: it returns (model, processor, spec); a directory without `deepsynth.json`
gets its backend's defaults, with a warning. The vLLM engine and Ray's driver resolve through
`resolve_source` too. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch

from deepsynth.atomic import write_text_atomic
from deepsynth.models.adapters import load_adapters
from deepsynth.models.backend import Backend
from deepsynth.models.collate import CHAT_TEMPLATE_PROMPT, PLAIN_PROMPT, RAW_PROMPT, Collator, PromptBuilder
from deepsynth.models.generate import Decoder, GenerationSettings
from deepsynth.models.loops import LoopPolicy
from deepsynth.models.config_file import read_config
from deepsynth.models.registry import backend_for_config, backend_for_type, backend_of, preset_backend, resolve
from deepsynth.models.text_encoder import SoftPromptModel, guard_forward, load_soft_prompt_model
from deepsynth.render import RenderConfig

logger = logging.getLogger(__name__)

BUNDLE_FILE = "deepsynth.json"
BUNDLE_VERSION = 1
PROMPT_LAYOUTS: dict[str, PromptBuilder] = {"plain": PLAIN_PROMPT, "raw": RAW_PROMPT,
                                             "chat-template": CHAT_TEMPLATE_PROMPT}
PROMPT_CHANNEL = {"kind": "prompt"}


class BundleError(ValueError):
    """A bundle file that this version cannot read (newer version, bad field)."""


@dataclass
class ModelSpec:
    """What a model reads and how it answers (saved as deepsynth.json)."""

    # Backend family that loads the weights ("deepseek-ocr-2", "deepseek-ocr-v1", "generic").
    backend: str
    # Every RenderConfig field of the pages drawn from text (not only a preset name).
    render: dict = field(default_factory=lambda: asdict(RenderConfig()))
    # Processor crop mode: "none" (one global view per page), "tiles" (local crops too), None (as saved).
    crop_mode: str | None = None
    # Prompt layout: "plain" (BOS + `<image>...\n{instruction}`, DeepSeek's own), "raw"
    # (`<image>...\n{instruction}\n`) or "chat-template". Bundles written before "plain" existed have
    # no such field and were all trained on raw: a missing field means "raw".
    prompt_layout: str = "raw"
    # {"kind": "prompt"}, or {"kind": "text-encoder", "model": id, "trainable", "pooling",
    # "use_projection", "projection": file or None, "weights": folder of a fine-tuned encoder or None}.
    instruction_channel: dict = field(default_factory=lambda: dict(PROMPT_CHANNEL))
    # Instruction used where a request or record has none.
    default_instruction: str = ""
    # Loop-stop policy (LoopPolicy fields); n-gram blocking lives in generation_config.json.
    loop_guard: dict = field(default_factory=lambda: asdict(LoopPolicy()))
    # "full": the weights are in this folder; "adapter": peft adapters on `base_model`.
    weights: str = "full"
    # The model these weights started from (preset, alias, hub id or directory).
    base_model: str | None = None
    # Seed a randomly initialised preset base was built with (adapters on "tiny" need it).
    base_seed: int | None = None
    # TrainerConfig fields of the run that made the weights (None: not trained by DeepSynth).
    training: dict | None = None
    # What it was trained on: {"train": path or description, "examples": n, "pages": "prepared"|"rendered"}.
    training_data: dict | None = None
    # Evaluation results: {dataset name: {metric: value, ...}}.
    evaluation: dict = field(default_factory=dict)
    # Format version of this file; a newer one than this code knows is an error.
    version: int = BUNDLE_VERSION

    def __post_init__(self) -> None:
        if self.version > BUNDLE_VERSION:
            raise BundleError(f"{BUNDLE_FILE} has version {self.version}, newer than this DeepSynth reads "
                              f"(up to {BUNDLE_VERSION}); upgrade deepsynth to load this model")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise BundleError(f"prompt_layout={self.prompt_layout!r}: choose one of {sorted(PROMPT_LAYOUTS)}")
        if self.weights not in ("full", "adapter"):
            raise BundleError(f"weights={self.weights!r}: must be 'full' or 'adapter'")
        if self.instruction_channel.get("kind") not in ("prompt", "text-encoder"):
            raise BundleError(f"instruction_channel.kind={self.instruction_channel.get('kind')!r}: "
                              "must be 'prompt' or 'text-encoder'")
        self.render_config()  # validates every render field
        LoopPolicy(**self.loop_guard)

    def render_config(self) -> RenderConfig:
        return RenderConfig(**self.render)

    def loop_policy(self) -> LoopPolicy:
        return LoopPolicy(**self.loop_guard)

    @property
    def prompt_builder(self) -> PromptBuilder:
        return PROMPT_LAYOUTS[self.prompt_layout]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = BUNDLE_FILE) -> "ModelSpec":
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object")
        version = data.get("version", BUNDLE_VERSION)
        if not isinstance(version, int) or version > BUNDLE_VERSION:
            raise BundleError(f"{where} has version {version!r}, newer than this DeepSynth reads "
                              f"(up to {BUNDLE_VERSION}); upgrade deepsynth to load this model")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"{where}: unknown fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise BundleError(f"{where}: {err}") from None


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    processor: Any
    spec: ModelSpec

    def decoder(self, settings: GenerationSettings | None = None, max_length: int = 1024) -> Decoder:
        """The decoding path with this bundle's prompt layout, loop guard and decoding defaults."""
        return make_decoder(self.model, self.processor, self.spec, settings, max_length)


def make_collator(model, processor, spec: ModelSpec, max_length: int = 1024) -> Collator:
    """The collator for a model under its bundle: prompt layout and instruction channel."""
    encoder = getattr(model, "text_encoder", None)
    return Collator(processor, max_length, instruction_tokenizer=encoder.tokenizer if encoder is not None else None,
                    prompt_builder=spec.prompt_builder)


def make_decoder(model, processor, spec: ModelSpec, settings: GenerationSettings | None = None,
                 max_length: int = 1024) -> Decoder:
    base = model.model if isinstance(model, SoftPromptModel) else model
    return Decoder(model, make_collator(model, processor, spec, max_length),
                   settings or GenerationSettings.from_model(model), spec.loop_policy(),
                   encodes_pages=backend_of(base).encodes_pages)


def default_spec(backend: Backend, processor, render_preset: str, crop_mode: str | None = None) -> ModelSpec:
    """What a model without a bundle is assumed to read: its backend's defaults (processor None: not
    loaded yet, `ModelSource.spec_for` settles the chat-template layout once it is)."""
    layout = backend.prompt_layout
    if layout == "chat-template" and processor is not None and not getattr(processor, "chat_template", None):
        layout = "raw"
    return ModelSpec(backend=backend.name, render=asdict(RenderConfig.from_preset(render_preset)),
                     crop_mode=crop_mode, prompt_layout=layout)


def read_spec(directory: str | Path) -> ModelSpec | None:
    """The bundle file of a directory, or None when it has none."""
    path = Path(directory) / BUNDLE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    return ModelSpec.from_dict(data, where=str(path))


def write_spec(directory: str | Path, spec: ModelSpec) -> None:
    write_text_atomic(Path(directory) / BUNDLE_FILE, json.dumps(spec.to_dict(), indent=2, default=list) + "\n")


def record_evaluation(directory: str | Path, name: str, scores: dict, spec: ModelSpec | None = None) -> None:
    """Add evaluation results to a bundle (a directory without a bundle file is left alone).

    spec: the bundle's spec as the caller read it (`ModelSource.spec`), so that a command reads
    deepsynth.json once; None reads it here."""
    spec = spec if spec is not None else read_spec(directory)
    if spec is None or not (Path(directory) / BUNDLE_FILE).is_file():
        logger.warning("%s has no %s: evaluation results not recorded there", directory, BUNDLE_FILE)
        return
    write_spec(directory, dataclasses.replace(spec, evaluation={**spec.evaluation, name: scores}))


# ---- save ----------------------------------------------------------------------------------------
def _peft_of(model):
    from peft import PeftModel

    return model if isinstance(model, PeftModel) else None


def save_bundle(directory: str | Path, model, processor, spec: ModelSpec,
                generation: GenerationSettings | None = None, adapter_only: bool = False,
                state_dict: dict | None = None) -> ModelSpec:
    """Write a model bundle into `directory` (an existing, usually temporary, folder).

    model:        a plain model, a peft model (adapters), or a `SoftPromptModel` around either.
    adapter_only: for a peft model, write the adapters (spec.weights = "adapter", spec.base_model
                  must name the base); otherwise the adapters must have been merged already.
    generation:   decoding defaults to store (default: what the model's generation_config holds).
    state_dict:   full weights gathered by the caller (FSDP), passed to `save_pretrained`.
    """
    directory = Path(directory)
    inner = model.model if isinstance(model, SoftPromptModel) else model
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    spec = dataclasses.replace(spec, weights="adapter" if adapter_only else "full")
    if adapter_only:
        if _peft_of(inner) is None:
            raise ValueError("adapter_only=True needs a model with LoRA adapters")
        if not spec.base_model:
            raise ValueError("an adapter bundle needs spec.base_model")
    elif _peft_of(inner) is not None:
        raise ValueError("merge the LoRA adapters before saving full weights (or pass adapter_only=True)")
    target = inner.get_base_model() if adapter_only else inner
    (generation or GenerationSettings.from_model(target)).write_to(target)
    inner.save_pretrained(directory, **kwargs)
    if adapter_only:  # peft writes adapter files only; the decoding defaults travel with them
        target.generation_config.save_pretrained(directory)
    processor.save_pretrained(directory)
    if isinstance(model, SoftPromptModel):
        model.save_channel(directory)
        spec = dataclasses.replace(spec, instruction_channel=model.channel())
    else:
        spec = dataclasses.replace(spec, instruction_channel=dict(PROMPT_CHANNEL))
    write_spec(directory, spec)
    return spec


# ---- load ----------------------------------------------------------------------------------------
def _apply_spec(model, processor, spec: ModelSpec, path: Path | None):
    backend = backend_for_type(getattr(model.config, "model_type", None), spec.backend)
    backend.configure_processor(processor, spec.crop_mode)
    if spec.instruction_channel.get("kind") == "text-encoder":
        if path is None:
            raise BundleError("a text-encoder channel needs the bundle directory that holds its projection")
        model = load_soft_prompt_model(model, path, spec.instruction_channel, processor, spec.prompt_builder)
    return model


# ---- resolve ---------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """Where a model is and what its bundle says, found without loading weights (`resolve_source`).

    Every way of opening a model starts here: `load_bundle` (the HF engine, training, `push`,
    `ask`, `serve`), the vLLM engine and Ray's driver, so each reads config.json and deepsynth.json
    once and they all agree on the spec, the backend and an adapter's base."""

    # The name as asked (preset, alias, shipped reader, hub id, directory or object-storage URI).
    name: str
    # What the weights load from: a local directory or a hub id; None for a preset (built in memory).
    path: str | None
    # The family that loads the weights (an adapter bundle's: its base's).
    backend: Backend = field(repr=False)
    # The bundle's spec (read once), or the backend's defaults when the model has no deepsynth.json.
    spec: ModelSpec
    # Whether `spec` was read from deepsynth.json (False: the backend's defaults).
    has_bundle: bool
    # config.json as read once (None for presets and adapter bundles); the backend's loader takes it.
    config: dict | None = field(default=None, repr=False)
    # The seed a preset is built with (an adapter bundle's: its base's).
    seed: int = 0
    # The adapter directory of an adapter bundle (then `path` is that directory too), else None.
    adapter: str | None = None
    # An adapter bundle's base model, resolved the same way; None for any other model.
    base: ModelSource | None = None

    @property
    def is_preset(self) -> bool:
        return self.path is None

    @property
    def directory(self) -> Path | None:
        """The local folder of the model (None: a preset or a hub id)."""
        return Path(self.path) if self.path is not None and Path(self.path).is_dir() else None

    @property
    def generation_dir(self) -> str | None:
        """The folder whose generation_config.json holds the decoding defaults: an adapter bundle's
        own when it has one (the trainer writes it beside the adapters), else its base's; None for a
        preset (its defaults are the built model's)."""
        if self.adapter is not None:
            if (Path(self.adapter) / "generation_config.json").is_file():
                return self.adapter
            return self.base.generation_dir if self.base is not None else None
        return self.path

    def generation_defaults(self) -> GenerationSettings | None:
        """The decoding defaults of `generation_dir` (None for a preset: ask the built model)."""
        where = self.generation_dir
        return generation_defaults(where) if where is not None else None

    def spec_for(self, processor) -> ModelSpec:
        """The spec to load with `processor`: the bundle's, or the backend's defaults, whose
        chat-template layout falls back to "raw" for a processor without a chat template."""
        if self.has_bundle or self.spec.prompt_layout != "chat-template" or getattr(processor, "chat_template", None):
            return self.spec
        return dataclasses.replace(self.spec, prompt_layout="raw")


def generation_defaults(directory: str) -> GenerationSettings:
    """The decoding defaults saved in `directory`'s generation_config.json (the library's defaults
    where it has none)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(directory)
    except OSError:
        config = None
    return GenerationSettings.from_model(SimpleNamespace(generation_config=config))


def resolve_source(name: str, seed: int = 0) -> ModelSource:
    """The `ModelSource` of a preset, alias, shipped checkpoint, hub id, model directory, adapter
    bundle or object-storage URI (copied to the local cache first); no weights are loaded.

    seed: the seed a preset is built with (an adapter bundle's base uses the seed its bundle states).
    """
    from deepsynth import storage

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model {name!r}: give a preset (tiny, ...), a model directory or a hub id")
    backend = preset_backend(name)
    if backend is not None:
        spec = default_spec(backend, None, backend.render_of_preset(name), crop_mode="none")
        spec.base_model, spec.base_seed = name, seed
        return ModelSource(name, None, backend, spec, has_bundle=False, seed=seed)
    local = str(storage.local_input(name, what="model")) if storage.is_uri(name) else name
    path = resolve(local)
    folder = Path(path)
    if not folder.exists() and (folder.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1):
        # a hub id is "name" or "owner/name": anything else is a folder that is not there
        raise FileNotFoundError(f"no model directory {path!r}: give an existing folder, a preset "
                                f"({', '.join(sorted(_preset_names()))}), a shipped checkpoint (tiny-reader, form-reader), an alias or "
                                "a hub id (owner/name)")
    spec = read_spec(folder) if folder.is_dir() else None
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        config = json.loads(adapter_config.read_text())
        base_name = (spec.base_model if spec else None) or config.get("base_model_name_or_path")
        if not base_name:
            raise BundleError(f"{path}: adapters without a base model (no base_model in {BUNDLE_FILE} or "
                              "base_model_name_or_path in adapter_config.json)")
        base_seed = spec.base_seed if spec is not None and spec.base_seed is not None else 0
        base = resolve_source(base_name, seed=base_seed)
        own = spec if spec is not None else dataclasses.replace(base.spec, weights="adapter", base_model=base_name)
        return ModelSource(name, path, base.backend, own, has_bundle=spec is not None, seed=base_seed,
                           adapter=path, base=base)
    config, where = read_config(path)
    backend = backend_for_config(config, where)
    if spec is not None:
        return ModelSource(name, path, backend, spec, has_bundle=True, config=config, seed=seed)
    spec = default_spec(backend, None, backend.render_preset, backend.default_crop_mode)
    spec.base_model = name
    logger.warning("%s has no %s: assuming %s pages (preset %r), %s prompts and the model's own "
                   "decoding defaults", name, BUNDLE_FILE, backend.name, backend.render_preset, spec.prompt_layout)
    return ModelSource(name, path, backend, spec, has_bundle=False, config=config, seed=seed)


def _preset_names() -> list[str]:
    from deepsynth.models.registry import BACKENDS

    return [name for backend in BACKENDS.values() for name in backend.presets]


# ---- load ----------------------------------------------------------------------------------------
def load_bundle(name: str | ModelSource, dtype: torch.dtype | None = None, seed: int = 0,
                merge_adapters: bool = True) -> LoadedModel:
    """(model, processor, spec) for a preset, alias, hub id, model directory or URI, or for a
    `ModelSource` already resolved (`resolve_source`: nothing is read again).

    Presets ("tiny", "tiny-qwen2-vl", ...) are randomly initialised (seeded) tiny models of the real
    classes; "tiny-reader" (the default) and "form-reader" are the shipped pre-trained tiny readers. An adapter bundle loads its base
    model and applies the adapters (merged unless `merge_adapters=False`).
    """
    source = name if isinstance(name, ModelSource) else resolve_source(name, seed=seed)
    backend = source.backend
    if source.is_preset:
        model, processor = backend.presets[source.name](seed=source.seed)
        if dtype is not None:
            model = model.to(dtype)
        spec = source.spec_for(processor)
        backend.configure_processor(processor, spec.crop_mode)
        return LoadedModel(guard_forward(model), processor, spec)
    if source.adapter is not None:
        base = load_bundle(source.base, dtype=dtype)
        return apply_adapter(base, source.adapter, source.base.name, source.spec if source.has_bundle else None,
                             merge_adapters)
    logger.info("loading %s with backend %s", source.path, backend.name)
    model, processor = backend.load(source.path, dtype=dtype, config=source.config)
    spec = source.spec_for(processor)
    return LoadedModel(_apply_spec(guard_forward(model), processor, spec, source.directory), processor, spec)


def load_model(name: str, dtype: torch.dtype | None = None, seed: int = 0):
    """(model, processor) of `load_bundle` (see there)."""
    loaded = load_bundle(name, dtype=dtype, seed=seed)
    return loaded.model, loaded.processor


def apply_adapter(base: LoadedModel, adapter: str | Path, base_name: str = "", spec: ModelSpec | None = None,
                  merge: bool = True) -> LoadedModel:
    """`base` with the LoRA adapters of `adapter` (merged unless `merge=False`); the adapter bundle's
    spec when it has one, else the base's."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter directory {str(path)!r} has no adapter_config.json")
    spec = spec or read_spec(path)
    if isinstance(base.model, SoftPromptModel):
        raise BundleError(f"{path}: the base model {base_name!r} carries a text-encoder channel; adapters go on "
                          "a plain model")
    model = load_adapters(base.model, path)
    if merge:
        model = model.merge_and_unload()
        logger.info("merged LoRA adapter %s into %s", path, base_name)
    if spec is None:
        spec = dataclasses.replace(base.spec, weights="adapter", base_model=base_name)
    model = _apply_spec(model, base.processor, spec, path)
    return LoadedModel(model, base.processor, spec)


def spec_of_loaded(model, processor) -> ModelSpec:
    """Spec of a model object loaded without its bundle: its backend's defaults for tiny models."""
    base = model.model if isinstance(model, SoftPromptModel) else model
    backend = backend_of(base)
    spec = default_spec(backend, processor, backend.preset_render, crop_mode=None)
    if isinstance(model, SoftPromptModel):
        spec.instruction_channel = model.channel()
    return spec


def resolve_render(spec: ModelSpec, preset: str | None = None, **overrides) -> RenderConfig:
    """The bundle's render config, or `preset` (with a warning when it differs from the bundle)."""
    config = spec.render_config()
    if preset is not None:
        asked = RenderConfig.from_preset(preset, **overrides)
        if asked != config:
            logger.warning("render preset %r differs from the pages this model was trained on (%s); "
                           "using %r as asked", preset, _describe(config), preset)
        return asked
    return dataclasses.replace(config, **overrides) if overrides else config


def resolve_generation(model, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
    """The model's decoding defaults with `overrides` (warning for each that changes a default)."""
    base = settings or GenerationSettings.from_model(model)
    for key, value in overrides.items():
        if getattr(base, key) != value:
            logger.warning("decoding %s=%r overrides the model's default %r", key, value, getattr(base, key))
    return base.replace(**overrides)


def _describe(config: RenderConfig) -> str:
    return f"{config.page_width}x{config.page_height} px, {config.font} {config.font_size} px"
