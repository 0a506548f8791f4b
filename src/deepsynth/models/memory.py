"""Training-memory estimates built on the `meta` device from real configs (no weights, no download).

`estimate_memory("deepseek-ocr-2", lora=True, text_encoder="Qwen/Qwen2.5-7B", batch_size=4)` builds
the model (and text encoder) with `torch.device("meta")`, counts parameters and trainable
parameters exactly, and estimates per-GPU bytes for weights, gradients, AdamW states and
activations. `deepsynth estimate-memory` prints it; docs/memory.md holds the table for the common
configurations (regenerate with `python -m deepsynth.models.memory`).

Byte model (per GPU, no sharding; FSDP/ZeRO divide weights/grads/optimizer by the GPU count):

* weights: parameters x bytes of `precision` (bf16/fp16 2, fp32 4). transformers 5 loads
  checkpoints in their own dtype (bf16 for all models here), and the trainer keeps that dtype.
  QLoRA: decoder `nn.Linear` weights in NF4 with double quantisation, 0.5 + 0.127/8 bytes each;
  everything else (embeddings, norms, vision tower, lm_head) in bf16.
* gradients: trainable parameters x bytes of their dtype.
* optimizer: AdamW keeps two moments per trainable parameter in the parameter's dtype.
  LoRA adapters are kept in fp32 by peft (`autocast_adapter_dtype`), so they cost 4+4+8 bytes.
* activations (what autograd keeps for backward), per token of the decoder, in `precision`:
  attention 10h + 4*kv_dim (norm, q/k/v, rotary copies, output), dense SwiGLU MLP 2h + 4i, MoE MLP
  2h + 4*i_e*(top_k + shared) + experts (calibrated against autograd's saved tensors on the tiny
  presets, see tests/models/test_memory.py);
  plus the loss's buffers (vocab x (2 + 4 + 4 + 2) bytes at bf16: logits, their fp32 copy, the fp32
  log-probabilities kept for backward, the logits' gradient) and, with LoRA dropout, each adapted
  nn.Linear's dropped-out input and mask. SDPA/flash
  attention is assumed (no seq^2 score matrix). Gradient checkpointing keeps one h-vector per
  layer plus one layer's activations. A trainable vision tower adds 8h + 3i per vision token and
  layer; a frozen one (LoRA, freeze_vision) keeps nothing. One page per example.
* pages: image tokens and vision tokens per page come from the model's backend
  (`Backend.image_tokens` / `vision_tokens`), in the asked crop mode (`crops`: the global view plus
  local crops, DeepSeek-OCR-2 at 1024 px: 257 -> 833 image tokens).
* LoRA on fused routed experts (`lora_experts`, peft `target_parameters`): r x experts x (a + b)
  adapter parameters per (experts, a, b) tensor; peft folds the adapters into a new copy of each
  expert tensor at every forward, and the experts' matmuls keep that copy for backward, so the
  activations hold one copy of all adapted expert weights (4.5 GiB for DeepSeek-OCR-2 in bf16).
These are estimates (expect +-25%); add about 1 GiB per GPU for the CUDA context and allocator.
`deepsynth check-real-size` measures the real architecture against them (docs/memory.md).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from deepsynth.models.anatomy import (DECODER_NAMES, VISION_TOWER_NAMES, lora_target_modules, lora_target_parameters,
                                      named_submodule)
from deepsynth.models.deepseek_ocr2 import CHECKPOINT, real_config

GiB = 1024**3
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits + double-quantised absmax constants
TEXT_TOKENS = 512  # instruction + answer tokens per example in the default sequence length
INSTRUCTION_TOKENS = 128  # text-encoder tokens per instruction (TextEncoderModule's default max_length)

QWEN25_7B = "Qwen/Qwen2.5-7B"
QWEN25_VL_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ---- real configs reproduced in code -----------------------------------------------------------
def qwen2_5_vl_7b_config():
    """Qwen/Qwen2.5-VL-7B-Instruct (8.29B parameters)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], spatial_merge_size=2,
                  temporal_patch_size=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def qwen2_5_7b_config():
    """Qwen/Qwen2.5-7B as a text encoder (the decoder stack without lm_head: 7.07B parameters)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072)


def minilm_config():
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M parameters)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512)


def _real_v1_config():
    from deepsynth.models.deepseek_ocr_v1 import real_v1_config

    return real_v1_config()


VLM_CONFIGS = {"deepseek-ocr-2": real_config, CHECKPOINT: real_config, QWEN25_VL_7B: qwen2_5_vl_7b_config,
               "deepseek-ocr": _real_v1_config, "deepseek-ai/DeepSeek-OCR": _real_v1_config,
               # the real-size check's presets: the real architectures with random weights
               "random-deepseek-ocr-2": real_config, "random-deepseek-ocr": _real_v1_config}
TEXT_ENCODER_CONFIGS = {QWEN25_7B: qwen2_5_7b_config, "qwen2.5-7b": qwen2_5_7b_config,
                        # the default text encoder (TextEncoderModule()): the same stack as the base model
                        "Qwen/Qwen2.5-7B-Instruct": qwen2_5_7b_config,
                        MINILM: minilm_config, "all-MiniLM-L6-v2": minilm_config, "minilm": minilm_config}


def build_meta_model(name: str) -> nn.Module:
    """The vision-language model `name` without weights: a known config, a tiny preset, a local
    directory, or a hub id whose config is reachable (cache or network)."""
    from deepsynth.models.registry import CHECKPOINT_DIR, preset_backend

    if name in VLM_CONFIGS:
        config = VLM_CONFIGS[name]()
    elif (CHECKPOINT_DIR / name / "config.json").is_file() or preset_backend(name) is not None:
        from deepsynth.models.bundle import load_model

        return load_model(name)[0]  # tiny presets, a few MB: built for real
    else:
        from transformers import AutoConfig

        from pathlib import Path

        from deepsynth.models.registry import backend_for_checkpoint, resolve

        if Path(resolve(name)).is_dir():  # a type no backend serves: say so, not transformers' list of all types
            backend_for_checkpoint(resolve(name))
        config = _config_or_error(AutoConfig.from_pretrained, resolve(name), name, VLM_CONFIGS)
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def build_meta_text_encoder(name: str) -> nn.Module:
    if name == "tiny-qwen2":
        from deepsynth.models.text_encoder import build_tiny_text_encoder

        return build_tiny_text_encoder()[0]
    from transformers import AutoConfig, AutoModel

    config = TEXT_ENCODER_CONFIGS[name]() if name in TEXT_ENCODER_CONFIGS else \
        _config_or_error(AutoConfig.from_pretrained, name, name, TEXT_ENCODER_CONFIGS)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _config_or_error(load, path: str, name: str, known: dict):
    try:
        return load(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the config of {name!r} (offline and not cached?): {err}. "
                         f"Configs built in: {sorted(known)}; or pass a local save_pretrained directory") from None


# ---- architecture summaries --------------------------------------------------------------------
@dataclass
class Stack:
    """A stack of identical transformer layers and the tokens that flow through it per example."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    tokens: int


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _backend(model: nn.Module):
    from deepsynth.models.registry import backend_for_type

    return backend_for_type(getattr(model.config, "model_type", None), type(model).__name__)


def vision_stacks(model: nn.Module, page_size: int = 1024, crop_mode: str = "none") -> list[Stack]:
    """The vision tower's layer stacks (ModuleLists), with tokens per page (all views) from the
    family's `vision_tokens`."""
    found = named_submodule(model, VISION_TOWER_NAMES)
    if not found:
        return []
    backend = _backend(model)
    if backend.vision_tokens is None:
        raise ValueError(f"backend {backend.name!r} cannot say how many vision tokens a page makes "
                         "(Backend.vision_tokens)")
    prefix, tower = found
    stacks = []
    for name, module in tower.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not _linears(module[0]):
            continue
        lin = _linears(module[0])
        hidden = lin[0].in_features
        stacks.append(Stack(f"{prefix}.{name}", len(module), hidden, max(m.out_features for m in lin),
                            backend.vision_tokens(model.config, name, page_size, crop_mode)))
    return stacks


def image_tokens_per_page(model: nn.Module, page_size: int = 1024, crop_mode: str = "none") -> int:
    """Decoder tokens that one square page of `page_size` pixels becomes in `crop_mode` (the
    family's `image_tokens`: DeepSeek-OCR-2 at 1024 px: 257 without crops, 833 with 2 x 2 crops)."""
    backend = _backend(model)
    if backend.image_tokens is None:
        raise ValueError(f"backend {backend.name!r} cannot say how many image tokens a page makes "
                         "(Backend.image_tokens); pass seq_len")
    return backend.image_tokens(model.config, page_size, page_size, crop_mode)


def _decoder_per_token_elements(text) -> tuple[float, int]:
    """(activation elements kept per token over all decoder layers, number of layers)."""
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    attn = 10 * h + 4 * kv_dim  # norm, q/k/v, rotary copies, attention output, o_proj input
    layer_types = getattr(text, "mlp_layer_types", None) or ["dense"] * text.num_hidden_layers
    total = 0.0
    for kind in layer_types:
        if kind == "sparse":
            active = getattr(text, "num_experts_per_tok", 0) + getattr(text, "n_shared_experts", 0)
            total += attn + 2 * h + 4 * text.moe_intermediate_size * active + getattr(text, "n_routed_experts", 0)
        else:
            total += attn + 2 * h + 4 * text.intermediate_size  # norm, gate/up outputs, act, product
    return total, len(layer_types)


# ---- the estimate ------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    model: str
    method: str  # "full", "lora", "qlora"
    text_encoder: str | None
    options: list[str]  # "frozen vision", "grad ckpt", "encoder trainable", "crops", "experts frozen"
    precision: str
    batch_size: int
    seq_len: int
    parameters: int
    trainable_parameters: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_memory(model: str, lora: bool = False, text_encoder: str | None = None, batch_size: int = 1,
                    precision: str = "bf16", seq_len: int | None = None, qlora: bool = False,
                    lora_rank: int = 16, freeze_vision: bool = False, text_encoder_trainable: bool = False,
                    gradient_checkpointing: bool = False, page_size: int = 1024, crops: bool = False,
                    lora_experts: bool = True, text_tokens: int = TEXT_TOKENS,
                    lora_dropout: float = 0.05) -> MemoryEstimate:
    """Parameters, trainable parameters and per-GPU memory for training `model` (see module doc).

    crops:        pages in crop mode "tiles" (global view + local crops; DeepSeek-OCR-2 at 1024 px:
                  833 image tokens instead of 257), else one global view.
    lora_experts: LoRA reaches the routed experts too (TrainerConfig.lora_experts).
    text_tokens:  instruction + answer tokens per example, added to the page's image tokens (when
                  seq_len is not given).
    lora_dropout: TrainerConfig.lora_dropout; above 0 every adapted nn.Linear keeps its dropped-out
                  input (and the mask) for backward.
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_BYTES)}, got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    lora = lora or qlora
    net = build_meta_model(model)
    pbytes = PRECISION_BYTES[precision]
    act_bytes = 2 if qlora else pbytes
    text = net.config.get_text_config()
    crop_mode = "tiles" if crops else "none"
    seq = seq_len or image_tokens_per_page(net, page_size, crop_mode) + text_tokens
    tokens = batch_size * seq

    # The additions below keep one order (decoder, dropout, logits, vision, folded experts, text
    # encoder): float sums in another order could move the estimate's last digits.
    adapters = _lora_adapters(net, lora_rank, lora_experts) if lora else None
    fp = _parameter_bytes(net, adapters, qlora, freeze_vision, pbytes)
    fp.activations += _decoder_activation_bytes(text, tokens, act_bytes, gradient_checkpointing)
    if adapters is not None and lora_dropout > 0:
        # each adapted nn.Linear drops out its own copy of its input and keeps it with the mask
        fp.activations += tokens * sum(m.in_features for m in adapters.targets) * (act_bytes + 1)
    fp.activations += _logits_bytes(text, tokens, act_bytes)
    if not lora and not freeze_vision:
        fp.activations += _vision_activation_bytes(net, batch_size, page_size, crop_mode, act_bytes)
    if adapters is not None and adapters.fused:
        folded = _folded_expert_bytes(adapters, act_bytes)
        fp.activations += folded
        fp.notes.append(f"expert LoRA: {_gib(folded):.2f} GiB of folded expert weights kept for backward")
    if text_encoder:
        _add_text_encoder(fp, text_encoder, text_encoder_trainable, text.hidden_size, batch_size, pbytes, act_bytes)

    total = fp.weights + fp.gradients + fp.optimizer + fp.activations
    has_experts = lora and bool(lora_target_parameters(net, True))
    options = [label for flag, label in ((freeze_vision and not lora, "frozen vision"),
                                         (gradient_checkpointing, "grad ckpt"),
                                         (text_encoder and text_encoder_trainable, "encoder trainable"),
                                         (crops, "crops"),
                                         (has_experts and not lora_experts, "experts frozen")) if flag]
    return MemoryEstimate(
        model=model, method="qlora" if qlora else "lora" if lora else "full",
        text_encoder=text_encoder or None, options=options,
        precision=precision, batch_size=batch_size, seq_len=seq, parameters=int(fp.parameters),
        trainable_parameters=int(fp.trainable), weights_gib=_gib(fp.weights), gradients_gib=_gib(fp.gradients),
        optimizer_gib=_gib(fp.optimizer), activations_gib=_gib(fp.activations), total_gib=_gib(total),
        notes=fp.notes,
    )


# ---- the estimate's components -----------------------------------------------------------------
@dataclass
class _Footprint:
    """Running totals of one estimate: parameter counts and bytes per GPU."""

    parameters: int  # all parameters, the text encoder and its projection included
    trainable: int  # parameters the optimizer updates
    weights: float  # bytes of the weights as held in training (NF4 ones under QLoRA)
    gradients: float  # bytes of the trainable parameters' gradients
    optimizer: float  # bytes of AdamW's two moments
    activations: float = 0.0  # bytes autograd keeps for backward
    notes: list[str] = field(default_factory=list)  # assumptions worth showing beside the figures


@dataclass
class _Adapters:
    """The LoRA adapters an estimate counts."""

    targets: list[nn.Module]  # the adapted nn.Linear modules
    fused: list[torch.Tensor]  # the adapted fused expert parameters, each (experts, a, b)
    fused_per_layer: int  # fused expert parameters adapted in each layer (peft target_parameters)
    parameters: int  # adapter parameters over both


def _lora_adapters(net: nn.Module, rank: int, experts: bool) -> _Adapters:
    import re

    pattern = lora_target_modules(net)
    targets = [m for n, m in net.named_modules() if re.fullmatch(pattern, n)]
    parameters = sum(rank * (m.in_features + m.out_features) for m in targets)
    # Fused expert parameters (experts, a, b) reached through peft target_parameters: one rank-r
    # pair per expert, r x experts x (a + b) parameters.
    fused_names = lora_target_parameters(net, experts)
    fused = [p for n, p in net.named_parameters() if p.ndim == 3 and any(n.endswith("." + t) for t in fused_names)]
    parameters += sum(rank * p.shape[0] * (p.shape[1] + p.shape[2]) for p in fused)
    return _Adapters(targets, fused, len(fused_names), parameters)


def _parameter_bytes(net: nn.Module, adapters: _Adapters | None, qlora: bool, freeze_vision: bool,
                     pbytes: int) -> _Footprint:
    """Weights, gradients and AdamW states: of every parameter in a full run (the vision tower's
    left out when it is frozen), of the adapters alone (kept in fp32 by peft) with LoRA."""
    params = {n: p.numel() for n, p in net.named_parameters()}
    total_params = sum(params.values())
    vision = named_submodule(net, VISION_TOWER_NAMES)
    vision_params = sum(v for n, v in params.items() if vision and n.startswith(vision[0] + "."))
    fp = _Footprint(parameters=total_params, trainable=0, weights=total_params * pbytes, gradients=0, optimizer=0)
    trainable_base = 0 if adapters is not None else total_params - (vision_params if freeze_vision else 0)
    lora_params = adapters.parameters if adapters is not None else 0
    if qlora:
        # every decoder Linear is quantised (not only the LoRA targets)
        decoder = named_submodule(net, DECODER_NAMES)
        quantized = sum(m.weight.numel() for n, m in net.named_modules()
                        if isinstance(m, nn.Linear) and decoder and n.startswith(decoder[0] + "."))
        fp.weights = (total_params - quantized) * 2 + quantized * NF4_BYTES
        fp.notes.append("qlora: decoder linears in NF4, the rest bf16")
    fp.gradients = trainable_base * pbytes + lora_params * 4
    fp.optimizer = trainable_base * 2 * pbytes + lora_params * 8
    fp.weights += lora_params * 4
    fp.trainable = trainable_base + lora_params
    return fp


def _decoder_activation_bytes(text, tokens: int, act_bytes: int, checkpointing: bool) -> float:
    """What the decoder layers keep for backward; with gradient checkpointing one h-vector per
    layer plus one layer's activations."""
    per_token, layers = _decoder_per_token_elements(text)
    if checkpointing:
        return tokens * (layers * text.hidden_size + per_token / layers) * act_bytes
    return tokens * per_token * act_bytes


def _logits_bytes(text, tokens: int, act_bytes: int) -> int:
    # bf16 logits, their fp32 copy for the loss, the fp32 log-probabilities cross-entropy keeps for
    # backward, and the logits' gradient when backward starts (the real-size check measured 12.5
    # bytes per vocabulary entry and token at bf16).
    return tokens * text.vocab_size * (2 * act_bytes + 8)


def _vision_activation_bytes(net: nn.Module, batch_size: int, page_size: int, crop_mode: str,
                             act_bytes: int) -> float:
    """What a trainable vision tower keeps for backward, stack by stack."""
    vision_act = 0.0
    for stack in vision_stacks(net, page_size, crop_mode):
        vision_act += batch_size * stack.tokens * stack.layers * (8 * stack.hidden + 3 * stack.intermediate) * act_bytes
    return vision_act


def _folded_expert_bytes(adapters: _Adapters, act_bytes: int) -> int:
    # peft folds the adapters into each adapted expert parameter (W + s * B @ A, one baddbmm per
    # forward): the folded copy is a new tensor the experts' matmuls keep for backward, so every
    # sparse layer holds a full copy of its expert weights until its backward runs, whatever the
    # batch; the backward adds one layer's gradient of that copy.
    folded = sum(p.numel() for p in adapters.fused) * act_bytes
    one_layer = sum(p.numel() for p in adapters.fused[:adapters.fused_per_layer]) * act_bytes  # layer by layer
    return folded + one_layer


def _add_text_encoder(fp: _Footprint, name: str, trainable: bool, width: int, batch_size: int, pbytes: int,
                      act_bytes: int) -> None:
    """The text encoder's weights (and, when it trains, its gradients, AdamW states and
    activations) and the projection to the decoder's width `width` (trained, in fp32)."""
    enc = build_meta_text_encoder(name)
    enc_params = sum(p.numel() for p in enc.parameters())
    enc_dim = enc.config.hidden_size
    proj = enc_dim * width + width if enc_dim != width else 0
    fp.parameters += enc_params + proj
    fp.weights += enc_params * pbytes + proj * 4
    fp.gradients += proj * 4
    fp.optimizer += proj * 8
    fp.trainable += proj
    if trainable:
        fp.trainable += enc_params
        fp.gradients += enc_params * pbytes
        fp.optimizer += enc_params * 2 * pbytes
        per_token_enc, _ = _decoder_per_token_elements(enc.config)
        fp.activations += batch_size * INSTRUCTION_TOKENS * per_token_enc * act_bytes
    fp.activations += batch_size * INSTRUCTION_TOKENS * enc_dim * act_bytes  # projection input
    fp.notes.append(f"text encoder {'trainable' if trainable else 'frozen'}, "
                    + (f"projection {enc_dim}->{width}" if proj else "no projection (same width)"))


def _gib(n: float) -> float:
    return round(n / GiB, 4)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_table(estimates: list[MemoryEstimate]) -> str:
    """A Markdown table, one row per estimate."""
    head = ("| model | method | options | text encoder | precision | batch x seq | params | trainable | weights "
            "| grads | optimizer | activations | total |")
    rows = [head, "|" + "---|" * 13]
    for e in estimates:
        rows.append(
            f"| {e.model} | {e.method} | {', '.join(e.options) or '-'} | {e.text_encoder or '-'} | {e.precision} "
            f"| {e.batch_size} x {e.seq_len} "
            f"| {_count(e.parameters)} | {_count(e.trainable_parameters)} | {e.weights_gib:.2f} GiB "
            f"| {e.gradients_gib:.2f} GiB | {e.optimizer_gib:.2f} GiB | {e.activations_gib:.2f} GiB "
            f"| **{e.total_gib:.2f} GiB** |")
    return "\n".join(rows)


COMMON = [  # the configurations in docs/memory.md
    dict(model="deepseek-ocr-2"),
    dict(model="deepseek-ocr-2", freeze_vision=True),
    dict(model="deepseek-ocr-2", batch_size=8, gradient_checkpointing=True),
    dict(model="deepseek-ocr-2", lora=True),
    dict(model="deepseek-ocr-2", lora=True, lora_experts=False),
    dict(model="deepseek-ocr-2", lora=True, crops=True),
    dict(model="deepseek-ocr-2", lora=True, crops=True, lora_experts=False),
    dict(model="deepseek-ocr-2", lora=True, batch_size=8),
    dict(model="deepseek-ocr-2", lora=True, batch_size=1, seq_len=2048),  # recipes/lora-24gb.yaml
    dict(model="deepseek-ocr-2", lora=True, batch_size=2, seq_len=2048),
    dict(model="deepseek-ocr-2", batch_size=2, seq_len=2048),  # recipes/full-finetune.yaml (per GPU, unsharded)
    dict(model="deepseek-ocr-2", qlora=True, batch_size=8),
    dict(model="deepseek-ocr-2", lora=True, text_encoder=MINILM),
    dict(model="deepseek-ocr-2", lora=True, text_encoder=QWEN25_7B),
    dict(model="deepseek-ocr-2", lora=True, text_encoder=QWEN25_7B, text_encoder_trainable=True),
    dict(model="deepseek-ocr", lora=True, batch_size=8),
    dict(model=QWEN25_VL_7B, lora=True),
    dict(model=QWEN25_VL_7B, qlora=True),
    dict(model=QWEN25_VL_7B, freeze_vision=True, gradient_checkpointing=True),
]


def common_table() -> str:
    return format_table([estimate_memory(**kw) for kw in COMMON])


if __name__ == "__main__":  # python -m deepsynth.models.memory  -> the docs table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    print(common_table())
