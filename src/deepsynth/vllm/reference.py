"""`deepsynth check-reference MODEL`: our HF engine against an implementation we did not write,
vLLM's native DeepSeek-OCR (`DeepseekOCRForCausalLM`) and DeepSeek-OCR-2 (`DeepseekOCR2ForCausalLM`)
classes, on the same pages and prompt token ids, greedy, float32: the tokens of each answer, the
log-probability of each token on both sides (max |difference|), and the first differing token.

`check-parity` compares our two engines (the vLLM one runs our model classes through vLLM's
Transformers backend); this check compares the forward pass itself with vLLM's own code:

* the checkpoint is written in the layout the native class loads (`native_checkpoint`): DeepSeek-OCR
  v1 in the original remote-code layout (`original_config_from_v1` + `to_v1_state_dict`),
  DeepSeek-OCR-2 through `export-vllm` (`deepsynth.vllm.export`);
* the HF side builds the prompt and page inputs with the engine's own `Decoder.prepare_inputs` and
  decodes greedily with `generate` (no loop guards, no suppressed tokens: vLLM's plain greedy),
  keeping each step's raw logits;
* the vLLM side (`python -m deepsynth.vllm.reference JOB OUT` in the vLLM environment) gets the
  same prompt ids with each page's run of image tokens folded back into one `<image>` (vLLM's
  processor expands it again: the expanded prompt it reports must equal ours token for token) and
  returns each sampled token's raw log-probability.

vLLM's native classes build the released model's vision sizes whatever the config says (SAM ViT-B
768 x 12, CLIP-L 1024 x 24 / the 896 x 24 Qwen2 encoder). A checkpoint of other vision widths
(the tiny test fixtures) is compared by building the same native classes at the checkpoint's sizes
(`native_vision_sizes`: constructor arguments only, read from config.json); the report says so
(`vision_sizes: "checkpoint"` instead of `"built-in"`). Page and tile sides are never changed:
vLLM draws the global view at 1024 px and cuts crops of 640 (v1) / 768 px (OCR-2), so pages are
compared at those sizes (`fit_page`).

    deepsynth check-reference MODEL_DIR [--adapter DIR] [--examples FILE.jsonl] [--out report.json]
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import typer

logger = logging.getLogger(__name__)

V1, OCR2 = "deepseek-ocr", "deepseek-ocr-2"
#: vLLM's native processor: global view side, crop side per family, and the crop-count limits.
NATIVE_BASE_SIZE = 1024
NATIVE_TILE = {V1: 640, OCR2: 768}
#: The vision sizes vLLM's native classes build (constructor arguments), per family.
BUILT_IN_SIZES = {
    V1: {"sam": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11],
                 "last_conv_output": 1024},
         "clip": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24}},
    OCR2: {"sam": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11],
                   "last_conv_output": 896},
           "encoder": {"decoder_layer": 24, "hidden_dimension": 896, "num_attention_heads": 14,
                       "num_key_value_heads": 2, "intermediate_size": 4864}},
}
#: The vLLM-side entry point (argv before JOB OUT); tests run it through a bootstrap instead.
SIDE_COMMAND = ["-m", "deepsynth.vllm.reference"]
#: Log-probabilities agree when every token's |HF - vLLM| is at most this (float32).
LOGPROB_TOLERANCE = 1e-3


class ReferenceError(ValueError):
    """A model or input the reference comparison cannot run (says what and what to do)."""


# ---- the checkpoint in the native layout ----------------------------------------------------------
def family_of(config: dict) -> str:
    """"deepseek-ocr" (v1, original or port layout) or "deepseek-ocr-2" from a config.json dict."""
    model_type = config.get("model_type")
    if model_type in ("deepseek_ocr_v1",) or "DeepseekOCRForCausalLM" in (config.get("architectures") or []):
        return V1
    if model_type in ("deepseek_ocr2", "deepseek_ocr2_patches") or \
            "DeepseekOCR2ForCausalLM" in (config.get("architectures") or []):
        return OCR2
    raise ReferenceError(f"model_type {model_type!r}: the reference check covers DeepSeek-OCR v1 and "
                         "DeepSeek-OCR-2 (vLLM's native classes); compare other models with check-parity")


def native_vision_sizes(native: dict) -> dict:
    """The constructor sizes of vLLM's vision modules for a native-layout config.json (dict)."""
    family = V1 if "DeepseekOCRForCausalLM" in native.get("architectures", []) else OCR2
    widths = native.get("vision_config", {}).get("width")
    if not isinstance(widths, dict):  # the released OCR-2 config names no sizes: vLLM's built-ins
        return BUILT_IN_SIZES[family]
    sam = widths["sam_vit_b"]
    sizes = {"sam": {"embed_dim": sam["width"], "depth": sam["layers"], "num_heads": sam["heads"],
                     "global_attn_indexes": list(sam["global_attn_indexes"]),
                     "last_conv_output": sam["downsample_channels"][1]}}
    if family == V1:
        clip = widths["clip-l-14-224"]
        sizes["clip"] = {"hidden_size": clip["width"], "intermediate_size": clip.get("intermediate_size",
                                                                                     4 * clip["width"]),
                         "num_attention_heads": clip["heads"], "num_hidden_layers": clip["layers"]}
    else:
        enc = widths["qwen2-0-5b"]
        sizes["encoder"] = {"decoder_layer": enc["layers"], "hidden_dimension": enc["dim"],
                            "num_attention_heads": enc["heads"], "num_key_value_heads": enc["kv_heads"],
                            "intermediate_size": enc["intermediate_size"]}
    return sizes


def _check_v1_native(config) -> None:
    """What vLLM's v1 class fixes in code and our config could differ in (it would load and read wrongly)."""
    sam, clip = config.sam_config, config.clip_config
    fixed = {"SAM image_size": (sam.image_size, 1024), "SAM patch_size": (sam.patch_size, 16),
             "SAM window_size": (sam.window_size, 14), "SAM output_channels": (sam.output_channels, 256),
             "SAM first downsample": (sam.downsample_channels[0], 512),
             "SAM mlp_dim": (sam.mlp_dim, 4 * sam.hidden_size),
             "CLIP image_size": (clip.image_size, 224), "CLIP patch_size": (clip.patch_size, 14)}
    wrong = {k: v for k, v in fixed.items() if v[0] != v[1]}
    if wrong:
        raise ReferenceError("vLLM's DeepSeek-OCR class fixes " + ", ".join(
            f"{k}={n} (this model: {v})" for k, (v, n) in wrong.items()) + "; this model cannot be compared with it")


def write_v1_native(model, processor, out: Path) -> Path:
    """A v1 port model in the original remote-code layout vLLM's `DeepseekOCRForCausalLM` loads."""
    from safetensors.torch import save_file

    from deepsynth.models.deepseek_ocr_v1 import original_config_from_v1, to_v1_state_dict

    _check_v1_native(model.config)
    out.mkdir(parents=True, exist_ok=True)
    state = to_v1_state_dict({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
                             model.config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(original_config_from_v1(model.config), indent=2) + "\n")
    processor.tokenizer.save_pretrained(out)
    return out


def native_checkpoint(src: str | Path, out: Path, model=None, processor=None) -> tuple[str, Path, str]:
    """(family, directory vLLM's native class loads, "built-in" | "checkpoint" vision sizes) for the
    model directory `src`: an original-layout v1 directory is used as it is; a v1 port (`model`,
    `processor` given, or loaded from `src`) is written to `out`; DeepSeek-OCR-2 goes through
    `export_vllm` into `out`."""
    from deepsynth.vllm.export import export_vllm

    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    family = family_of(config)
    if family == OCR2:
        native_dir = export_vllm(src, out, overwrite=True, vision_sizes="checkpoint")
    elif config.get("model_type") == "deepseek_vl_v2":
        native_dir = src
    else:
        if model is None:
            from deepsynth.models.deepseek_ocr_v1 import load_port

            model, processor = load_port(src)
        native_dir = write_v1_native(model, processor, out)
    native = json.loads((Path(native_dir) / "config.json").read_text())
    sizes = native_vision_sizes(native)
    return family, Path(native_dir), "built-in" if sizes == BUILT_IN_SIZES[family] else "checkpoint"


def fit_page(page, family: str, crop_mode: str):
    """The page both sides read. Crop mode "none": vLLM's native processor cuts crops from any page
    larger than its tile side, so a larger page is scaled (aspect kept) to fit that side."""
    tile = NATIVE_TILE[family]
    if crop_mode == "none" and max(page.size) > tile:
        scale = tile / max(page.size)
        page = page.resize((max(1, round(page.size[0] * scale)), max(1, round(page.size[1] * scale))))
    return page.convert("RGB")


# ---- the HF side ----------------------------------------------------------------------------------
def fold_image_runs(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """Prompt ids with each page's run of image tokens (`counts`, in page order) replaced by one image
    token: what vLLM's processor expands again."""
    out, i, page = [], 0, 0
    while i < len(ids):
        if ids[i] == image_token_id:
            if page >= len(counts):
                raise ReferenceError("the prompt holds more image tokens than its pages make")
            n = counts[page]
            if list(ids[i:i + n]) != [image_token_id] * n:
                raise ReferenceError(f"page {page}: expected a run of {n} image tokens in the prompt")
            out.append(image_token_id)
            i, page = i + n, page + 1
        else:
            out.append(ids[i])
            i += 1
    if page != len(counts):
        raise ReferenceError(f"the prompt holds image tokens for {page} pages, not {len(counts)}")
    return out


def hf_rows(engine, pages: Sequence, instructions: Sequence[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers of the HF engine's model, one request at a time (no padding): prompt ids as
    the engine builds them, answer token ids (EOS included when reached) and each token's raw
    log-probability."""
    import torch

    decoder, rows = engine.decoder, []
    image_token_id = engine.image_token_id
    for page, instruction in zip(pages, instructions):
        inputs = decoder.prepare_inputs([[page]], [instruction])
        prompt = inputs["input_ids"][0].tolist()
        n_image = sum(1 for t in prompt if t == image_token_id)
        inputs = {k: v.to(decoder.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.no_grad():
            out = engine.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, no_repeat_ngram_size=0,
                repetition_penalty=1.0, output_logits=True, return_dict_in_generate=True,
                pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.tokenizer.eos_token_id)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [float(torch.log_softmax(step[0].float(), dim=-1)[t]) for step, t in zip(out.logits, tokens)]
        eos = engine.tokenizer.eos_token_id
        if eos in tokens:  # generate pads nothing for a single row, but cut exactly as vLLM stops
            end = tokens.index(eos) + 1
            tokens, logprobs = tokens[:end], logprobs[:end]
        rows.append({"prompt_token_ids": prompt, "vllm_prompt_token_ids": fold_image_runs(prompt, image_token_id,
                                                                                           [n_image]),
                     "token_ids": tokens, "logprobs": logprobs})
    return rows


# ---- the vLLM side (runs in the vLLM environment) -------------------------------------------------
def build_native_at_sizes(family: str, sizes: dict) -> None:
    """Make vLLM's native class of `family` build its vision modules at `sizes` (constructor
    arguments only; called only when they differ from `BUILT_IN_SIZES`). In-process: the engine must
    run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    from functools import partial

    import torch

    from vllm.model_executor.models import deepencoder

    sam = sizes["sam"]

    def sam_encoder(*args, **kwargs):
        kwargs.update(embed_dim=sam["embed_dim"], depth=sam["depth"], num_heads=sam["num_heads"],
                      global_attn_indexes=tuple(sam["global_attn_indexes"]),
                      last_conv_output=sam["last_conv_output"])
        return deepencoder.ImageEncoderViT(*args, **kwargs)

    if family == V1:
        from vllm.model_executor.models import deepseek_ocr as native

        def build_sam_vit_b():  # vLLM's `_build_sam` arguments, at the checkpoint's widths
            return sam_encoder(img_size=1024, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                               patch_size=16, qkv_bias=True, use_rel_pos=True, window_size=14, out_chans=256)

        clip_config = native.CLIPVisionConfig

        def clip_at_sizes(**kwargs):
            return clip_config(**{**kwargs, **sizes["clip"]})

        native.build_sam_vit_b = build_sam_vit_b
        native.CLIPVisionConfig = clip_at_sizes
    else:
        from vllm.model_executor.models import deepseek_ocr2 as native

        encoder = native.build_qwen2_decoder_as_encoder
        native.ImageEncoderViT = sam_encoder
        native.build_qwen2_decoder_as_encoder = lambda: encoder(**sizes["encoder"])


def vllm_side(job: dict) -> dict:
    """Answer the job's requests with vLLM's native class (in this process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the size override and the engine in one process
    from PIL import Image
    from vllm import LLM, SamplingParams

    native = json.loads((Path(job["model"]) / "config.json").read_text())
    family = V1 if "DeepseekOCRForCausalLM" in native.get("architectures", []) else OCR2
    sizes = native_vision_sizes(native)
    if sizes != BUILT_IN_SIZES[family]:
        build_native_at_sizes(family, sizes)
    kwargs = dict(model=job["model"], tokenizer=job["model"], dtype="float32", model_impl="vllm", enforce_eager=True,
                  max_num_seqs=1, max_model_len=job.get("max_model_len", 4096), limit_mm_per_prompt={"image": 1},
                  seed=0)
    lora = None
    if job.get("lora"):
        from vllm.lora.request import LoRARequest

        kwargs.update(enable_lora=True, max_lora_rank=job["lora"]["max_rank"], max_loras=1)
        fused = bool(job["lora"].get("fused_experts"))
        if fused:  # the experts' adapters as peft writes them for fused 3-D expert weights
            kwargs["enable_mixed_moe_lora_format"] = True
        lora = LoRARequest("adapter", 1, job["lora"]["path"], is_3d_lora_weight=fused)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], logprobs=0)
    answers = []
    for item in job["items"]:
        with Image.open(item["page"]) as img:
            page = img.convert("RGB")
        out = llm.generate([{"prompt_token_ids": item["prompt_token_ids"], "multi_modal_data": {"image": page}}],
                           params, lora_request=lora, use_tqdm=False)[0]
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, tokens)]
        answers.append({"prompt_token_ids": list(out.prompt_token_ids), "token_ids": tokens, "logprobs": logprobs})
    import vllm

    return {"answers": answers, "vllm_version": vllm.__version__, "architecture": native["architectures"][0],
            "vision_sizes": "built-in" if sizes == BUILT_IN_SIZES[family] else "checkpoint"}


def run_vllm_side(job: dict, python: str, workdir: Path, timeout: float = 3600) -> dict:
    """`vllm_side(job)` in a subprocess of the vLLM environment's `python`."""
    from deepsynth.vllm.parity import run_side

    return run_side(SIDE_COMMAND, job, python, workdir, "vLLM's native class", timeout)


# ---- the comparison -------------------------------------------------------------------------------
def compare(hf: dict, vl: dict, tokenizer=None) -> dict:
    """One answer: token agreement, max |logprob difference| over the common prefix, first difference."""
    from deepsynth.vllm.parity import first_difference

    a, b = hf["token_ids"], vl["token_ids"]
    diff = first_difference(a, b)
    common = diff.index if diff is not None else len(a)
    deltas = [abs(x - y) for x, y in zip(hf["logprobs"][:common + 1], vl["logprobs"][:common + 1])]
    entry = {"prompt_identical": hf["prompt_token_ids"] == vl["prompt_token_ids"],
             "prompt_tokens": len(hf["prompt_token_ids"]), "vllm_prompt_tokens": len(vl["prompt_token_ids"]),
             "tokens_identical": diff is None, "hf_tokens": len(a), "vllm_tokens": len(b),
             "agreeing_tokens": common,
             # over the tokens both chose alike, plus the first one where they part (same position)
             "max_abs_logprob_diff": max(deltas) if deltas else 0.0,
             "first_difference": None}
    if diff is not None:
        entry["first_difference"] = diff.to_dict(tokenizer)
    if tokenizer is not None:
        entry["hf_answer"] = tokenizer.decode(a, skip_special_tokens=True)
        entry["vllm_answer"] = tokenizer.decode(b, skip_special_tokens=True)
    return entry


def check_reference(model: str, pages: Sequence, instructions: Sequence[str], max_new_tokens: int = 32,
                    python: str | None = None, workdir: str | Path | None = None,
                    lora: dict | None = None, native_dir: str | Path | None = None) -> dict:
    """Answer (page, instruction) pairs with our HF engine and with vLLM's native class; the report.

    model:      a DeepSeek-OCR v1 or DeepSeek-OCR-2 model directory (our bundle, a v1 original-layout
                directory); adapters are merged first by `load_bundle`.
    native_dir: the native-layout checkpoint to give vLLM (default: written from `model`).
    lora:       {"path": adapter dir in vLLM's layout, "max_rank": int}: vLLM applies the adapter as a
                LoRA module to `native_dir` (the base); `model` then names the merged model for the HF side.
    """
    import torch

    from deepsynth.inference.engine import InstructionEngine
    from deepsynth.vllm.parity import vllm_python

    if len(pages) != len(instructions) or not pages:
        raise ReferenceError(f"{len(pages)} pages but {len(instructions)} instructions: give one page per instruction")
    python = vllm_python(python)
    if python is None:
        raise FileNotFoundError("no vLLM environment found: run `make vllm-env` (it makes .venv-vllm/) or set "
                                "DEEPSYNTH_VLLM_PYTHON to a python that imports vllm")
    engine = InstructionEngine(model, dtype=torch.float32)
    engine.model.float()
    crop_mode = engine.spec.crop_mode or "none"
    config = engine.model.config.to_dict()
    family = V1 if engine.spec.backend == "deepseek-ocr-v1" else family_of(config)
    pages = [fit_page(p, family, crop_mode) for p in pages]
    hf = hf_rows(engine, pages, instructions, max_new_tokens)
    tokenizer = engine.tokenizer
    with tempfile.TemporaryDirectory(prefix="deepsynth-reference-", dir=workdir) as tmp:
        work = Path(tmp)
        if native_dir is None:
            resolved = Path(engine.name) if Path(engine.name).is_dir() else None
            if resolved is None or (resolved / "adapter_config.json").is_file() or family == V1 and \
                    json.loads((resolved / "config.json").read_text()).get("model_type") != "deepseek_vl_v2":
                # merged adapters or a v1 port: write the loaded weights themselves
                native_dir = _write_loaded(engine, family, work / "native")
            else:
                _, native_dir, _ = native_checkpoint(resolved, work / "native")
        del engine
        gc.collect()
        items = []
        for i, (page, row) in enumerate(zip(pages, hf)):
            path = work / f"page-{i}.png"
            page.save(path)
            items.append({"page": str(path), "prompt_token_ids": row["vllm_prompt_token_ids"]})
        longest = max(len(r["prompt_token_ids"]) for r in hf) + max_new_tokens
        job = {"model": str(native_dir), "items": items, "max_new_tokens": max_new_tokens, "lora": lora,
               "max_model_len": 1 << max(10, math.ceil(math.log2(longest)))}
        vl = run_vllm_side(job, python, work)
    answers = []
    for instruction, h, v in zip(instructions, hf, vl["answers"]):
        answers.append({"instruction": instruction, **compare(h, v, tokenizer)})
    worst = max(a["max_abs_logprob_diff"] for a in answers)
    return {"model": model, "family": family, "crop_mode": crop_mode, "dtype": "float32", "decoding": "greedy",
            "max_new_tokens": max_new_tokens, "reference": f"vLLM {vl['vllm_version']} {vl['architecture']}",
            "vision_sizes": vl["vision_sizes"], "lora": bool(lora),
            "prompts_identical": sum(a["prompt_identical"] for a in answers),
            "tokens_identical": sum(a["tokens_identical"] for a in answers), "answers": answers,
            "max_abs_logprob_diff": worst, "tolerance": LOGPROB_TOLERANCE,
            "agree": all(a["prompt_identical"] and a["tokens_identical"] for a in answers)
            and worst <= LOGPROB_TOLERANCE}


def _write_loaded(engine, family: str, out: Path) -> Path:
    """The engine's loaded (merged) weights in the native layout."""
    from deepsynth.vllm.export import export_loaded

    if family == V1:
        return write_v1_native(engine.model, engine.processor, out)
    return export_loaded(engine.model, engine.processor, out, vision_sizes="checkpoint")


# ---- fixtures: tiny models with the released architecture options ---------------------------------
def tiny_native_ocr2(seed: int = 0, crop_mode: str = "none", moe: bool = True, released_vision: bool = False):
    """DeepSeek-OCR-2 at toy widths with what vLLM's native class fixes kept as released: 1024 px
    global view (256 learned queries), 768 px crops (144 queries), the stock query readout, SAM's
    256 -> 512 -> C necks, window 14, MLP ratio 4, the encoder's RoPE theta 1e6; a dense then a MoE
    decoder layer (4 routed experts top-2, one shared). released_vision: SAM ViT-B and the 896 x 24
    encoder at the released widths (vLLM's classes then run as shipped, nothing built at other
    sizes), the decoder still tiny. Returns (model, processor, spec)."""
    import torch
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration, DeepseekOcr2Processor
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

    from deepsynth.models.bundle import ModelSpec
    from deepsynth.models.deepseek_ocr2 import set_crop_mode
    from deepsynth.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    processor = DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tok,
                                      patch_size=16, downsample_ratio=4)
    set_crop_mode(processor, crop_mode)
    sam = dict(hidden_size=64, mlp_dim=256, output_channels=256, num_hidden_layers=2, num_attention_heads=2,
               image_size=1024, patch_size=16, window_size=14, global_attn_indexes=[1],
               downsample_channels=[512, 64], initializer_range=0.02)
    encoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=8, max_position_embeddings=2048,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if released_vision:
        sam.update(hidden_size=768, mlp_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                   global_attn_indexes=[2, 5, 8, 11], downsample_channels=[512, 896])
        encoder.update(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2,
                mlp_layer_types=["dense", "sparse" if moe else "dense"], n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, moe_intermediate_size=32, max_position_embeddings=4096,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = DeepseekOcr2Config(vision_config={"sam_config": sam, "encoder_config": encoder}, text_config=text,
                                image_token_id=processor.image_token_id)
    torch.manual_seed(seed)
    model = DeepseekOcr2ForConditionalGeneration(config)
    _spread_init(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    spec = ModelSpec(backend="deepseek-ocr-2", crop_mode=crop_mode)
    return model, processor, spec


def tiny_native_v1(seed: int = 0, released_vision: bool = False):
    """DeepSeek-OCR v1 (the port) at toy widths with what vLLM's native class fixes kept as released:
    1024 px global view, SAM's 256 -> 512 -> C necks (C = CLIP's width), window 14, MLP ratio 4, CLIP
    at 224 px / 14 px patches (257 positions); a dense then a MoE decoder layer. released_vision: SAM
    ViT-B and CLIP-L at the released widths, the decoder still tiny. (model, processor, spec)."""
    import torch
    from transformers import CLIPVisionConfig
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
        DeepseekOcr2SamVisionConfig,
        DeepseekOcr2TextConfig,
    )

    from deepsynth.models.bundle import ModelSpec
    from deepsynth.models.deepseek_ocr_v1 import (
        DeepseekOcrV1Config,
        DeepseekOcrV1ForConditionalGeneration,
        DeepseekOcrV1Processor,
        v1_image_processor,
    )
    from deepsynth.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    processor = DeepseekOcrV1Processor(image_processor=v1_image_processor(1024), tokenizer=tok)
    widths = dict(sam=(768, 12, 12, [2, 5, 8, 11]), clip=(1024, 4096, 24, 16)) if released_vision else \
        dict(sam=(64, 2, 2, [1]), clip=(64, 128, 2, 2))
    (sam_w, sam_l, sam_h, sam_g), (clip_w, clip_i, clip_l, clip_h) = widths["sam"], widths["clip"]
    sam = DeepseekOcr2SamVisionConfig(
        hidden_size=sam_w, mlp_dim=4 * sam_w, output_channels=256, num_hidden_layers=sam_l, num_attention_heads=sam_h,
        image_size=1024, patch_size=16, window_size=14, global_attn_indexes=sam_g, downsample_channels=[512, clip_w],
        initializer_range=0.02)
    clip = CLIPVisionConfig(hidden_size=clip_w, intermediate_size=clip_i, num_hidden_layers=clip_l,
                            num_attention_heads=clip_h, image_size=224, patch_size=14, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
    text = DeepseekOcr2TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, mlp_layer_types=["dense", "sparse"], n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=32, max_position_embeddings=4096, n_group=1, topk_group=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = DeepseekOcrV1Config(sam_config=sam, clip_config=clip, text_config=text,
                                 image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = DeepseekOcrV1ForConditionalGeneration(config)
    _spread_init(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor, ModelSpec(backend="deepseek-ocr-v1", crop_mode="none")


def _spread_init(model) -> None:
    """Random weights scaled by fan-in (SAM's own initialiser is 1e-10 and 0.02 everywhere leaves
    the logits nearly flat), embeddings and learned queries of unit scale, norms at one: pages and
    instructions then move the logits, so agreeing answers say something about the forward pass."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    unit = ("embed_tokens", "query_", "pos_embed", "position_embedding", "class_embedding", "view_sep",
            "image_newline")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
                continue
            if any(u in name for u in unit):
                std = 1.0
            elif p.ndim == 3:  # fused experts
                std = p.shape[-1] ** -0.5
            elif p.ndim >= 2 and "rel_pos" not in name:
                std = p[0].numel() ** -0.5
            else:
                std = 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def save_fixture(directory: str | Path, family: str, crop_mode: str = "none", seed: int = 0, moe: bool = True,
                 released_vision: bool = False) -> Path:
    """A tiny fixture (`tiny_native_ocr2` / `tiny_native_v1`) written as a model directory: our bundle
    for DeepSeek-OCR-2, the original remote-code layout (plus deepsynth.json) for v1."""
    import dataclasses

    from deepsynth.models.bundle import save_bundle, write_spec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if family == OCR2:
        model, processor, spec = tiny_native_ocr2(seed, crop_mode, moe=moe, released_vision=released_vision)
        save_bundle(directory, model, processor, spec)
    elif family == V1:
        model, processor, spec = tiny_native_v1(seed, released_vision=released_vision)
        write_v1_native(model, processor, directory)
        write_spec(directory, dataclasses.replace(spec, crop_mode=crop_mode))  # "tiles": Gundam, 640 px crops
    else:
        raise ReferenceError(f"family {family!r}: choose {V1!r} or {OCR2!r}")
    return directory


# ---- command line ---------------------------------------------------------------------------------
def _read_items(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        kinds = [k for k in ("text", "image") if isinstance(record.get(k), str)] if isinstance(record, dict) else []
        if len(kinds) != 1 or not isinstance(record.get("instruction"), str):
            raise typer.BadParameter(f"line {n}: expected {{\"text\" or \"image\": str, \"instruction\": str}}",
                                     param_hint="'--examples'")
        out.append((kinds[0], record[kinds[0]], record["instruction"]))
    if not out:
        raise typer.BadParameter(f"{path} holds no examples", param_hint="'--examples'")
    return out


def _pages_for(model: str, items: Sequence[tuple[str, str, str]]) -> list:
    """One page per item: an image file as it is, a text document's first rendered page."""
    from PIL import Image

    from deepsynth.inference.engine import InstructionEngine

    engine, pages = None, []
    for kind, value, _ in items:
        if kind == "image":
            with Image.open(value) as img:
                pages.append(img.convert("RGB"))
            continue
        if engine is None:
            engine = InstructionEngine(model)
        pages.append(engine.pages_for(value)[0])
    return pages


def check_reference_command(
    model: str = typer.Argument(..., help="DeepSeek-OCR v1 or DeepSeek-OCR-2 model directory."),
    examples: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="JSONL of {\"text\" | \"image\": path, \"instruction\"} "
                                                 "(default: built-in pages)."),
    max_new_tokens: int = typer.Option(32, min=1, max=8192, help="Answer length compared."),
    vllm_python_path: Optional[str] = typer.Option(None, "--vllm-python",
                                                   help="Python of the vLLM environment (default: "
                                                        "$DEEPSYNTH_VLLM_PYTHON or .venv-vllm/bin/python)."),
    out: Optional[Path] = typer.Option(None, help="Write the JSON report here too."),
) -> None:
    """Compare our HF engine with vLLM's native DeepSeek-OCR / DeepSeek-OCR-2 class (float32, greedy):
    prompt ids, tokens, max |log-probability difference|, first differing token; exit 1 when they differ."""
    from deepsynth.vllm.export import ExportError
    from deepsynth.vllm.parity import DEFAULT_EXAMPLES, difference_text, report_command

    items = _read_items(examples) if examples else [("text", t, i) for t, i in DEFAULT_EXAMPLES]

    def run() -> dict:
        pages = _pages_for(model, items)
        return check_reference(model, pages, [i for _, _, i in items], max_new_tokens=max_new_tokens,
                               python=vllm_python_path)

    def line(a: dict) -> str:
        return (f"{a['instruction']!r}: prompt {'identical' if a['prompt_identical'] else 'DIFFERENT'}, "
                f"{difference_text(a['first_difference'])}, max |logprob diff| {a['max_abs_logprob_diff']:.2e} "
                f"over {a['agreeing_tokens']} tokens")

    def summary(report: dict) -> str:
        return (f"{report['reference']} ({report['vision_sizes']} vision sizes), crop mode {report['crop_mode']}: "
                f"{report['tokens_identical']}/{len(report['answers'])} answers token-identical, max |logprob "
                f"diff| {report['max_abs_logprob_diff']:.2e} (tolerance {report['tolerance']:g})")

    report_command(run, (FileNotFoundError, ReferenceError, ExportError), line, summary,
                   lambda report: report["agree"], out)


def main(argv: Sequence[str] | None = None) -> None:
    """vLLM side: `python -m deepsynth.vllm.reference JOB.json OUT.json`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m deepsynth.vllm.reference JOB.json OUT.json")
    result = vllm_side(json.loads(Path(args[0]).read_text()))
    Path(args[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
