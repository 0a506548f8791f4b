"""DeepSeek-OCR v1 (`deepseek-ai/DeepSeek-OCR`) ported onto transformers 5 building blocks.

The published checkpoint is remote code written for transformers 4.46 (`trust_remote_code`), which
does not import under transformers 5. v1 and DeepSeek-OCR-2 share most of their parts, so the port
assembles v1 from classes transformers already ships and adds only the glue (docs/backends.md
explains the choice):

* SAM ViT-B + two downsampling convolutions: `DeepseekOcr2SamVisionEncoder` (v1: 512 -> 1024 channels);
* CLIP-L/14 whose patch embeddings are the SAM features (v1's "DeepEncoder"): transformers'
  `CLIPEncoder` plus an embedding module that takes SAM features instead of pixels;
* projector: `Linear(1024 + 1024 -> 1280)` on [CLIP tokens without CLS, SAM tokens];
* layout: the 16 x 16 feature grid with a learned `image_newline` after each row, then the learned
  view separator (273 tokens for one 1024 px page);
* decoder: `DeepseekOcr2TextModel` (DeepSeek-V2 MoE, 1280 x 12, MHA, 64 routed experts top-6,
  2 shared; softmax greedy routing as in v1), plus `lm_head`.

`convert_v1_checkpoint(src, dst)` rewrites a v1 directory (its config.json and weights under the
original key names) into a `save_pretrained` directory of `DeepseekOcrV1ForConditionalGeneration`
(`V1_KEY_MAP`; per-expert weights fused into 3-D tensors, CLIP's fused qkv split);
`to_v1_state_dict` is the inverse. `load_v1` does the conversion once into a cache directory and
loads the result; the registry calls it for checkpoints whose config names `DeepseekOCRForCausalLM`.

Pages are drawn as v1's `infer` draws them, in each of its modes (`v1_image_processor`): Tiny 512,
Small 640 (the page stretched to the square view), Base 1024, Large 1280 (padded, aspect kept), and
Gundam: a 1024 px padded global view plus 640 px local crops, 2 to 9 of them in the grid closest to
the page's aspect ratio (`crop_grid`). In Gundam the model lays the crops out as one grid with a
newline after each row and puts them before the global view, then the view separator, as v1's
forward does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, PreTrainedConfig
from transformers.initialization import normal_ as init_normal_
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.clip.modeling_clip import CLIPEncoder
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
    DeepseekOcr2SamVisionConfig,
    DeepseekOcr2TextConfig,
)
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2ForConditionalGeneration,
    DeepseekOcr2Model,
    DeepseekOcr2ModelOutputWithPooling,
    DeepseekOcr2PreTrainedModel,
    DeepseekOcr2SamVisionEncoder,
    DeepseekOcr2TextModel,
)
from transformers.models.deepseek_ocr2.processing_deepseek_ocr2 import DeepseekOcr2Processor

from deepsynth.models.backend import Backend
from deepsynth.models.deepseek_ocr2 import DeepseekOcrPageImageProcessor
from deepsynth.models.deepseek_shared import (  # noqa: F401  (v1 names, kept importable from here)
    TOKENIZER_FILES, V1_GUNDAM_SIZE, V1_GUNDAM_TILE, V1_MAX_CROPS, V1_MIN_CROPS, text_config_from_language,
    tokenizer_of_remote_code_checkpoint, v1_tile_size)

logger = logging.getLogger(__name__)

V1_CHECKPOINT = "deepseek-ai/DeepSeek-OCR"
V1_ARCHITECTURE = "DeepseekOCRForCausalLM"
# What v1's remote code (DeepseekOCRConfig) writes when a loaded model is saved again.
RESAVED_MODEL_TYPE = "DeepseekOCR"
MODEL_TYPE = "deepseek_ocr_v1"


# ---- config ------------------------------------------------------------------------------------
@strict
class DeepseekOcrV1Config(PreTrainedConfig):
    """SAM (`sam_config`) + CLIP-L (`clip_config`) + projector + DeepSeek-V2 MoE decoder (`text_config`)."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "sam_config": DeepseekOcr2SamVisionConfig,
        "clip_config": CLIPVisionConfig,
        "text_config": DeepseekOcr2TextConfig,
    }
    sam_config: dict | PreTrainedConfig | None = None
    clip_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 128815
    tie_word_embeddings: bool = False


def real_v1_config() -> DeepseekOcrV1Config:
    """The config of `deepseek-ai/DeepSeek-OCR` (3,336,106,240 parameters), from its config.json."""
    return v1_config_from_original(json.loads(json.dumps(REAL_V1_CONFIG_JSON)))


# The parts of the published config.json the port reads (transformers 4.46 remote-code layout).
REAL_V1_CONFIG_JSON = {
    "architectures": [V1_ARCHITECTURE],
    "model_type": "deepseek_vl_v2",
    "language_config": {
        "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 1280,
        "intermediate_size": 6848, "max_position_embeddings": 8192, "moe_intermediate_size": 896,
        "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "num_attention_heads": 10,
        "num_experts_per_tok": 6, "num_hidden_layers": 12, "num_key_value_heads": 10, "topk_group": 1,
        "topk_method": "greedy", "use_mla": False, "vocab_size": 129280,
    },
    "projector_config": {"input_dim": 2048, "n_embed": 1280, "projector_type": "linear"},
    "vision_config": {
        "image_size": 1024,
        "width": {
            "clip-l-14-224": {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024},
            "sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11], "heads": 12,
                          "layers": 12, "width": 768},
        },
    },
}


def v1_config_from_original(original: dict) -> DeepseekOcrV1Config:
    """Our config from a v1 config.json (`language_config`, `vision_config.width`, `projector_config`).

    Extra keys understood beyond the published file (used by tiny test checkpoints): `sam_vit_b`
    may carry image_size/patch_size/window_size/output_channels; `clip-l-14-224` may carry
    intermediate_size (default 4 x width).
    """
    # A checkpoint re-saved by the remote code keeps `language_config`; its DeepseekV2Config parent
    # also writes the same fields at the top level, which is all a stripped-down copy may have.
    lang = original.get("language_config") or original
    if "vision_config" not in original or "width" not in original["vision_config"]:
        raise ValueError("this DeepSeek-OCR v1 config.json has no vision_config.width (sam_vit_b, clip-l-14-224)")
    widths = original["vision_config"]["width"]
    sam, clip = widths["sam_vit_b"], widths["clip-l-14-224"]
    text = text_config_from_language(lang)
    image_size = sam.get("image_size", original["vision_config"].get("image_size", 1024))
    sam_config = DeepseekOcr2SamVisionConfig(
        hidden_size=sam["width"], num_hidden_layers=sam["layers"], num_attention_heads=sam["heads"],
        image_size=image_size, patch_size=sam.get("patch_size", 16), window_size=sam.get("window_size", 14),
        global_attn_indexes=sam["global_attn_indexes"], output_channels=sam.get("output_channels", 256),
        downsample_channels=sam["downsample_channels"],
    )
    clip_config = CLIPVisionConfig(
        hidden_size=clip["width"], intermediate_size=clip.get("intermediate_size", 4 * clip["width"]),
        num_hidden_layers=clip["layers"], num_attention_heads=clip["heads"], image_size=clip["image_size"],
        patch_size=clip["patch_size"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    projector = original.get("projector_config", {})
    if projector.get("projector_type", "linear") != "linear":
        raise ValueError(f"projector_type {projector['projector_type']!r}: the port covers the linear projector")
    if sam["downsample_channels"][1] != clip["width"]:
        raise ValueError("SAM's output channels must equal CLIP's width (SAM features are CLIP's patch embeddings)")
    return DeepseekOcrV1Config(sam_config=sam_config, clip_config=clip_config, text_config=text,
                               image_token_id=original.get("image_token_id", 128815))


def original_config_from_v1(config: DeepseekOcrV1Config) -> dict:
    """The inverse of `v1_config_from_original` (writes tiny checkpoints in the v1 layout)."""
    text, sam, clip = config.text_config, config.sam_config, config.clip_config
    dense = sum(1 for t in text.mlp_layer_types if t == "dense")
    lang = {
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
        "first_k_dense_replace": dense, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings, "moe_intermediate_size": text.moe_intermediate_size,
        "n_group": text.n_group, "n_routed_experts": text.n_routed_experts, "n_shared_experts": text.n_shared_experts,
        "num_attention_heads": text.num_attention_heads, "num_experts_per_tok": text.num_experts_per_tok,
        "num_hidden_layers": text.num_hidden_layers, "num_key_value_heads": text.num_key_value_heads,
        "topk_group": text.topk_group, "topk_method": text.topk_method, "use_mla": False,
        "vocab_size": text.vocab_size, "kv_lora_rank": None, "q_lora_rank": None,
        # as the released config.json: no latent attention (vLLM's native class reads these)
        "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0,
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "rms_norm_eps": text.rms_norm_eps, "routed_scaling_factor": text.routed_scaling_factor,
    }
    return {
        "architectures": [V1_ARCHITECTURE], "model_type": "deepseek_vl_v2", "language_config": lang,
        "tile_tag": "2D", "global_view_pos": "head", "candidate_resolutions": [[1024, 1024]],
        "projector_config": {"input_dim": 2 * clip.hidden_size, "n_embed": text.hidden_size, "projector_type": "linear"},
        "vision_config": {"image_size": sam.image_size, "width": {
            "clip-l-14-224": {"heads": clip.num_attention_heads, "image_size": clip.image_size,
                              "layers": clip.num_hidden_layers, "patch_size": clip.patch_size,
                              "width": clip.hidden_size, "intermediate_size": clip.intermediate_size},
            "sam_vit_b": {"downsample_channels": list(sam.downsample_channels),
                          "global_attn_indexes": list(sam.global_attn_indexes), "heads": sam.num_attention_heads,
                          "layers": sam.num_hidden_layers, "width": sam.hidden_size, "image_size": sam.image_size,
                          "patch_size": sam.patch_size, "window_size": sam.window_size,
                          "output_channels": sam.output_channels}}},
        "image_token_id": config.image_token_id,
        **{k: lang[k] for k in ("hidden_size", "vocab_size", "num_hidden_layers", "bos_token_id", "eos_token_id")},
    }


# ---- model -------------------------------------------------------------------------------------
class DeepseekOcrV1ClipEmbeddings(nn.Module):
    """CLIP-L embeddings that take SAM features as patch embeddings (v1's DeepEncoder).

    `patch_embedding` exists in the checkpoint but v1 never uses it (the SAM features replace it);
    it is frozen so that optimisers and DDP do not track a parameter without gradients.
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.patch_embedding.requires_grad_(False)
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, dim)

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        patches = sam_features.flatten(2).transpose(1, 2)  # (batch, h*w, dim)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        embeddings = torch.cat([cls, patches], dim=1)
        return embeddings + self._positions(embeddings.shape[1]).to(embeddings.dtype)

    def _positions(self, tokens: int) -> torch.Tensor:
        table = self.position_embedding.weight.unsqueeze(0)
        if tokens == self.num_positions:
            return table
        # Other grid sizes: bicubic (antialiased) interpolation of the patch positions, as v1 does.
        cls, grid = table[:, :1], table[:, 1:]
        src, dst = int(math.isqrt(grid.shape[1])), int(math.isqrt(tokens - 1))
        grid = grid.reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
        grid = nn.functional.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False, antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1).to(table.dtype)
        return torch.cat([cls, grid], dim=1)


class DeepseekOcrV1ClipModel(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = DeepseekOcrV1ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(sam_features))
        return self.encoder(inputs_embeds=hidden).last_hidden_state  # no post-layernorm in v1


class DeepseekOcrV1VisionModel(nn.Module):
    """SAM -> CLIP-L on SAM features; output: [CLIP tokens without CLS, SAM tokens] per patch."""

    def __init__(self, config: DeepseekOcrV1Config) -> None:
        super().__init__()
        self.sam_encoder = DeepseekOcr2SamVisionEncoder(config.sam_config)
        self.clip = DeepseekOcrV1ClipModel(config.clip_config)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        sam = self.sam_encoder(pixel_values).last_hidden_state  # (batch, 1024, 16, 16) at 1024 px
        clip = self.clip(sam)
        fused = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)
        return BaseModelOutput(last_hidden_state=fused)


class DeepseekOcrV1PreTrainedModel(DeepseekOcr2PreTrainedModel):
    config_class = DeepseekOcrV1Config
    _no_split_modules = ["DeepseekOcr2SamVisionLayer", "CLIPEncoderLayer", "DeepseekOcr2TextDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeepseekOcrV1Model):
            std = 1 / math.sqrt(self.config.text_config.hidden_size)
            init_normal_(module.image_newline, mean=0.0, std=std)
        elif isinstance(module, DeepseekOcrV1ClipEmbeddings):
            dim = module.class_embedding.shape[0]
            init_normal_(module.class_embedding, mean=0.0, std=dim**-0.5)


class DeepseekOcrV1Model(DeepseekOcrV1PreTrainedModel, DeepseekOcr2Model):
    """DeepSeek-OCR-2's model class with v1's vision stack and token layout; its forward (image
    features scattered into the `<image>` positions of `input_ids`) is inherited unchanged."""

    def __init__(self, config: DeepseekOcrV1Config) -> None:
        DeepseekOcrV1PreTrainedModel.__init__(self, config)
        self.vision_tower = DeepseekOcrV1VisionModel(config)
        vision_dim = config.clip_config.hidden_size + config.sam_config.downsample_channels[1]
        self.multi_modal_projector = nn.Linear(vision_dim, config.text_config.hidden_size)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = DeepseekOcr2TextModel(config.text_config)
        std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size) * std)
        self.view_separator = nn.Parameter(torch.randn(config.text_config.hidden_size) * std)
        self.post_init()

    def _rows(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, columns, hidden) features -> rows x (columns + 1) tokens, a newline ending each row."""
        rows, _, dim = grid.shape
        newline = self.image_newline.to(grid.dtype).view(1, 1, dim).expand(rows, 1, dim)
        return torch.cat([grid, newline], dim=1).reshape(-1, dim)

    def get_image_features(self, pixel_values: torch.Tensor, pixel_values_local: torch.Tensor | None = None,
                           num_local_patches=None, **kwargs) -> DeepseekOcr2ModelOutputWithPooling:
        """One feature sequence per page, as v1's forward builds it: [crops' rows, global rows,
        view separator]. `num_local_patches`: each page's crop grid (columns, rows), (0, 0) without
        crops, as `DeepseekOcrV1Processor` writes it; `pixel_values_local`: the crops of all pages in
        page order, each page's row by row."""
        batch = pixel_values.shape[0]
        grids = _crop_grids(num_local_patches, batch)
        vision = self.vision_tower(pixel_values)
        features = self.multi_modal_projector(vision.last_hidden_state)  # (batch, h*w, hidden)
        _, tokens, dim = features.shape
        side = math.isqrt(tokens)
        local = [None] * batch
        crops = sum(c * r for c, r in grids)
        if crops:
            if pixel_values_local is None or pixel_values_local.shape[0] != crops:
                got = 0 if pixel_values_local is None else pixel_values_local.shape[0]
                raise ValueError(f"the crop grids {grids} need {crops} local crops, pixel_values_local has {got}")
            crop_features = self.multi_modal_projector(self.vision_tower(pixel_values_local).last_hidden_state)
            q = math.isqrt(crop_features.shape[1])
            start = 0
            for i, (columns, rows) in enumerate(grids):
                if columns * rows:
                    page = crop_features[start:start + columns * rows].view(rows, columns, q, q, dim)
                    local[i] = self._rows(page.permute(0, 2, 1, 3, 4).reshape(rows * q, columns * q, dim))
                    start += columns * rows
        separator = self.view_separator.to(features.dtype).view(1, dim)
        pooled = []
        for i in range(batch):
            global_rows = self._rows(features[i].view(side, side, dim))
            pooled.append(torch.cat([v for v in (local[i], global_rows, separator) if v is not None], dim=0))
        return DeepseekOcr2ModelOutputWithPooling(last_hidden_state=vision.last_hidden_state, pooler_output=pooled)


def _crop_grids(num_local_patches, batch: int) -> list[tuple[int, int]]:
    """Each page's (columns, rows) from the processor's `num_local_patches`."""
    if num_local_patches is None:
        return [(0, 0)] * batch
    grids = torch.as_tensor(num_local_patches).reshape(-1).tolist()
    if torch.as_tensor(num_local_patches).ndim == 1 and not any(grids):
        return [(0, 0)] * batch  # crop counts, all zero: no crops
    if torch.as_tensor(num_local_patches).ndim != 2 or len(grids) != 2 * batch:
        raise ValueError(f"num_local_patches {num_local_patches!r}: DeepSeek-OCR v1 needs each page's crop grid "
                         f"(columns, rows), one pair for each of the {batch} pages, as DeepseekOcrV1Processor "
                         "writes it")
    return [(int(grids[2 * i]), int(grids[2 * i + 1])) for i in range(batch)]


class DeepseekOcrV1ForConditionalGeneration(DeepseekOcrV1PreTrainedModel, DeepseekOcr2ForConditionalGeneration):
    """DeepSeek-OCR v1 for generation and training: DeepSeek-OCR-2's head, loss and generation code."""

    def __init__(self, config: DeepseekOcrV1Config) -> None:
        DeepseekOcrV1PreTrainedModel.__init__(self, config)
        self.model = DeepseekOcrV1Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# ---- processor ---------------------------------------------------------------------------------
# v1's modes (its `infer`): the view side, and Gundam's local crops. No-crop views up to 640 px are
# stretched to the square, larger ones padded; HF's `dynamic_preprocess` cuts 2 to 9 crops (DeepSeek's
# vLLM scripts and vLLM's own class default to 6: `max_patches`).
V1_MODES = {"tiny": 512, "small": 640, "base": 1024, "large": 1280}
V1_STRETCH_MAX_SIDE = 640


class DeepseekOcrV1PageImageProcessor(DeepseekOcrPageImageProcessor):
    """v1's page rules: stretched no-crop views up to 640 px; `num_local_patches` holds each page's
    crop grid (columns, rows), which v1's model needs to lay the crops out."""

    stretch_max_side = V1_STRETCH_MAX_SIDE
    crop_grid_output = True


class DeepseekOcrV1Processor(DeepseekOcr2Processor):
    """DeepSeek-OCR-2's processor with v1's pages (`DeepseekOcrV1PageImageProcessor`) and token count:
    q x (q + 1) + 1 for the global view (q = side / 16 / 4; a newline token after each row, one view
    separator), plus (qt x columns + 1) x qt x rows for a grid of columns x rows crops of qt x qt."""

    # The image processor's own (saved) settings decide crops, not class-level call defaults.
    images_kwargs: dict = {}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs) -> None:
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
        _ocr2().use_page_rules(self, DeepseekOcrV1PageImageProcessor)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        ip = self.image_processor
        columns, rows = (int(n) for n in torch.as_tensor(image_inputs["num_local_patches"][image_idx]).reshape(2))
        crops = kwargs.get("crop_to_patches", ip.crop_to_patches)
        tile = kwargs.get("tile_size") or ip.tile_size
        side = (kwargs.get("size") or ip.size)["height"] if crops else tile  # `_preprocess`'s global view
        cell = self.patch_size * self.downsample_ratio
        q, qt = math.ceil(side / cell), math.ceil(tile / cell)
        return self.image_token * (q * (q + 1) + 1 + (qt * columns + 1) * qt * rows)


def v1_image_processor(image_size: int = 1024, crop_mode: str = "none", tile_size: int | None = None,
                       min_crops: int = V1_MIN_CROPS, max_crops: int = V1_MAX_CROPS) -> DeepseekOcrV1PageImageProcessor:
    """v1's pages, normalised with mean = std = 0.5. crop_mode "none": one view of `image_size` (Tiny
    512, Small 640: stretched; Base 1024, Large 1280: padded with grey 127); "tiles" (Gundam): the page
    padded to `image_size` plus `min_crops`..`max_crops` crops of `tile_size` (default
    `v1_tile_size(image_size)`, 640 at 1024)."""
    if crop_mode not in ("none", "tiles"):
        raise ValueError(f"crop_mode={crop_mode!r}: choose 'none' or 'tiles'")
    tile = (tile_size or v1_tile_size(image_size)) if crop_mode == "tiles" else image_size
    return DeepseekOcrV1PageImageProcessor(
        size={"height": image_size, "width": image_size}, tile_size=tile, crop_to_patches=crop_mode == "tiles",
        min_patches=min_crops, max_patches=max_crops, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        background_color=[127] * 3)


def v1_page_settings(original: dict) -> dict:
    """`v1_image_processor` arguments from a v1 config.json: the `infer` arguments `base_size`,
    `image_size`, `crop_mode` when the file carries them (DeepSeek's mode names: Gundam = base 1024,
    image 640, crop), else one view of the SAM input size."""
    sam = original["vision_config"]["width"]["sam_vit_b"]
    default = sam.get("image_size", original["vision_config"].get("image_size", V1_GUNDAM_SIZE))
    crop = original.get("crop_mode", False)
    if not isinstance(crop, bool):
        raise ValueError(f"config.json crop_mode={crop!r}: true (Gundam: local crops) or false (one view)")
    base = int(original.get("base_size", default))
    if not crop:
        return dict(image_size=int(original.get("image_size", base)), crop_mode="none")
    return dict(image_size=base, crop_mode="tiles", tile_size=int(original.get("image_size", v1_tile_size(base))))


# ---- checkpoint key map ------------------------------------------------------------------------
# (v1 name, port name), one table for both directions. A name ending in "." is a prefix, any other
# a whole key; "#" stands for a number (a layer's, a norm's). Per-expert weights and CLIP's fused
# qkv are handled in code.
V1_NAMES: list[tuple[str, str]] = [
    ("model.sam_model.patch_embed.proj.", "model.vision_tower.sam_encoder.patch_embed.projection."),
    ("model.sam_model.pos_embed", "model.vision_tower.sam_encoder.pos_embed"),
    ("model.sam_model.blocks.#.norm#.", "model.vision_tower.sam_encoder.layers.#.layer_norm#."),
    ("model.sam_model.blocks.#.attn.", "model.vision_tower.sam_encoder.layers.#.attn."),
    ("model.sam_model.blocks.#.mlp.", "model.vision_tower.sam_encoder.layers.#.mlp."),
    ("model.sam_model.neck.0.", "model.vision_tower.sam_encoder.neck.conv1."),
    ("model.sam_model.neck.1.", "model.vision_tower.sam_encoder.neck.layer_norm1."),
    ("model.sam_model.neck.2.", "model.vision_tower.sam_encoder.neck.conv2."),
    ("model.sam_model.neck.3.", "model.vision_tower.sam_encoder.neck.layer_norm2."),
    ("model.sam_model.net_2.", "model.vision_tower.sam_encoder.proj.conv1."),
    ("model.sam_model.net_3.", "model.vision_tower.sam_encoder.proj.conv2."),
    ("model.vision_model.embeddings.", "model.vision_tower.clip.embeddings."),
    ("model.vision_model.pre_layrnorm.", "model.vision_tower.clip.pre_layrnorm."),
    ("model.vision_model.transformer.layers.", "model.vision_tower.clip.encoder.layers."),
    ("model.projector.layers.", "model.multi_modal_projector."),
    ("model.image_newline", "model.image_newline"),
    ("model.view_seperator", "model.view_separator"),  # sic: the checkpoint's spelling
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
    ("model.layers.", "model.language_model.layers."),
    ("lm_head.", "lm_head."),
]


def _rename_rule(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = "^" + re.escape(source).replace("\\#", "#").replace("#", r"(\d+)") + ("" if source.endswith(".") else "$")
    groups = iter(range(1, source.count("#") + 1))
    return re.compile(pattern), re.sub("#", lambda _: f"\\{next(groups)}", target)


_TO_PORT = [_rename_rule(v1, port) for v1, port in V1_NAMES]
_TO_V1 = [_rename_rule(port, v1) for v1, port in V1_NAMES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]], what: str) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    raise KeyError(f"{what} key {key!r} is not in the key map")


# CLIP's position ids: a persistent buffer of the remote code's CLIP embeddings (transformers 4.46),
# so a checkpoint that the remote code saved again carries it (2,711 tensors instead of 2,710); the
# port computes positions and keeps no such buffer.
_POSITION_IDS = "model.vision_model.embeddings.position_ids"
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_QKV = re.compile(r"^(model\.vision_model\.transformer\.layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias)$")


def convert_v1_state_dict(state: dict[str, torch.Tensor], config: DeepseekOcrV1Config) -> dict[str, torch.Tensor]:
    """v1 checkpoint tensors -> `DeepseekOcrV1ForConditionalGeneration` state dict."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        if key == _POSITION_IDS:
            expected = torch.arange(tensor.shape[-1]).expand(1, -1)
            if tuple(tensor.shape) != tuple(expected.shape) or not torch.equal(tensor.long().cpu(), expected):
                raise ValueError(f"{key} of shape {tuple(tensor.shape)} is not the positions 0..n-1 the port "
                                 "assumes; this checkpoint is not DeepSeek-OCR v1 as published")
            continue
        if m := _EXPERT.match(key):
            layer, expert, proj = int(m[1]), int(m[2]), m[3]
            experts.setdefault(layer, {}).setdefault(proj, {})[expert] = tensor
        elif m := _QKV.match(key):
            prefix = _rename(m[1] + "x", _TO_PORT, "v1 checkpoint").removesuffix("x")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{prefix}{name}.{m[2]}"] = part.contiguous()
        else:
            out[_rename(key, _TO_PORT, "v1 checkpoint")] = tensor
    n = config.text_config.n_routed_experts
    for layer, projs in experts.items():
        def stacked(proj: str) -> torch.Tensor:
            missing = sorted(set(range(n)) - set(projs.get(proj, {})))
            if missing:
                raise KeyError(f"layer {layer}: experts {missing} have no {proj}_proj weight")
            return torch.stack([projs[proj][e] for e in range(n)])

        prefix = f"model.language_model.layers.{layer}.mlp.experts."
        out[prefix + "gate_up_proj"] = torch.cat([stacked("gate"), stacked("up")], dim=1)
        out[prefix + "down_proj"] = stacked("down")
    return out


def to_v1_state_dict(state: dict[str, torch.Tensor], config: DeepseekOcrV1Config) -> dict[str, torch.Tensor]:
    """The inverse of `convert_v1_state_dict`: port state dict -> v1 checkpoint keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    moe_dim = config.text_config.moe_intermediate_size
    for key, tensor in state.items():
        if m := re.match(r"^model\.language_model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", key):
            layer = m[1]
            for e in range(tensor.shape[0]):
                base = f"model.layers.{layer}.mlp.experts.{e}."
                if m[2] == "gate_up_proj":
                    out[base + "gate_proj.weight"] = tensor[e, :moe_dim].contiguous()
                    out[base + "up_proj.weight"] = tensor[e, moe_dim:].contiguous()
                else:
                    out[base + "down_proj.weight"] = tensor[e].contiguous()
            continue
        if m := re.match(r"^(model\.vision_tower\.clip\.encoder\.layers\.\d+\.self_attn\.)([qkv])_proj\.(weight|bias)$",
                         key):
            qkv.setdefault(f"{m[1]}|{m[3]}", {})[m[2]] = tensor
            continue
        out[_rename(key, _TO_V1, "port")] = tensor
    for joined, parts in qkv.items():
        prefix, kind = joined.split("|")
        v1_prefix = prefix.replace("model.vision_tower.clip.encoder.layers.", "model.vision_model.transformer.layers.")
        out[f"{v1_prefix}qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---- checkpoints -------------------------------------------------------------------------------
def is_v1_config(data: dict) -> bool:
    """A config.json of v1's remote-code layout: as published (`model_type` "deepseek_vl_v2", shared
    with DeepSeek-OCR-2 and DeepSeek-VL2) or saved again by the remote code ("DeepseekOCR"). v1 is told
    apart by its architecture `DeepseekOCRForCausalLM`, its auto_map, or CLIP-L in
    `vision_config.width` (OCR-2 has "qwen2-0-5b" there and architecture `DeepseekOCR2ForCausalLM`)."""
    architectures = data.get("architectures") or []
    if any("OCR2" in a for a in architectures):
        return False
    auto_model = str((data.get("auto_map") or {}).get("AutoModel", ""))
    widths = (data.get("vision_config") or {}).get("width") or {}
    return (V1_ARCHITECTURE in architectures or data.get("model_type") == RESAVED_MODEL_TYPE
            or auto_model.endswith("." + V1_ARCHITECTURE)
            or (data.get("model_type") == "deepseek_vl_v2" and isinstance(widths, dict) and "clip-l-14-224" in widths))


def is_v1_checkpoint(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return is_v1_config(json.loads(config.read_text()))


def _v1_weights(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def convert_v1_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, image_size: int | None = None) -> Path:
    """Rewrite a v1 checkpoint directory (original keys, remote-code config) as a `save_pretrained`
    directory of `DeepseekOcrV1ForConditionalGeneration` plus a `DeepseekOcrV1Processor`."""
    src, dst = Path(src), Path(dst)
    config = v1_config_from_original(json.loads((src / "config.json").read_text()))
    state = convert_v1_state_dict(_v1_weights(src), config)
    with torch.device("meta"):
        expected = DeepseekOcrV1ForConditionalGeneration(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{src}: v1 weights do not match the port (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{src}: {key} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[key].shape)}")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = tokenizer_of_remote_code_checkpoint(src)
    pages = v1_page_settings(json.loads((src / "config.json").read_text()))
    if image_size:
        pages["image_size"] = image_size
    processor = DeepseekOcrV1Processor(image_processor=v1_image_processor(**pages), tokenizer=tokenizer)
    processor.save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    logger.info("converted DeepSeek-OCR v1 checkpoint %s -> %s", src, dst)
    return dst


def _cache_dir(src: Path) -> Path:
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(src.glob("*.safetensors")))
    digest = hashlib.sha256(f"{src.resolve()}|{stamp}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("DEEPSYNTH_CACHE", Path.home() / ".cache" / "deepsynth"))
    return root / "deepseek-ocr-v1" / digest


def load_port(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, processor) from a converted directory."""
    model = DeepseekOcrV1ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = DeepseekOcrV1Processor.from_pretrained(path)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def load_v1(path: str, dtype: torch.dtype | None = None, config: dict | None = None):
    """Backend loader: a v1 checkpoint (directory or hub id, original layout) is converted once into
    the cache (`$DEEPSYNTH_CACHE`, default ~/.cache/deepsynth) and loaded from there; an already
    converted directory is loaded directly. config: config.json as the resolver read it (None: read
    here)."""
    local = Path(path)
    if not local.exists():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    if not (is_v1_config(config) if config is not None else is_v1_checkpoint(local)):
        return load_port(local, dtype)
    target = _cache_dir(local)
    if not (target / "model.safetensors").is_file():
        convert_v1_checkpoint(local, target)
    return load_port(target, dtype)


def _register() -> None:
    from deepsynth.models.collate import RAW_PROMPT_PROCESSORS

    RAW_PROMPT_PROCESSORS.add(DeepseekOcrV1Processor.__name__)  # v1 was trained on raw `<image>\n{prompt}`
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        AutoConfig.register(MODEL_TYPE, DeepseekOcrV1Config)
        AutoModelForImageTextToText.register(DeepseekOcrV1Config, DeepseekOcrV1ForConditionalGeneration)
    except ValueError:  # already registered (module reloaded)
        pass


_register()


# ---- tiny preset -------------------------------------------------------------------------------
def tiny_v1_config(tokenizer, image_size: int = 256) -> DeepseekOcrV1Config:
    """The v1 architecture at toy size: SAM 128 x 2 (-> 128 -> 192 channels), CLIP 192 x 2, one dense
    and one MoE decoder layer (4 experts, top-2, 1 shared) of width 192."""
    patches = image_size // 16 // 4
    sam = DeepseekOcr2SamVisionConfig(
        hidden_size=128, output_channels=128, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=16, window_size=8, global_attn_indexes=[1], downsample_channels=[128, 192], initializer_range=0.02)
    # CLIP's position table covers exactly the SAM grid (patches x patches + CLS), as 16 x 16 + 1 does at 1024 px.
    clip = CLIPVisionConfig(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                            image_size=14 * patches, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = DeepseekOcr2TextConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, mlp_layer_types=["dense", "sparse"], n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return DeepseekOcrV1Config(sam_config=sam, clip_config=clip, text_config=text,
                               image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


def build_tiny_v1(seed: int = 0, image_size: int = 256):
    """A randomly initialised tiny DeepSeek-OCR v1 (port classes) and its processor (char tokenizer)."""
    from deepsynth.models.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    processor = DeepseekOcrV1Processor(image_processor=v1_image_processor(image_size), tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = DeepseekOcrV1ForConditionalGeneration(tiny_v1_config(tokenizer, image_size))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def _set_crop_mode(processor, crop_mode: str | None) -> None:
    """The OCR-2 processor's crop modes with v1's pages; "tiles" is Gundam: crops of the image
    processor's tile size when it is below the global view's, else `v1_tile_size`."""
    ocr2 = _ocr2()
    ocr2.use_page_rules(processor, DeepseekOcrV1PageImageProcessor)
    ocr2.set_crop_mode(processor, crop_mode)
    if crop_mode == "tiles":
        ip = processor.image_processor
        side = ip.size["height"]
        tile = ip.tile_size if ip.tile_size < side else v1_tile_size(side)
        processor.images_kwargs = {**processor.images_kwargs, "tile_size": tile}


def _image_tokens(config, width: int, height: int, crop_mode: str = "none") -> int:
    return _ocr2().image_tokens(config, width, height, crop_mode)  # knows v1's row newlines and crop grid


def _vision_tokens(config, stack: str, side: int = 1024, crop_mode: str = "none") -> int:
    """Tokens through SAM ("sam" in the stack's name: the 16 px patches) or CLIP-L (the
    4x-downsampled grid + CLS) for one side x side page, summed over its views (Gundam: the
    global view and the crops)."""
    total = 0
    for view in _ocr2().vision_views(config, side, side, crop_mode):
        patches = (view // config.sam_config.patch_size) ** 2
        total += patches if "sam" in stack else patches // 16 + 1
    return total


def build_random_v1(seed: int = 0):
    """v1's released architecture (`real_v1_config()`) with random bf16 weights, its 1024 px base-mode
    processor and a stand-in tokenizer of the real vocabulary size (the real-size check's base)."""
    from deepsynth.models.stand_in import random_weights, stand_in_tokenizer

    config = real_v1_config()
    tok = stand_in_tokenizer(config.text_config.vocab_size, config.image_token_id)
    processor = DeepseekOcrV1Processor(image_processor=v1_image_processor(V1_MODES["base"]), tokenizer=tok)
    model = random_weights(DeepseekOcrV1ForConditionalGeneration, config, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


BACKEND = Backend(
    # Original checkpoints (remote-code layout, model_type "deepseek_vl_v2", or "DeepseekOCR" when the
    # remote code saved them again) are converted once to the port; converted directories have
    # model_type "deepseek_ocr_v1".
    # "deepseek_vl_v2" is not listed: DeepSeek-OCR-2 and DeepSeek-VL2 use it too, so `is_v1_config`
    # decides by the config's fields.
    name="deepseek-ocr-v1", model_types=(MODEL_TYPE, RESAVED_MODEL_TYPE), load=load_v1, recognizes=is_v1_config,
    presets={"tiny-deepseek-ocr-v1": build_tiny_v1, "random-deepseek-ocr": build_random_v1},
    aliases={"deepseek-ocr": V1_CHECKPOINT},
    prompt_layout="plain", render_preset="large", preset_render="tiny", real_size_presets=("random-deepseek-ocr",),
    encodes_pages=False,
    configure_processor=_set_crop_mode,
    # The port reuses DeepSeek-OCR-2's decoder classes: same fused experts, same parameter groups.
    lora_target_parameters=lambda model: _ocr2().lora_expert_parameters(model),
    parameter_group=lambda name: _ocr2().parameter_group(name),
    image_tokens=_image_tokens, vision_tokens=_vision_tokens,
)


def _ocr2():
    from deepsynth.models import deepseek_ocr2

    return deepseek_ocr2
