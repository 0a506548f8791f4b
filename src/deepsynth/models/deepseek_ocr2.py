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

import logging

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

from deepsynth.models.tokenizer import build_char_tokenizer

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
    config = DeepseekOcr2Config(
        vision_config={"sam_config": sam, "encoder_config": encoder},
        text_config=text,
        image_token_id=image_token_id,
    )
    config.vision_readout = "patches"
    return config


def tiny_processor(image_size: int = 256) -> DeepseekOcr2Processor:
    """Processor for the tiny preset: one global view per page, no local crops, char tokenizer."""
    image_processor = DeepseekOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, tile_size=image_size, crop_to_patches=False
    )
    return DeepseekOcr2Processor(
        image_processor=image_processor, tokenizer=build_char_tokenizer(), patch_size=16, downsample_ratio=4
    )


def build_tiny(seed: int = 0, image_size: int = 256) -> tuple[DeepseekOcr2ForConditionalGeneration, DeepseekOcr2Processor]:
    """A randomly initialised tiny DeepSeek-OCR-2 and its processor (deterministic for a seed)."""
    processor = tiny_processor(image_size)
    tok = processor.tokenizer
    config = tiny_config(
        vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, image_size=image_size,
    )
    torch.manual_seed(seed)
    model = apply_vision_readout(DeepseekOcr2ForConditionalGeneration(config))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def real_config() -> DeepseekOcr2Config:
    """The config of `deepseek-community/DeepSeek-OCR-2`, reproduced so it builds on `meta` offline.

    SAM ViT-B (768 x 12) -> Qwen2-style encoder (896 x 24) -> linear projector -> DeepSeek-V2
    MoE decoder (1280 x 12, first layer dense, 64 routed experts, 6 active, 2 shared).
    """
    sam = dict(downsample_channels=[512, 896])
    encoder = dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
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
