"""Model anatomy: where a vision-language backbone keeps its vision tower, projector and decoder,
which of its projections LoRA adapts, and which report group each parameter belongs to.

Backbones differ in where their parts live (checked on transformers 5):

=================  ==========================  =============================  ==========================
backend            vision tower                projector (stays trainable)    decoder (LoRA targets)
=================  ==========================  =============================  ==========================
DeepSeek-OCR-2     model.vision_tower          model.multi_modal_projector    model.language_model
Qwen2-VL / 2.5-VL  model.visual                model.visual.merger            model.language_model
Idefics3 / SmolVLM model.vision_model          model.connector                model.text_model
=================  ==========================  =============================  ==========================

LoRA goes on the decoder's attention and MLP projections (q/k/v/o, gate/up/down, and DeepSeek's
MLA projections when present). The DeepSeek decoders' routed experts are fused 3-D parameters that
peft reaches through `target_parameters`; which parameters those are, and how parameters are
grouped in reports, comes from the model's backend (`deepsynth.models.backend.Backend`).

This is model knowledge, so it lives with the models: the trainer's peft code
(`deepsynth.training.peft_utils`) and the memory estimate (`deepsynth.models.memory`) both read it.
"""

from __future__ import annotations

import re

from torch import nn

VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")
# Sub-modules of a vision tower that are really the vision->text projector (trainable when vision is frozen).
PROJECTOR_INSIDE_VISION = ("merger",)
DECODER_NAMES = ("language_model", "text_model")
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def named_submodule(model: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The shallowest sub-module whose own name is one of `names` (works through peft/soft-prompt wrappers)."""
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    return min(found, key=lambda nm: nm[0].count(".")) if found else None


def find_vision_tower(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the model's vision tower; ValueError when it has none."""
    found = named_submodule(model, VISION_TOWER_NAMES)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no vision tower (looked for sub-modules named {VISION_TOWER_NAMES})")
    return found


def find_decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the language decoder."""
    found = named_submodule(model, DECODER_NAMES)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no language decoder (looked for {DECODER_NAMES})")
    return found


def lora_target_modules(model: nn.Module) -> str:
    """A regex (peft `target_modules`, full match) for the decoder's attention/MLP projections.

    Built from the model's own module names with layer indices generalised to `\\d+`, so it names
    exactly the `nn.Linear` projections of this backbone's decoder and nothing in the vision tower.
    """
    prefix, decoder = find_decoder(model)
    patterns: list[str] = []
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_PROJECTIONS:
            pattern = re.escape(f"{prefix}.{name}")
            pattern = re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", pattern)  # layer index -> \d+
            if pattern not in patterns:
                patterns.append(pattern)
    if not patterns:
        raise ValueError(f"no LoRA target projections {LORA_PROJECTIONS} found in {prefix}")
    return "^(?:" + "|".join(patterns) + ")$"


# ---- family knowledge comes from the model's backend ----------------------------------------------
def backend_or_none(model: nn.Module):
    """The backend of this model (seen through peft and soft-prompt wrappers), None when no backend
    serves its model_type (e.g. a bare test module)."""
    from deepsynth.models.registry import backend_of

    try:
        return backend_of(model)
    except ValueError:
        return None


def lora_target_parameters(model: nn.Module, experts: bool = True) -> list[str]:
    """peft `target_parameters` for this backbone: its fused routed-expert parameters when `experts`
    (empty for dense decoders and families that keep every target in nn.Linear)."""
    backend = backend_or_none(model)
    if not experts or backend is None:
        return []
    return list(backend.lora_target_parameters(model))


# ---- report groups ------------------------------------------------------------------------------
REPORT_GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "router", "vision", "projector",
                 "embeddings", "norms", "other")
_GENERIC_GROUPS = (  # transformers' usual names, for families without their own `parameter_group`
    ("vision", re.compile(r"(^|\.)(vision_tower|visual|vision_model|vision_encoder|image_encoder)\.")),
    ("projector", re.compile(r"(^|\.)(multi_modal_projector|connector|merger)\.")),
    ("embeddings", re.compile(r"(^|\.)(embed_tokens|lm_head|wte|wpe)\.")),
    ("routed_experts", re.compile(r"\.experts\.")),
    ("shared_experts", re.compile(r"\.shared_experts?\.")),
    ("attention", re.compile(r"\.(self_attn|attention|attn)\.")),
    ("dense_mlp", re.compile(r"\.(mlp|feed_forward)\.")),
    ("norms", re.compile(r"norm")),
)


def generic_parameter_group(name: str) -> str:
    """Report group of a parameter by transformers' usual module names."""
    for group, pattern in _GENERIC_GROUPS:
        if pattern.search(name):
            return group
    return "other"
