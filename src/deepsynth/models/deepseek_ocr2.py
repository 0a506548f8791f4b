"""DeepSeek-OCR-2 through transformers' native classes, plus the tiny offline preset.

The model is `DeepseekOcr2ForConditionalGeneration` and its processor, loaded with
`from_pretrained` (never remote code). This module adds only two things:

* configs: the tiny preset used by tests and the demo, and the real checkpoint's config
  reproduced in code so it can be instantiated on the `meta` device without a download;
* `vision_readout`, a config option (saved in config.json) that chooses which vision-encoder
  outputs become image tokens: "queries" (stock: the learned query positions) or "patches"
  (the encoder's outputs at the patch positions). At 768/1024 px the two give the same
  number of tokens. Tiny models need "patches": at 256 px there are 16 patches and 144 learned
  queries that attend causally to each other, and a from-scratch model learns to ignore the page
  (image-dependent share of the vision output fell from 0.10 to 0.004 within 200 steps).
"""

from __future__ import annotations

import copy
import logging
import math
import re

import torch
from transformers import (
    DeepseekOcr2Config,
    DeepseekOcr2ForConditionalGeneration,
    DeepseekOcr2Processor,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import (
    DeepseekOcr2ImageProcessorPil,
)
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2VisionModel

from deepsynth.models.backend import Backend
from deepsynth.models.deepseek_shared import (V1_MAX_CROPS, V1_MIN_CROPS, text_config_from_language,
                                              tokenizer_of_remote_code_checkpoint, v1_tile_size)
from deepsynth.models.tokenizer import build_char_tokenizer
from deepsynth.render.modes import crop_grid

logger = logging.getLogger(__name__)

CHECKPOINT = "deepseek-community/DeepSeek-OCR-2"
READOUTS = ("queries", "patches")


class PatchReadoutVisionModel(DeepseekOcr2VisionModel):
    """Stock vision tower whose image tokens are the encoder outputs at the patch positions.

    Same modules and weights as `DeepseekOcr2VisionModel` (checkpoints load unchanged); only the
    slice taken from the encoder's output differs.
    """

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        sam = self.sam_encoder(pixel_values, **kwargs)
        patches = sam.last_hidden_state.flatten(2).transpose(1, 2)
        # The encoder's mask lets patches attend only to patches (queries come after them and
        # attend causally), so the patch outputs do not depend on the queries: running the
        # encoder on the patches alone gives the same tokens (tested) at a tenth of the cost.
        encoded = self.vision_encoder(inputs_embeds=patches, num_patches=patches.shape[1], **kwargs)
        return BaseModelOutput(
            last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


def apply_vision_readout(model: DeepseekOcr2ForConditionalGeneration) -> DeepseekOcr2ForConditionalGeneration:
    """Switch the vision tower to the readout named by `config.vision_readout` (default "queries")."""
    readout = getattr(model.config, "vision_readout", "queries")
    if readout not in READOUTS:
        raise ValueError(f"config.vision_readout must be one of {READOUTS}, got {readout!r}")
    tower = model.model.vision_tower
    tower.__class__ = PatchReadoutVisionModel if readout == "patches" else DeepseekOcr2VisionModel
    if readout == "patches":
        # The learned queries no longer reach the output, so they get no gradient; freezing
        # them keeps optimisers and DDP from tracking dead parameters.
        tower.query_768_resolution.weight.requires_grad_(False)
        tower.query_1024_resolution.weight.requires_grad_(False)
    return model


PATCH_READOUT_TYPE = "deepseek_ocr2_patches"


class DeepseekOcr2PatchReadoutConfig(DeepseekOcr2Config):
    """The DeepSeek-OCR-2 config of checkpoints that read image tokens at the patch positions.

    Its own `model_type` makes plain transformers refuse such a checkpoint ("unrecognized model
    type") rather than load it with the stock readout and silently read the page differently;
    importing `deepsynth.models` registers it with the Auto classes, so that
    `AutoModelForImageTextToText.from_pretrained` then builds the patch readout.
    """

    model_type = PATCH_READOUT_TYPE


class DeepseekOcr2PatchReadoutForConditionalGeneration(DeepseekOcr2ForConditionalGeneration):
    """`DeepseekOcr2ForConditionalGeneration` with `PatchReadoutVisionModel` as its vision tower."""

    config_class = DeepseekOcr2PatchReadoutConfig

    def __init__(self, config) -> None:
        config.vision_readout = "patches"
        super().__init__(config)
        apply_vision_readout(self)


def _register_patch_readout() -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    try:
        AutoConfig.register(PATCH_READOUT_TYPE, DeepseekOcr2PatchReadoutConfig)
        AutoModelForImageTextToText.register(DeepseekOcr2PatchReadoutConfig,
                                             DeepseekOcr2PatchReadoutForConditionalGeneration)
        # Same weights as the stock class: the same key renames when loading and saving.
        register_checkpoint_conversion_mapping(PATCH_READOUT_TYPE, get_checkpoint_conversion_mapping("deepseek_ocr2"))
    except ValueError:  # already registered (module reloaded)
        logger.debug("%s already registered", PATCH_READOUT_TYPE)


_register_patch_readout()


def grow_decoder(model: DeepseekOcr2ForConditionalGeneration, layers: int = 0, hidden_size: int = 0,
                 intermediate_size: int = 0) -> DeepseekOcr2ForConditionalGeneration:
    """A copy of `model` with a larger dense decoder that answers as `model` does until training
    moves it (0 = as is). `layers`: new layers are appended. `hidden_size`: the residual stream
    gets wider and every layer gets heads of the same size to match (the config ties the head size
    to hidden_size / heads, and a head that kept its size keeps its RoPE). `intermediate_size`:
    every MLP gets wider. The new parts start random except what writes into the residual stream
    (embeddings, projector, view separator, attention and MLP output projections), which starts at
    zero there: the new dimensions of the stream stay zero and new parts add nothing at first, yet
    everything gets a gradient. RMSNorm weights (and eps) are scaled so that the zero dimensions do
    not change the norm of the old ones."""
    text = model.config.text_config
    head = text.hidden_size // text.num_attention_heads
    have = (text.num_hidden_layers, text.hidden_size, text.intermediate_size)
    want = tuple(new or old for new, old in zip((layers, hidden_size, intermediate_size), have))
    if any(new < old for new, old in zip(want, have)):
        raise ValueError(f"the decoder has {have[0]} layers, width {have[1]} and MLPs {have[2]} wide; "
                         f"growing it to {want[0]}, {want[1]} and {want[2]} would remove some")
    if want[1] % head:
        raise ValueError(f"hidden_size must be a multiple of the head size {head}, got {want[1]}")
    if text.num_key_value_heads != text.num_attention_heads or "sparse" in text.mlp_layer_types:
        raise ValueError("only a dense decoder with as many key/value heads as heads can grow")
    config = copy.deepcopy(model.config)
    grown = config.text_config
    grown.num_hidden_layers, grown.hidden_size, grown.intermediate_size = want
    grown.num_attention_heads = grown.num_key_value_heads = want[1] // head
    grown.head_dim = head
    # RMSNorm's mean square over the wider stream is the old one x width / new width; so is its eps
    grown.rms_norm_eps = text.rms_norm_eps * have[1] / want[1]
    grown.mlp_layer_types = ["dense"] * want[0]
    bigger = type(model)(config)
    old, width = model.state_dict(), have[1]
    norm_scale = math.sqrt(width / want[1])
    with torch.no_grad():
        for name, weight in bigger.state_dict().items():
            if name in old:  # the old weights are the leading block; the rest stays random
                weight[tuple(slice(0, n) for n in old[name].shape)] = old[name]
        lm = bigger.model.language_model
        lm.embed_tokens.weight[:, width:] = 0
        bigger.model.multi_modal_projector.weight[width:] = 0
        bigger.model.multi_modal_projector.bias[width:] = 0
        bigger.model.view_separator[width:] = 0
        for i, layer in enumerate(lm.layers):
            attention_out, mlp_out = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
            if i >= have[0]:
                attention_out.zero_()
                mlp_out.zero_()
                continue
            attention_out[width:] = 0
            attention_out[:, width:] = 0  # the new heads
            mlp_out[width:] = 0
            mlp_out[:, have[2]:] = 0
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:width] *= norm_scale
        lm.norm.weight[:width] *= norm_scale
    bigger.generation_config = copy.deepcopy(model.generation_config)
    return bigger.to(model.dtype)


def tiny_config(vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int,
                eos_token_id: int, image_size: int = 256) -> DeepseekOcr2Config:
    """The tiny preset: the real architecture at ~4.0M parameters, for CPU tests and the demo.

    Sizes follow what was measured to learn on 2 CPU cores: SAM 128 x 2 layers, vision encoder
    192 x 2, dense decoder 192 x 3. SAM's default initializer_range is 1e-10 (real weights
    overwrite it); a randomly initialised model needs 0.02.
    """
    sam = dict(
        hidden_size=128, output_channels=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=16, window_size=8, global_attn_indexes=[1],
        downsample_channels=[128, 192], initializer_range=0.02,
    )
    encoder = dict(
        hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=8, max_position_embeddings=512,
    )
    text = dict(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, mlp_layer_types=["dense"] * 3,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
        max_position_embeddings=1024, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    config = DeepseekOcr2PatchReadoutConfig(
        vision_config={"sam_config": sam, "encoder_config": encoder},
        text_config=text,
        image_token_id=image_token_id,
    )
    config.vision_readout = "patches"
    return config


def tiny_processor(image_size: int = 256, patch_size: int = 16) -> DeepseekOcr2Processor:
    """Processor for the tiny presets: one global view per page, no local crops, char tokenizer."""
    image_processor = DeepseekOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, tile_size=image_size, crop_to_patches=False
    )
    processor = DeepseekOcr2Processor(
        image_processor=image_processor, tokenizer=build_char_tokenizer(), patch_size=patch_size, downsample_ratio=4
    )
    set_crop_mode(processor, "none")  # the processor class's default would cut crops anyway
    return processor


def build_tiny(seed: int = 0, image_size: int = 256) -> tuple[DeepseekOcr2ForConditionalGeneration, DeepseekOcr2Processor]:
    """A randomly initialised tiny DeepSeek-OCR-2 and its processor (deterministic for a seed)."""
    processor = tiny_processor(image_size)
    tok = processor.tokenizer
    config = tiny_config(
        vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, image_size=image_size,
    )
    torch.manual_seed(seed)
    model = DeepseekOcr2PatchReadoutForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def build_tiny_page(seed: int = 0, patch_size: int = 8) -> tuple[DeepseekOcr2ForConditionalGeneration,
                                                                   DeepseekOcr2Processor]:
    """The page reader's preset (`deepsynth.training.page_reader`): the tiny preset with a token grid
    fine enough to read a page of small type. SAM cuts the 256 px page into 8 px patches (32 x 32)
    and its two stride-2 convolutions leave one image token per 32 x 32 px (64 per page: one row per
    line and two characters per token on the "reader-large" render preset the shipped reader reads,
    one row per two lines and eight characters on "reader"). SAM is 64 wide
    with windowed attention only (the vision encoder after it attends across the whole page) and
    a 64-channel neck. Decoder positions reach 4096 for multi-page documents. `patch_size` 4 gives
    the finer grid (16 px per token, 256 per page): its steps cost about three times as much and
    a fresh reader on it started using the page later (benchmarks/page_reader_diagnostic.py)."""
    image_size = 256
    processor = tiny_processor(image_size, patch_size)
    tok = processor.tokenizer
    config = tiny_config(
        vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, image_size=image_size,
    )
    sam = config.vision_config.sam_config
    sam.patch_size, sam.hidden_size, sam.mlp_dim, sam.output_channels = patch_size, 64, 256, 64
    sam.window_size, sam.global_attn_indexes = 8, []
    config.vision_config.encoder_config.max_position_embeddings = 1024
    config.text_config.max_position_embeddings = 4096
    torch.manual_seed(seed)
    model = DeepseekOcr2PatchReadoutForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def real_config() -> DeepseekOcr2Config:
    """The config of `deepseek-community/DeepSeek-OCR-2`, reproduced so it builds on `meta` offline.

    SAM ViT-B (768 x 12) -> Qwen2-style encoder (896 x 24) -> linear projector -> DeepSeek-V2
    MoE decoder (1280 x 12, first layer dense, 64 routed experts, 6 active, 2 shared).
    """
    sam = dict(downsample_channels=[512, 896])
    # RoPE base 1e6 as in the released encoder (Qwen2-0.5B's; vLLM's native class builds it so),
    # not the config class's default 1e4
    encoder = dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    text = dict(
        vocab_size=129280, hidden_size=1280, intermediate_size=6848, num_hidden_layers=12,
        num_attention_heads=10, num_key_value_heads=10, mlp_layer_types=["dense"] + ["sparse"] * 11,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=896,
        max_position_embeddings=8192, bos_token_id=0, eos_token_id=1,
    )
    return DeepseekOcr2Config(
        vision_config={"sam_config": sam, "encoder_config": encoder}, text_config=text, image_token_id=128815
    )


# ---- backend -----------------------------------------------------------------------------------
CROP_MODES = ("none", "tiles")


def set_crop_mode(processor: DeepseekOcr2Processor, crop_mode: str | None) -> None:
    """Make the processor's crop mode explicit, so that the image-token count it writes into the
    prompt always equals the features the model produces.

    "none": one global view per page. The processor class's own default (`crop_to_patches=True`)
    overrides the image processor's saved setting, so it is replaced on the instance; the global
    view is drawn at `size`, and `tile_size` follows it (a smaller tile_size would shrink the view
    while the token count still assumes `size`).
    "tiles": the global view plus local crops of `tile_size` (the released checkpoint's mode).
    None: leave the processor as it was saved.
    In every case the image processor draws pages by DeepSeek's rules (`use_page_rules`).
    """
    use_page_rules(processor)
    if crop_mode is None:
        return
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode={crop_mode!r}: choose one of {CROP_MODES}")
    image_processor = processor.image_processor
    kwargs = dict(type(processor).images_kwargs)
    if crop_mode == "none":
        kwargs.update(crop_to_patches=False, tile_size=image_processor.size["height"])
    else:
        kwargs.update(crop_to_patches=True)
    processor.images_kwargs = kwargs


# ---- DeepSeek's own repository layout (deepseek-ai/DeepSeek-OCR-2) ------------------------------
# Its config.json is the remote-code one: model_type "deepseek_vl_v2" (shared with DeepSeek-OCR v1
# and DeepSeek-VL2), architectures ["DeepseekOCR2ForCausalLM"], auto_map to
# modeling_deepseekocr2, `language_config`, `vision_config.width` {"sam_vit_b", "qwen2-0-5b"},
# `projector_config`; saved again by that code it says model_type "DeepseekOCR2". Its weights use the
# original names (model.sam_model.*, model.qwen2_model.*, per-expert MoE weights, ...), which
# transformers' own checkpoint conversion for deepseek_ocr2 renames at load time, so only the config
# is translated here.
OFFICIAL_CHECKPOINT = "deepseek-ai/DeepSeek-OCR-2"
OFFICIAL_ARCHITECTURE = "DeepseekOCR2ForCausalLM"
OFFICIAL_RESAVED_TYPE = "DeepseekOCR2"
# The Qwen2-0.5B encoder as the official code builds it (`build_qwen2_decoder_as_encoder`); the
# config names only its width ("dim"), so the rest are its fixed values unless a key says otherwise.
_OFFICIAL_ENCODER = dict(layers=24, heads=14, kv_heads=2, intermediate_size=4864, rope_theta=1000000.0,
                         vocab_size=151936, max_position_embeddings=131072)


def is_official_config(data: dict) -> bool:
    """A config.json in the layout of DeepSeek's own DeepSeek-OCR-2 repository."""
    architectures = data.get("architectures") or []
    auto_model = str((data.get("auto_map") or {}).get("AutoModel", ""))
    widths = (data.get("vision_config") or {}).get("width") or {}
    return (OFFICIAL_ARCHITECTURE in architectures or data.get("model_type") == OFFICIAL_RESAVED_TYPE
            or auto_model.endswith("." + OFFICIAL_ARCHITECTURE)
            or (data.get("model_type") == "deepseek_vl_v2" and isinstance(widths, dict) and "qwen2-0-5b" in widths))


def config_from_official(original: dict, image_token_id: int) -> DeepseekOcr2Config:
    """`DeepseekOcr2Config` from the official config.json. Keys beyond the published file (tiny test
    checkpoints): `sam_vit_b` may carry image_size/patch_size/window_size/output_channels/mlp_dim,
    `qwen2-0-5b` the encoder's layers/heads/kv_heads/intermediate_size/rope_theta/vocab_size/
    max_position_embeddings."""
    where = "DeepSeek-OCR-2 config.json"
    vision = original.get("vision_config") or {}
    widths = vision.get("width") or {}
    if "sam_vit_b" not in widths or "qwen2-0-5b" not in widths:
        raise ValueError(f"{where}: vision_config.width needs 'sam_vit_b' and 'qwen2-0-5b' entries")
    sam, qwen = widths["sam_vit_b"], {**_OFFICIAL_ENCODER, **widths["qwen2-0-5b"]}
    projector = original.get("projector_config") or {}
    if projector.get("projector_type", "linear") != "linear":
        raise ValueError(f"{where}: projector_type {projector['projector_type']!r}; DeepSeek-OCR-2 has a linear one")
    dim = qwen["dim"]
    if projector.get("input_dim", dim) != dim:
        raise ValueError(f"{where}: projector_config.input_dim {projector['input_dim']} != the encoder width {dim}")
    image_size = sam.get("image_size", vision.get("image_size", REAL_PAGE_SIZE))
    sam_config = dict(
        hidden_size=sam["width"], num_hidden_layers=sam["layers"], num_attention_heads=sam["heads"],
        image_size=image_size, patch_size=sam.get("patch_size", 16), window_size=sam.get("window_size", 14),
        global_attn_indexes=list(sam["global_attn_indexes"]), output_channels=sam.get("output_channels", 256),
        # The official code's SAM ends in `dim` channels (the encoder's width) whatever
        # downsample_channels says (the published file repeats v1's [512, 1024]).
        downsample_channels=[sam.get("downsample_channels", [512])[0], dim],
        **({"mlp_dim": sam["mlp_dim"]} if "mlp_dim" in sam else {}),
    )
    encoder = dict(
        hidden_size=dim, intermediate_size=qwen["intermediate_size"], num_hidden_layers=qwen["layers"],
        num_attention_heads=qwen["heads"], num_key_value_heads=qwen["kv_heads"], vocab_size=qwen["vocab_size"],
        max_position_embeddings=qwen["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(qwen["rope_theta"])},
    )
    text = text_config_from_language(original.get("language_config") or original)
    if projector.get("n_embed", text.hidden_size) != text.hidden_size:
        raise ValueError(f"{where}: projector_config.n_embed {projector['n_embed']} != hidden_size {text.hidden_size}")
    return DeepseekOcr2Config(vision_config={"sam_config": sam_config, "encoder_config": encoder},
                              text_config=text.to_dict(), image_token_id=image_token_id)


def official_processor(tokenizer, image_size: int | None = None) -> DeepseekOcr2Processor:
    """The official repository's image settings (its `infer` defaults: a `base_size` global view,
    768 px local crops of 1024 px pages) on the repository's tokenizer."""
    image_size = image_size or REAL_PAGE_SIZE
    tile = REAL_TILE_SIZE if image_size == REAL_PAGE_SIZE else image_size
    image_processor = DeepseekOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, tile_size=tile)
    return DeepseekOcr2Processor(image_processor=image_processor, tokenizer=tokenizer)


def convert_official(src, dst):
    """Rewrite DeepSeek's own layout in `src` as a directory the native class loads: the translated
    config.json, the weights linked (not copied) under a generated index, and the processor files.
    Tensor names stay the official ones; transformers' deepseek_ocr2 conversion renames them at load."""
    import json
    import os
    import shutil
    from pathlib import Path

    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no .safetensors weights")
    tokenizer = tokenizer_of_remote_code_checkpoint(src)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"{src}: the tokenizer has no <image> token (a DeepSeek-OCR-2 checkpoint has one)")
    config = config_from_official(json.loads((src / "config.json").read_text()), image_token_id)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    weight_map = {}
    for file in files:
        try:
            os.symlink(file.resolve(), tmp / file.name)
        except OSError:  # no symlinks on this file system
            shutil.copy(file, tmp / file.name)
        with safe_open(str(file), "pt") as handle:
            weight_map.update({key: file.name for key in handle.keys()})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    official_processor(tokenizer, config.vision_config.sam_config.image_size).save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    logger.info("converted DeepSeek-OCR-2 checkpoint %s -> %s", src, dst)
    return dst


def _official_cache(src) -> "Path":
    import hashlib
    import os
    from pathlib import Path

    files = sorted(Path(src).glob("*.safetensors")) + [Path(src) / "config.json"]
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    digest = hashlib.sha256(f"{Path(src).resolve()}|{stamp}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("DEEPSYNTH_CACHE", Path.home() / ".cache" / "deepsynth"))
    return root / "deepseek-ocr-2-official" / digest


def converted_official(path: str) -> "Path":
    """The folder in transformers' layout for a checkpoint in DeepSeek's own layout (a directory or a
    hub id), converted once into the cache (`$DEEPSYNTH_CACHE`, default ~/.cache/deepsynth)."""
    from pathlib import Path

    local = Path(path)
    if not local.exists():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    target = _official_cache(local)
    if not (target / "config.json").is_file():
        convert_official(local, target)
    return target


def load_official(path: str, dtype: torch.dtype | None = None):
    """(model, processor) from DeepSeek's own layout (`converted_official`); a checkpoint weight the
    model lacks, or a model weight the checkpoint lacks, is an error."""
    from transformers import AutoProcessor

    target = converted_official(path)
    model, info = DeepseekOcr2ForConditionalGeneration.from_pretrained(target, dtype=dtype, output_loading_info=True)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: the weights do not match DeepSeek-OCR-2 under its config.json (missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {mismatched[:5]})")
    processor = AutoProcessor.from_pretrained(target)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


def load(path: str, dtype: torch.dtype | None = None, config: dict | None = None):
    """Backend loader: the native class and its processor, with the saved vision readout; DeepSeek's
    own repository layout through `load_official`. config: config.json as the resolver read it
    (None: read here)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from deepsynth.models.config_file import read_config

    if is_official_config(config if config is not None else read_config(path)[0]):
        return load_official(path, dtype)
    # The Auto class picks the patch-readout class for its model type; older checkpoints that
    # store `vision_readout` under the stock type get the readout applied here.
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return apply_vision_readout(model), AutoProcessor.from_pretrained(path)


def _build_tiny_preset(seed: int = 0):
    model, processor = build_tiny(seed=seed)
    set_crop_mode(processor, "none")
    return model, processor




# ---- crop mode, image tokens, LoRA on the routed experts, parameter groups ---------------------
# (used by peft_utils, memory and the real-size check; the backend exposes them)
# The released processor's image settings (`DeepseekOcr2ImageProcessorPil()` defaults): a 1024 px
# global view, and local crops of 768 px, 2 to 6 of them, for pages larger than a crop.
REAL_PAGE_SIZE = 1024
REAL_TILE_SIZE = 768
REAL_MIN_PATCHES, REAL_MAX_PATCHES = 2, 6


def effective_image_settings(processor) -> dict:
    """What the processor will use at call time: its `images_kwargs` (instance or class default,
    which win, see `set_crop_mode`) over the image processor's own attributes."""
    ip = processor.image_processor
    kwargs = dict(getattr(processor, "images_kwargs", {}) or {})
    return {key: kwargs.get(key, getattr(ip, key)) for key in ("crop_to_patches", "tile_size", "min_patches",
                                                              "max_patches")} | {"size": ip.size["height"]}


def crop_mode_of(processor) -> str:
    """The crop mode the processor applies at call time ("tiles" or "none")."""
    return "tiles" if effective_image_settings(processor)["crop_to_patches"] else "none"


def _image_settings(config_or_processor, crop_mode: str) -> dict:
    """Page size, tile size, crop limits, token geometry and v1's row newlines, from a processor or
    (for estimates without one) from a config: the released settings at 1024 px, else one view of
    the SAM input size."""
    if hasattr(config_or_processor, "image_processor"):
        settings = effective_image_settings(config_or_processor)
        side = settings["size"]
        tile = settings["tile_size"] if crop_mode == "tiles" else side
        return dict(side=side, tile=tile, min_patches=settings["min_patches"], max_patches=settings["max_patches"],
                    cell=config_or_processor.patch_size * config_or_processor.downsample_ratio,
                    newlines=type(config_or_processor).__name__ == "DeepseekOcrV1Processor")
    config = config_or_processor
    v1 = config.model_type == "deepseek_ocr_v1"
    sam = config.sam_config if v1 else config.vision_config.sam_config
    side = sam.image_size
    if v1:
        tile = v1_tile_size(side) if crop_mode == "tiles" else side
        return dict(side=side, tile=tile, min_patches=V1_MIN_CROPS, max_patches=V1_MAX_CROPS,
                    cell=sam.patch_size * 4, newlines=True)
    tile = (REAL_TILE_SIZE if side == REAL_PAGE_SIZE else side) if crop_mode == "tiles" else side
    return dict(side=side, tile=tile, min_patches=REAL_MIN_PATCHES, max_patches=REAL_MAX_PATCHES,
                cell=sam.patch_size * 4, newlines=False)


def local_crops(width: int, height: int, tile: int, min_patches: int = REAL_MIN_PATCHES,
                max_patches: int = REAL_MAX_PATCHES) -> int:
    """Local crops the image processor cuts from a width x height page (0 when it fits one tile)."""
    columns, rows = crop_grid(width, height, tile, min_patches, max_patches)
    return columns * rows


# ---- page preprocessing as DeepSeek's own code does it ------------------------------------------
# Without crops, DeepSeek's `infer` (and its vLLM scripts) STRETCH a page to the square view when the
# view's side is at most this (v1's Tiny 512 / Small 640; OCR-2 up to 768) and PAD it above (aspect
# kept, centred, in the normalisation mean's colour: v1 Base 1024 / Large 1280); with crops the
# global view is always padded. transformers' image processor always pads, so the processors here
# use `DeepseekOcrPageImageProcessor` instead.
STRETCH_MAX_SIDE = 768


def _pil_page(array):
    """The page as the PIL image DeepSeek's code works on (transformers hands over channels-first uint8)."""
    import numpy as np
    from PIL import Image

    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"page pixels of shape {tuple(array.shape)} and dtype {array.dtype}: DeepSeek-OCR "
                         "pages are 8-bit RGB images (pass PIL images or uint8 arrays)")
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")


class DeepseekOcrPageImageProcessor(DeepseekOcr2ImageProcessorPil):
    """transformers' DeepSeek-OCR-2 image processor with DeepSeek's own page rules (its `infer` and
    `dynamic_preprocess`): same settings (`size`, `tile_size`, `crop_to_patches`, `min_patches`,
    `max_patches`, `background_color`, mean/std) and outputs, PIL bicubic resampling throughout.

    * crops (`crop_to_patches`): pages larger than `tile_size` are resized to the `crop_grid` and cut
      into tiles, row by row; the global view is the page padded to `size` (aspect kept, centred);
    * no crops: the view has side `tile_size` (`set_crop_mode` makes it `size`); the page is stretched
      to it when the side is at most `stretch_max_side`, padded otherwise.

    Saved as the stock class (`to_dict`), so checkpoints load in plain transformers; our loaders put
    this class back (`use_page_rules`).
    """

    # Largest no-crop view that is stretched rather than padded (v1's subclass: 640).
    stretch_max_side = STRETCH_MAX_SIDE
    # num_local_patches holds each page's (columns, rows) instead of its crop count (v1 lays crops
    # out as a grid with a newline per row, so its model needs the grid).
    crop_grid_output = False

    def to_dict(self):
        out = super().to_dict()
        out["image_processor_type"] = DeepseekOcr2ImageProcessorPil.__name__
        return out

    def _pixels(self, image, do_rescale, rescale_factor, do_normalize, image_mean, image_std):
        import numpy as np

        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        if do_rescale:
            # x / 255 as torchvision's ToTensor computes it (x * (1/255) differs in the last bit)
            array = array / np.float32(1 / rescale_factor) if rescale_factor == 1 / 255 else array * rescale_factor
        if do_normalize:
            mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
            array = (array - mean) / std
        return np.ascontiguousarray(array, dtype=np.float32)

    def _preprocess(self, images, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
                    return_tensors, crop_to_patches=True, min_patches=2, max_patches=6, tile_size=768,
                    background_color=None, **kwargs):
        from PIL import ImageOps
        from transformers.image_processing_utils import BatchFeature

        colour = tuple(int(c) for c in (background_color if background_color is not None else self.background_color))
        resample = int(resample if resample is not None else self.resample)
        pixels = dict(do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize,
                      image_mean=image_mean, image_std=image_std)
        views, crops, counts = [], [], []
        for array in images:
            page = _pil_page(array)
            columns, rows = crop_grid(*page.size, tile_size, min_patches, max_patches) if crop_to_patches else (0, 0)
            if columns:
                grid = page.resize((tile_size * columns, tile_size * rows), resample)
                for i in range(columns * rows):
                    x, y = (i % columns) * tile_size, (i // columns) * tile_size
                    crops.append(self._pixels(grid.crop((x, y, x + tile_size, y + tile_size)), **pixels))
            counts.append([columns, rows] if self.crop_grid_output else columns * rows)
            side = size.height if crop_to_patches else tile_size
            if not crop_to_patches and side <= self.stretch_max_side:
                page = page.resize((side, side), resample)
            views.append(self._pixels(ImageOps.pad(page, (side, side), method=resample, color=colour), **pixels))
        data = {"pixel_values": views, "num_local_patches": counts}
        if crops:
            data["pixel_values_local"] = crops
        return BatchFeature(data=data, tensor_type=return_tensors)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        kwargs = self._merge_and_standardize_kwargs(**(images_kwargs or {}))
        if not kwargs["crop_to_patches"]:
            return 1
        columns, rows = crop_grid(width, height, kwargs["tile_size"], kwargs["min_patches"], kwargs["max_patches"])
        return 1 + columns * rows


def use_page_rules(processor, page_class: type = DeepseekOcrPageImageProcessor) -> None:
    """Give the processor an image processor that draws pages by DeepSeek's rules: transformers'
    PIL image processor (as saved, as loaded) becomes `page_class` with the same settings."""
    ip = processor.image_processor
    if isinstance(ip, page_class):
        return
    if type(ip) is DeepseekOcr2ImageProcessorPil or (
            isinstance(ip, DeepseekOcrPageImageProcessor) and issubclass(page_class, DeepseekOcrPageImageProcessor)):
        ip.__class__ = page_class  # no state of its own: the same settings, DeepSeek's drawing
        return
    raise ValueError(f"{type(ip).__name__}: DeepSeek-OCR pages need transformers' PIL image processor "
                     "(DeepseekOcr2ImageProcessorPil); load the processor without the torchvision backend")


def image_tokens(config_or_processor, width: int, height: int, crop_mode: str = "none") -> int:
    """Image tokens of one width x height page in `crop_mode`: the global view's grid, each local
    crop's grid, and the view separator. v1 adds a newline token after every row of the global grid
    and after every row of the crops' joint grid (columns x rows crops of q x q tokens: q x rows rows
    of q x columns tokens)."""
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {crop_mode!r}")
    if width < 1 or height < 1:
        raise ValueError(f"page size must be positive, got {width} x {height}")
    s = _image_settings(config_or_processor, crop_mode)
    columns, rows = crop_grid(width, height, s["tile"], s["min_patches"], s["max_patches"]) \
        if crop_mode == "tiles" else (0, 0)
    q, qt = math.ceil(s["side"] / s["cell"]), math.ceil(s["tile"] / s["cell"])
    if s["newlines"]:
        return q * (q + 1) + 1 + (qt * columns + 1) * qt * rows
    return q * q + columns * rows * qt * qt + 1


def vision_views(config_or_processor, width: int, height: int, crop_mode: str = "none") -> list[int]:
    """Side in pixels of every view the vision tower encodes for one page (global first, then crops)."""
    s = _image_settings(config_or_processor, crop_mode)
    crops = local_crops(width, height, s["tile"], s["min_patches"], s["max_patches"]) if crop_mode == "tiles" else 0
    return [s["side"]] + [s["tile"]] * crops


def vision_tokens(config, stack: str, side: int = REAL_PAGE_SIZE, crop_mode: str = "none") -> int:
    """Tokens through a vision stack for one side x side page, summed over its views: SAM ("sam" in
    the stack's name) sees the 16 px patches; the encoder sees the 4x-downsampled patches plus its
    learned queries (144 up to 768 px, else 256)."""
    sam = config.vision_config.sam_config
    total = 0
    for view in vision_views(config, side, side, crop_mode):
        patches = (view // sam.patch_size) ** 2
        total += patches if "sam" in stack else patches // 16 + (144 if patches // 16 <= 144 else 256)
    return total


# The routed experts are fused 3-D parameters of `DeepseekOcr2TextExperts` (not nn.Linear), so peft
# reaches them through `target_parameters` (suffix match on the parameter name).
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def lora_expert_parameters(model: torch.nn.Module) -> list[str]:
    """peft `target_parameters` for the decoder's routed experts; [] for a dense decoder."""
    names = {n.replace(".base_layer", "") for n, p in model.named_parameters() if p.ndim == 3}
    return [target for target in EXPERT_PARAMETERS if any(n.endswith("." + target) for n in names)]


_GROUP_PATTERNS = (  # first match wins; names may carry peft's prefixes and `base_layer` / `lora_A` parts
    ("vision", re.compile(r"(^|\.)vision_tower\.")),
    ("projector", re.compile(r"(^|\.)(multi_modal_projector\.|view_separator$|image_newline$)")),
    ("embeddings", re.compile(r"(^|\.)(embed_tokens\.|lm_head\.)")),
    ("routed_experts", re.compile(r"\.mlp\.experts\.")),
    ("shared_experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("router", re.compile(r"\.mlp\.gate\.weight$")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("dense_mlp", re.compile(r"\.mlp\.")),
    ("norms", re.compile(r"(layernorm|\.norm)\.weight$")),
)


def parameter_group(name: str) -> str:
    """The report group of a parameter: attention, dense_mlp, shared_experts, routed_experts,
    router, vision, projector, embeddings, norms, or other (text encoder, ...)."""
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "other"


def build_tiny_moe(seed: int = 0, n_experts: int = 4, image_size: int = 256):
    """The tiny preset with routed experts: decoder layers dense, sparse, sparse; `n_experts` routed
    experts (top-2, one shared), for tests of LoRA on the experts. Returns (model, processor)."""
    processor = tiny_processor(image_size)
    tok = processor.tokenizer
    config = tiny_config(
        vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, image_size=image_size,
    )
    config.text_config.mlp_layer_types = ["dense", "sparse", "sparse"]
    config.text_config.n_routed_experts = n_experts
    torch.manual_seed(seed)
    model = apply_vision_readout(DeepseekOcr2ForConditionalGeneration(config))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def build_random(seed: int = 0):
    """The released architecture (`real_config()`, 3.39B parameters) with random bf16 weights, the
    released 1024 px image processor and a stand-in tokenizer of the real vocabulary size: the base
    that the real-size check (`deepsynth.training.real_size`) trains, saves and reloads, offline."""
    from deepsynth.models.stand_in import random_weights, stand_in_tokenizer

    config = real_config()
    tok = stand_in_tokenizer(config.text_config.vocab_size, config.image_token_id)
    processor = DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tok)
    model = apply_vision_readout(random_weights(DeepseekOcr2ForConditionalGeneration, config, seed))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    set_crop_mode(processor, "none")
    return model, processor


BACKEND = Backend(
    name="deepseek-ocr-2", model_types=("deepseek_ocr2", PATCH_READOUT_TYPE, OFFICIAL_RESAVED_TYPE), load=load,
    recognizes=is_official_config,
    presets={"tiny": _build_tiny_preset, "tiny-page": build_tiny_page, "tiny-moe": build_tiny_moe, "random-deepseek-ocr-2": build_random},
    # The converted checkpoint (native classes, processor files); `deepseek-ai/DeepSeek-OCR-2` itself
    # also loads, through `load_official`.
    aliases={"deepseek-ocr-2": CHECKPOINT, "deepseek-ocr2": CHECKPOINT},
    prompt_layout="plain", render_preset="large", preset_render="tiny", real_size_presets=("random-deepseek-ocr-2",),
    encodes_pages=True,
    configure_processor=set_crop_mode, default_crop_mode=None,
    lora_target_parameters=lora_expert_parameters, parameter_group=parameter_group,
    image_tokens=image_tokens, vision_tokens=vision_tokens,
)
