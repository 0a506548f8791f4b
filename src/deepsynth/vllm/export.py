"""`deepsynth export-vllm DIR OUT`: a real-size DeepSeek-OCR-2 fine-tune in the layout vLLM's native
class loads.

vLLM's `DeepseekOCR2ForCausalLM` reads the original DeepSeek-OCR-2 repository's config layout
(`vision_config`, `projector_config`, `language_config`, `tile_tag`, `global_view_pos`) and has
the released model's vision sizes built in (SAM ViT-B at 1024 px, the 896-wide Qwen2 encoder).
Its weight names are those transformers' native class saves (`model.sam_model.*`,
`model.qwen2_model.*`, `model.projector.*`, `model.layers.*`, `lm_head.*`: its mapper moves the
decoder's under `language_model.` and strips `model.` elsewhere), so the weights are copied as
they are and only config.json is rewritten. Models of other sizes (the tiny presets) and the
patch readout have no native form: they are served through vLLM's Transformers backend
(`deepsynth.vllm`) and this command refuses them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from deepsynth.atomic import atomic_dir, write_text_atomic

#: The vision sizes vLLM's native class builds (it ignores the config's): SAM width/depth, the
#: encoder's width/depth, the page size.
NATIVE_VISION = {"sam_hidden_size": 768, "sam_layers": 12, "encoder_hidden_size": 896, "encoder_layers": 24,
                 "image_size": 1024}
#: What vLLM's native class fixes in code at every size (a model that differs would load and read
#: its pages differently): SAM's patch/window/neck/MLP shapes and the encoder's RoPE base.
NATIVE_FIXED = {"sam_patch_size": 16, "sam_window_size": 14, "sam_output_channels": 256, "sam_first_downsample": 512,
                "sam_mlp_ratio": 4.0, "encoder_rope_theta": 1000000.0, "image_size": 1024}
#: `vision_sizes` choices: "native" refuses a model whose vision widths differ from the released
#: model's; "checkpoint" records its widths in the config (vision_config.width), for comparisons
#: that build vLLM's classes at those widths (`deepsynth.vllm.reference`); plain vLLM cannot
#: load such an export.
VISION_SIZES = ("native", "checkpoint")


class ExportError(ValueError):
    """A checkpoint that vLLM's native DeepSeek-OCR-2 class cannot load."""


def _rope_theta(config: dict, default: float) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", default)))


def native_config(config: dict, vision_sizes: str = "native") -> dict:
    """vLLM's DeepSeek-OCR-2 config.json for a transformers `deepseek_ocr2` config.json (as a dict)."""
    if vision_sizes not in VISION_SIZES:
        raise ValueError(f"vision_sizes={vision_sizes!r}: choose one of {VISION_SIZES}")
    if config.get("model_type") not in ("deepseek_ocr2", "deepseek_ocr2_patches"):
        raise ExportError(f"model_type {config.get('model_type')!r}: export-vllm takes DeepSeek-OCR-2 checkpoints")
    if config.get("model_type") == "deepseek_ocr2_patches" or config.get("vision_readout", "queries") != "queries":
        raise ExportError("this checkpoint reads image tokens at the patch positions (vision_readout='patches'); "
                          "vLLM's native class reads the learned queries: serve it through the Transformers "
                          "backend (VLLMEngine does so by itself)")
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    sam, encoder = vision.get("sam_config", {}), vision.get("encoder_config", {})
    sam_hidden = sam.get("hidden_size", 768)
    found = {"sam_hidden_size": sam_hidden, "sam_layers": sam.get("num_hidden_layers", 12),
             "encoder_hidden_size": encoder.get("hidden_size", 896),
             "encoder_layers": encoder.get("num_hidden_layers", 24), "image_size": sam.get("image_size", 1024)}
    wrong = {k: (v, NATIVE_VISION[k]) for k, v in found.items() if v != NATIVE_VISION[k]}
    if wrong and vision_sizes == "native":
        detail = ", ".join(f"{k}={v} (native {n})" for k, (v, n) in wrong.items())
        raise ExportError(f"vLLM's native class has the released model's vision sizes built in; this model has "
                          f"{detail}: serve it through the Transformers backend")
    fixed = {"sam_patch_size": sam.get("patch_size", 16), "sam_window_size": sam.get("window_size", 14),
             "sam_output_channels": sam.get("output_channels", 256),
             "sam_first_downsample": (sam.get("downsample_channels") or [512, 896])[0],
             "sam_mlp_ratio": sam.get("mlp_dim", 4 * sam_hidden) / sam_hidden,
             "encoder_rope_theta": _rope_theta(encoder, 10000.0), "image_size": sam.get("image_size", 1024)}
    wrong = {k: (v, NATIVE_FIXED[k]) for k, v in fixed.items() if v != NATIVE_FIXED[k]}
    if wrong:
        detail = ", ".join(f"{k}={v} (native {n})" for k, (v, n) in wrong.items())
        raise ExportError(f"vLLM's native DeepSeek-OCR-2 class fixes these in code and this model differs: {detail}; "
                          "serve it through the Transformers backend")
    layer_types = text.get("mlp_layer_types") or []
    dense_first = next((i for i, t in enumerate(layer_types) if t != "dense"), len(layer_types))
    rope = text.get("rope_parameters") or {}
    language = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"],
        "intermediate_size": text["intermediate_size"], "moe_intermediate_size": text.get("moe_intermediate_size"),
        "num_hidden_layers": text["num_hidden_layers"], "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text.get("num_key_value_heads", text["num_attention_heads"]),
        "n_routed_experts": text.get("n_routed_experts"), "n_shared_experts": text.get("n_shared_experts"),
        "num_experts_per_tok": text.get("num_experts_per_tok"), "first_k_dense_replace": dense_first,
        "moe_layer_freq": 1, "topk_method": text.get("topk_method", "greedy"),
        "routed_scaling_factor": text.get("routed_scaling_factor", 1.0), "norm_topk_prob": False,
        "n_group": text.get("n_group") or 1, "topk_group": text.get("topk_group") or 1,
        "max_position_embeddings": text.get("max_position_embeddings", 8192),
        "rms_norm_eps": text.get("rms_norm_eps", 1e-6), "rope_theta": rope.get("rope_theta", 10000.0),
        # no latent attention: vLLM picks plain multi-head attention when both head-dim splits are 0
        "use_mla": False, "kv_lora_rank": None, "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0,
        "v_head_dim": 0,
        "bos_token_id": text.get("bos_token_id", 0), "eos_token_id": text.get("eos_token_id", 1),
        "tie_word_embeddings": config.get("tie_word_embeddings", False), "torch_dtype": config.get("dtype", "bfloat16"),
    }
    vision_out = {"image_size": 1024, "patch_size": 16, "mlp_ratio": 4, "model_name": "deepencoderv2"}
    if vision_sizes == "checkpoint":
        vision_out["width"] = {
            "sam_vit_b": {"width": sam_hidden, "layers": found["sam_layers"],
                          "heads": sam.get("num_attention_heads", 12),
                          "global_attn_indexes": list(sam.get("global_attn_indexes", [2, 5, 8, 11])),
                          "downsample_channels": list(sam.get("downsample_channels", [512, 896]))},
            "qwen2-0-5b": {"dim": found["encoder_hidden_size"], "layers": found["encoder_layers"],
                           "heads": encoder.get("num_attention_heads", 14),
                           "kv_heads": encoder.get("num_key_value_heads", 2),
                           "intermediate_size": encoder.get("intermediate_size", 4864)}}
    return {
        "architectures": ["DeepseekOCR2ForCausalLM"], "model_type": "deepseek_vl_v2",
        "tile_tag": "2D", "global_view_pos": "head", "candidate_resolutions": [[1024, 1024]],
        "vision_config": vision_out,
        "projector_config": {"projector_type": "linear", "input_dim": found["encoder_hidden_size"],
                             "n_embed": text["hidden_size"]},
        "language_config": language,
        "image_token_id": config.get("image_token_id"),
        "torch_dtype": config.get("dtype", "bfloat16"),
    }


#: Files carried over beside the rewritten config.json (weights, tokenizer, processor, bundle).
_CARRIED = ("*.safetensors", "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
            "processor_config.json", "preprocessor_config.json", "chat_template*", "generation_config.json",
            "deepsynth.json")


#: `adapters` choices of `export_vllm` for an adapter bundle: "merge" writes merged weights;
#: "keep" writes the base in the native layout plus the adapters as a vLLM LoRA module (`lora/`).
ADAPTER_MODES = ("merge", "keep")
_DECODER_PREFIX = "base_model.model.model.language_model."


def native_adapter(src: str | Path, out: str | Path) -> dict:
    """A peft adapter of our DeepSeek-OCR-2 decoder renamed for vLLM's native class (its weight
    mapper reads the original layout: `model.layers.*`, not transformers' `model.language_model.*`).
    Returns what serving it needs: {"path", "max_rank", "fused_experts"}; fused_experts (LoRA on the
    routed experts, peft's 3-D `target_parameters` form) needs vLLM started with
    `enable_mixed_moe_lora_format=True` and requests with `is_3d_lora_weight=True`. Adapters on the
    vision tower or projector are refused: vLLM's class applies LoRA to the decoder only."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    outside = sorted(k for k in tensors if not k.startswith(_DECODER_PREFIX))
    if outside:
        raise ExportError(f"{src}: adapters outside the decoder ({outside[0]}, ...): vLLM's native class applies "
                          "LoRA to the decoder only; export with adapters='merge'")
    renamed = {"base_model.model.model." + k[len(_DECODER_PREFIX):]: v for k, v in tensors.items()}
    targets = config.get("target_modules")
    if isinstance(targets, str):
        config["target_modules"] = targets.replace("model\\.language_model\\.", "model\\.")
    elif isinstance(targets, list):
        config["target_modules"] = [t.replace("model.language_model.", "model.") for t in targets]
    fused = any(".mlp.experts." in k for k in tensors)
    out.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_text_atomic(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    from deepsynth.vllm.checkpoint import vllm_lora_rank

    try:
        max_rank = vllm_lora_rank(config, str(src))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return {"path": str(out), "max_rank": max_rank, "fused_experts": fused}


def export_vllm(src: str | Path, out: str | Path, overwrite: bool = False, vision_sizes: str = "native",
                adapters: str = "merge") -> Path:
    """Write `src` (a full DeepSeek-OCR-2 bundle, or an adapter bundle) to `out` in vLLM's native
    layout; returns `out`. An adapter bundle is merged into its base (adapters="merge"), or its base
    is exported and the adapters written beside it as a vLLM LoRA module in `out/lora`
    (adapters="keep", see `native_adapter`)."""
    src, out = Path(src), Path(out)
    if adapters not in ADAPTER_MODES:
        raise ValueError(f"adapters={adapters!r}: choose one of {ADAPTER_MODES}")
    if not (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{src} has neither config.json nor adapter_config.json")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if (src / "adapter_config.json").is_file() and adapters == "keep":
        from deepsynth.models.bundle import read_spec
        from deepsynth.models.registry import resolve

        spec = read_spec(src)
        if spec is None or not spec.base_model or not Path(resolve(spec.base_model)).is_dir():
            raise ExportError(f"{src}: the adapters' base model is not a local directory; export with "
                              "adapters='merge'")
        export_vllm(resolve(spec.base_model), out, overwrite=True, vision_sizes=vision_sizes)
        native_adapter(src, out / "lora")
        return out
    if (src / "adapter_config.json").is_file():
        import torch

        from deepsynth.models.bundle import load_bundle

        loaded = load_bundle(str(src), dtype=torch.float32)  # the adapters merged into their base
        return export_loaded(loaded.model, loaded.processor, out, vision_sizes=vision_sizes, bundle_from=src)
    config = native_config(json.loads((src / "config.json").read_text()), vision_sizes)
    with atomic_dir(out) as tmp:
        for pattern in _CARRIED:
            for path in src.glob(pattern):
                shutil.copy2(path, tmp / path.name)
        write_text_atomic(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def export_loaded(model, processor, out: str | Path, vision_sizes: str = "native",
                  bundle_from: str | Path | None = None) -> Path:
    """A loaded DeepSeek-OCR-2 model (adapters already merged) written to `out` in vLLM's native
    layout; `bundle_from`: a bundle whose deepsynth.json is carried over (marked full weights)."""
    import dataclasses

    from deepsynth.models.bundle import read_spec, write_spec

    out = Path(out)
    config = native_config(model.config.to_dict(), vision_sizes)  # refuses before anything is written
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        spec = read_spec(bundle_from) if bundle_from is not None else None
        if spec is not None:
            write_spec(tmp, dataclasses.replace(spec, weights="full"))
        write_text_atomic(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def export_vllm_command(
    src: Path = typer.Argument(..., exists=True, file_okay=False,
                               help="A DeepSeek-OCR-2 model directory (full weights, or LoRA adapters: merged)."),
    out: Path = typer.Argument(..., help="Directory to write (vLLM's native DeepSeek-OCR-2 layout)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    adapters: str = typer.Option("merge", help="For an adapter bundle: 'merge' (merged weights) or 'keep' "
                                               "(the base, plus the adapters as a vLLM LoRA module in OUT/lora)."),
) -> None:
    """Export a real-size DeepSeek-OCR-2 fine-tune to the layout vLLM's native class loads."""
    try:
        path = export_vllm(src, out, overwrite, adapters=adapters)
    except (ExportError, FileExistsError, FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"exported {src} -> {path} (serve: deepsynth serve --engine vllm --model {path})")
    lora = path / "lora" / "adapter_model.safetensors"
    if lora.is_file():
        from safetensors import safe_open

        with safe_open(str(lora), "pt") as f:
            fused = any(".mlp.experts." in k for k in f.keys())
        typer.echo(f"LoRA module for vLLM: {path / 'lora'}" + (
            " (LoRA on the routed experts, fused 3-D form: start vLLM with enable_mixed_moe_lora_format=True "
            "and send requests with is_3d_lora_weight=True)" if fused else ""))
