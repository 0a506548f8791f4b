"""What DeepSeek-OCR-2 (`deepseek_ocr2`) and the DeepSeek-OCR v1 port (`deepseek_ocr_v1`) share below
both family modules: the DeepSeek-V2 decoder config of a remote-code `language_config`, the
tokenizer of a remote-code checkpoint, and v1's crop geometry (Gundam mode), which the shared
image-token arithmetic in `deepseek_ocr2` reads for config-only estimates. v1 builds on
`deepseek_ocr2`, so `deepseek_ocr2` cannot import v1: what both need lives here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig

# v1's Gundam mode: a 1024 px global view with 640 px local crops, 2 to 9 of them (HF's `dynamic_preprocess`).
V1_GUNDAM_SIZE, V1_GUNDAM_TILE = 1024, 640
V1_MIN_CROPS, V1_MAX_CROPS = 2, 9


def v1_tile_size(side: int) -> int:
    """Gundam's crop side for a global view of `side` px: 640 at 1024, in proportion otherwise
    (tiny test models)."""
    return side * V1_GUNDAM_TILE // V1_GUNDAM_SIZE


def text_config_from_language(lang: dict) -> DeepseekOcr2TextConfig:
    """The decoder config from a remote-code `language_config` (DeepSeek-V2 fields; v1 and
    DeepSeek-OCR-2 share the decoder)."""
    if lang.get("use_mla") or lang.get("kv_lora_rank"):
        raise ValueError("this checkpoint's decoder uses multi-head latent attention; DeepSynth covers use_mla=false")
    if lang.get("norm_topk_prob"):
        raise ValueError("norm_topk_prob=true is not what DeepSeek-OCR uses; the port routes without it")
    layers = lang["num_hidden_layers"]
    dense = lang.get("first_k_dense_replace", 0)
    return DeepseekOcr2TextConfig(
        vocab_size=lang["vocab_size"], hidden_size=lang["hidden_size"], intermediate_size=lang["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=lang["num_attention_heads"],
        num_key_value_heads=lang.get("num_key_value_heads", lang["num_attention_heads"]),
        max_position_embeddings=lang.get("max_position_embeddings", 8192),
        mlp_layer_types=["dense"] * dense + ["sparse"] * (layers - dense),
        n_routed_experts=lang["n_routed_experts"], num_experts_per_tok=lang["num_experts_per_tok"],
        n_shared_experts=lang["n_shared_experts"], moe_intermediate_size=lang["moe_intermediate_size"],
        topk_method=lang.get("topk_method", "greedy"), n_group=lang.get("n_group"), topk_group=lang.get("topk_group"),
        routed_scaling_factor=lang.get("routed_scaling_factor", 1.0), rms_norm_eps=lang.get("rms_norm_eps", 1e-6),
        bos_token_id=lang.get("bos_token_id", 0), eos_token_id=lang.get("eos_token_id", 1),
        pad_token_id=lang.get("pad_token_id"),
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def tokenizer_of_remote_code_checkpoint(src: str | os.PathLike):
    """The tokenizer of a DeepSeek remote-code checkpoint directory. Its config.json names remote
    code in auto_map, and AutoTokenizer reading that directory asks on the terminal whether to run
    it; the tokenizer files alone, in a folder of their own, load without it."""
    import tempfile

    from transformers import AutoTokenizer

    src = Path(src)
    with tempfile.TemporaryDirectory(prefix="deepsynth-tokenizer-") as folder:
        copied = [shutil.copy(src / name, Path(folder) / name) for name in TOKENIZER_FILES if (src / name).is_file()]
        if not copied:
            raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return AutoTokenizer.from_pretrained(folder)
