"""What a model family must tell the rest of the project: one `Backend` per family module.

Each family module (`deepseek_ocr2`, `deepseek_ocr_v1`, `generic`) defines a `BACKEND`; the registry
collects them. Training, evaluation, the engine and the memory estimate ask the backend instead of
testing model classes, so adding a family is adding one module (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


def _no_processor_settings(processor, crop_mode: str | None) -> None:
    if crop_mode not in (None, "none"):
        raise ValueError(f"crop_mode={crop_mode!r}: this model family has no local crops (use 'none')")


@dataclass(frozen=True)
class Backend:
    """How one family of checkpoints is loaded, prompted and fine-tuned.

    name:            registry key, also written in the bundle ("deepseek-ocr-2", ...).
    model_types:     config.json `model_type` values this backend serves.
    recognizes:      config.json (dict) -> True when this backend serves the checkpoint whatever its
                     `model_type` says; tried before `model_types`, for layouts whose model_type is
                     shared between families (DeepSeek's remote-code `deepseek_vl_v2`). None = by type only.
    load:            (path or hub id, dtype, config) -> (model, processor), with `from_pretrained`;
                     config is config.json as `resolve_source` read it (None: the loader reads it).
    presets:         offline tiny models of this family: name -> builder(seed) -> (model, processor).
    aliases:         short names of real checkpoints ("deepseek-ocr-2" -> hub id).
    prompt_layout:   layout of checkpoints and presets without a bundle: "plain" (BOS +
                     `<image>...\\n{instruction}`, what DeepSeek-OCR models were trained on), "raw"
                     (`<image>...\\n{instruction}\\n`) or "chat-template" (the processor's chat
                     template, for chat VLMs).
    render_preset:   render preset for pages drawn from text when a checkpoint has no bundle.
    preset_render:   render preset of the tiny presets.
    real_size_presets: presets with the released model's sizes (random weights): their pages are
                     `render_preset`'s, the size the real model reads, not `preset_render`'s.
    encodes_pages:   the model accepts pre-computed page features (`mm_encoder_outputs`), so the
                     engine may cache them per document.
    configure_processor: (processor, crop_mode) -> None; applies the bundle's crop mode
                     ("none": one global view per page, "tiles": local crops as well; None: as saved).
    default_crop_mode: crop mode of checkpoints without a bundle (None = the processor's own).
    lora_target_parameters: model -> names of fused parameters (e.g. routed experts) that LoRA must
                     reach through peft `target_parameters`; empty when every target is an nn.Linear.
    parameter_group: parameter name -> group for the trainable-parameter report (attention,
                     dense_mlp, shared_experts, routed_experts, vision, ...); None = generic groups.
    image_tokens:    (config, page width, page height, crop_mode) -> decoder tokens that one page
                     becomes, local crops counted; what `deepsynth.models.memory` estimates with
                     (it has a config, not a processor). None = the family cannot say.
    vision_tokens:   (config, vision stack name, page side, crop_mode) -> tokens through that stack
                     for one square page, summed over its views (global view and crops); used for
                     the activations of a trainable vision tower. None = the family cannot say.
    """

    name: str
    model_types: tuple[str, ...]
    load: Callable[..., tuple[torch.nn.Module, object]]
    recognizes: Callable[[dict], bool] | None = None
    presets: Mapping[str, Callable[..., tuple]] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    prompt_layout: str = "raw"
    render_preset: str = "large"
    preset_render: str = "tiny"
    real_size_presets: tuple[str, ...] = ()
    encodes_pages: bool = False
    configure_processor: Callable[[object, str | None], None] = _no_processor_settings
    default_crop_mode: str | None = None
    lora_target_parameters: Callable[[torch.nn.Module], list[str]] = lambda model: []
    parameter_group: Callable[[str], str] | None = None
    image_tokens: Callable[[object, int, int, str], int] | None = None
    vision_tokens: Callable[[object, str, int, str], int] | None = None

    def render_of_preset(self, preset: str) -> str:
        """Render preset of the pages preset model `preset` reads."""
        return self.render_preset if preset in self.real_size_presets else self.preset_render
