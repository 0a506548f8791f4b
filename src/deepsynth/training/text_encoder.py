"""Seed-compatible import path: `from deepsynth.training.text_encoder import TextEncoderModule`.

The implementation lives in `deepsynth.models.text_encoder` (it is part of the model)."""

from deepsynth.models.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    SoftPromptModel,
    TextEncoderModule,
    TextEncoderUnavailable,
    make_projection,
)

__all__ = ["DEFAULT_TEXT_ENCODER", "SoftPromptModel", "TextEncoderModule", "TextEncoderUnavailable",
           "make_projection"]
