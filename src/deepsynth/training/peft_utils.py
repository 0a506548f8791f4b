"""Parameter-efficient training helpers: LoRA targets per backend, frozen vision, trainable-parameter
report, QLoRA (4-bit base through bitsandbytes), gradient checkpointing, adapter upload.

All of it is peft / transformers / huggingface_hub; this module only decides *what* to apply to
which backbone. `deepsynth.training.trainer.apply_training_options` calls these in order.

Which sub-modules are the vision tower, projector and decoder, which projections LoRA adapts and
how parameters are grouped in the report is model anatomy: it comes from `deepsynth.models.anatomy`
(and, per family, from the model's backend), not from this file. The anatomy names are re-exported
here for the training code that reads them as `peft_utils.<name>`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from deepsynth.models.adapters import load_adapters  # noqa: F401  (re-exported for training code)
from deepsynth.models.anatomy import (  # noqa: F401  (re-exported: training code reads them from here)
    DECODER_NAMES, LORA_PROJECTIONS, PROJECTOR_INSIDE_VISION, REPORT_GROUPS, VISION_TOWER_NAMES, backend_or_none,
    find_decoder, find_vision_tower, generic_parameter_group, lora_target_modules, lora_target_parameters,
    named_submodule)
from deepsynth.models.push import resolve_token

logger = logging.getLogger(__name__)


def freeze_vision(model: nn.Module) -> int:
    """Freeze the vision tower, keeping a projector that lives inside it (Qwen2-VL's merger)
    trainable. Returns the number of parameters frozen."""
    _, tower = find_vision_tower(model)
    frozen = 0
    for name, param in tower.named_parameters():
        if any(part in PROJECTOR_INSIDE_VISION for part in name.split(".")):
            continue
        if param.requires_grad:
            frozen += param.numel()
        param.requires_grad_(False)
    return frozen


def lora_config(model: nn.Module, config) -> "LoraConfig":  # noqa: F821 (peft imported lazily)
    """peft LoraConfig from TrainerConfig's lora_rank / lora_alpha / lora_dropout / lora_experts and
    this backbone's targets.

    With expert targets the config's dropout is 0: peft's LoRA on a bare parameter (`ParamWrapper`)
    has no dropout (it refuses one). `apply_lora` puts lora_dropout back on the nn.Linear adapters.
    """
    from peft import LoraConfig

    experts = lora_target_parameters(model, getattr(config, "lora_experts", True))
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=0.0 if experts else config.lora_dropout,
                      target_modules=lora_target_modules(model), target_parameters=experts or None)


def apply_lora(model: nn.Module, config) -> nn.Module:
    """`get_peft_model` with `lora_config(model, config)`; when the experts are adapted (no dropout
    possible there), the nn.Linear adapters still get `config.lora_dropout`."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    peft_config = lora_config(model, config)
    wrapped = get_peft_model(model, peft_config)
    if peft_config.target_parameters and config.lora_dropout > 0:
        restored = 0
        for module in wrapped.modules():
            if isinstance(module, LoraLinear):
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = nn.Dropout(p=config.lora_dropout)
                    restored += 1
        logger.info("LoRA on %s: dropout %.3g on the %d nn.Linear adapters, none on the expert parameters "
                    "(peft cannot drop out inside a fused parameter)",
                    peft_config.target_parameters, config.lora_dropout, restored)
    return wrapped


# ---- report ------------------------------------------------------------------------------------
def trainable_parameter_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts: overall, per part (vision / decoder / lora / other), and
    per group (attention, dense MLP, shared experts, routed experts, router, vision, projector,
    embeddings, norms, other), where a LoRA adapter counts in the group of the weight it adapts and
    `lora` says how many of a group's parameters are adapters.

    4-bit parameters (bitsandbytes packs two values per byte) are counted by their logical size.
    """
    vision = named_submodule(model, VISION_TOWER_NAMES)
    decoder = named_submodule(model, DECODER_NAMES)
    backend = backend_or_none(model)
    group_of = (backend.parameter_group if backend is not None else None) or generic_parameter_group
    parts: dict[str, dict[str, int]] = {}
    groups: dict[str, dict[str, int]] = {}
    total = trainable = 0
    for name, param in model.named_parameters():
        n = param.numel() * (2 if getattr(param, "quant_type", None) in ("nf4", "fp4") else 1)
        is_lora = "lora_" in name
        if is_lora:
            part = "lora"
        elif vision and name.startswith(vision[0] + "."):
            part = "vision"
        elif decoder and name.startswith(decoder[0] + "."):
            part = "decoder"
        else:
            part = "other"  # projector, lm_head, text encoder, ...
        entries = (parts.setdefault(part, {"trainable": 0, "total": 0}),
                   groups.setdefault(group_of(name), {"trainable": 0, "total": 0, "lora": 0}))
        total += n
        for entry in entries:
            entry["total"] += n
            if param.requires_grad:
                entry["trainable"] += n
        entries[1]["lora"] += n if is_lora else 0
        if param.requires_grad:
            trainable += n
    order = {g: i for i, g in enumerate(REPORT_GROUPS)}
    groups = dict(sorted(groups.items(), key=lambda kv: order.get(kv[0], len(order))))
    return {"trainable": trainable, "total": total, "percent": round(100 * trainable / max(total, 1), 4),
            "parts": parts, "groups": groups}


def format_report(report: dict) -> str:
    """The report as text: one line overall, then one per group (LoRA adapters counted in the group
    they adapt)."""
    lines = [f"trainable parameters: {report['trainable']:,} of {report['total']:,} ({report['percent']:.2f}%)",
             f"  {'group':<15} {'trainable':>14} {'of which LoRA':>14} {'total':>15}"]
    for group, entry in report["groups"].items():
        lines.append(f"  {group:<15} {entry['trainable']:>14,} {entry['lora']:>14,} {entry['total']:>15,}")
    return "\n".join(lines)


# ---- gradient checkpointing --------------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute activations in backward (less memory, ~30% more compute). Non-reentrant
    checkpointing, so frozen embeddings (LoRA, frozen vision) still pass gradients on."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # A KV cache is useless in training and conflicts with recomputation. Composite models keep
    # `use_cache` on each part's own config (the language model's, the vision encoder's), which is
    # what their forward reads.
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False
    return model


# ---- QLoRA -------------------------------------------------------------------------------------
QLORA_NEEDS_CUDA = ("use_qlora: QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels run on CUDA), "
                    "and none is visible here. Use use_lora: true without use_qlora on this machine, "
                    "or run on a CUDA GPU with `pip install bitsandbytes`.")


def check_qlora_available() -> None:
    """RuntimeError with the reason when QLoRA cannot run here (no CUDA GPU, or no bitsandbytes)."""
    if not torch.cuda.is_available():
        raise RuntimeError(QLORA_NEEDS_CUDA)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError("use_qlora: bitsandbytes is not installed; run `pip install bitsandbytes` "
                           "on this CUDA machine") from err


def bnb_4bit_config(skip_modules: list[str]):
    """The QLoRA recipe: NF4 weights, double quantisation, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip_modules)


def quantize_base_4bit(model: nn.Module) -> nn.Module:
    """The same model with its decoder in 4-bit (bitsandbytes NF4), on this process's GPU.

    Goes through transformers' own quantised loading (`from_pretrained(quantization_config=...)`):
    the model as it is now is written to a temporary directory and read back quantised. The vision
    tower, projector and lm_head stay in bf16 (`llm_int8_skip_modules`). Already-quantised models
    are returned unchanged.
    """
    check_qlora_available()
    if getattr(model, "is_loaded_in_4bit", False):
        return model
    from accelerate import PartialState

    skip = ["lm_head"]
    vision = named_submodule(model, VISION_TOWER_NAMES)
    if vision:
        skip.append(vision[0].rsplit(".", 1)[-1])
    skip += [n for n in ("multi_modal_projector", "connector", "merger") if named_submodule(model, (n,))]
    with tempfile.TemporaryDirectory(prefix="deepsynth-qlora-") as tmp:
        model.save_pretrained(tmp)
        quantized = type(model).from_pretrained(tmp, quantization_config=bnb_4bit_config(skip), dtype=torch.bfloat16,
                                                device_map={"": PartialState().local_process_index})
    if hasattr(quantized.config, "vision_readout"):  # DeepSeek-OCR-2's readout is a module swap, redo it
        from deepsynth.models.deepseek_ocr2 import apply_vision_readout

        quantized = apply_vision_readout(quantized)
    quantized.generation_config = model.generation_config
    logger.info("QLoRA: decoder loaded in 4-bit NF4 (kept in bf16: %s)", skip)
    return quantized


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


# ---- adapters on the hub -----------------------------------------------------------------------
def peft_model_of(model: nn.Module):
    """The peft model inside `model` (itself, or the decoder of a text-encoder wrapper); ValueError if none."""
    from peft import PeftModel

    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, PeftModel):
            return candidate
    raise ValueError("this model has no LoRA adapters to push (train with use_lora: true)")


def push_adapters_to_hub(model: nn.Module | str | os.PathLike, repo_id: str, token: str | None = None,
                         private: bool = False, processor=None,
                         commit_message: str = "Upload DeepSynth LoRA adapters") -> str:
    """Upload LoRA adapters to `repo_id` (created if needed); returns the repo URL.

    model: a model carrying peft adapters (saved to a temporary directory first), or a directory
           written by peft's `save_pretrained` (e.g. the trainer's `output_dir/adapter`).
    The upload holds adapter_config.json + adapter_model.safetensors, a model card, and the
    processor when given. The token comes from `token`, HF_TOKEN or the stored `hf auth login`,
    and is never printed or logged.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=resolve_token(token))
    with tempfile.TemporaryDirectory(prefix="deepsynth-adapters-") as tmp:
        if isinstance(model, (str, os.PathLike)):
            source = Path(model)
            if not (source / "adapter_config.json").is_file():
                raise ValueError(f"{source} has no adapter_config.json (not a peft adapter directory)")
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            import json

            base = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
        else:
            peft_model = peft_model_of(model)
            peft_model.save_pretrained(tmp)
            base = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
        if processor is not None:
            processor.save_pretrained(tmp)
        card = Path(tmp, "README.md")
        if not card.exists():
            card.write_text(
                f"---\nlibrary_name: peft\nbase_model: {base}\ntags: [deepsynth, lora]\n---\n\n"
                f"# {repo_id}\n\nLoRA adapters trained with DeepSynth on `{base}`.\n\n"
                "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, "
                f"\"{repo_id}\")\n```\n")
        files = sorted(p.name for p in Path(tmp).iterdir())
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=tmp, repo_id=repo_id, repo_type="model", commit_message=commit_message)
    logger.info("pushed LoRA adapters to %s (%s)", repo_id, ", ".join(files))
    return str(url)
