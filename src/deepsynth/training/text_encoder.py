"""Seed-compatible import path: `from deepsynth.training.text_encoder import TextEncoderModule`.

The implementation lives in `deepsynth.models.text_encoder` (it is part of the model)."""

from deepsynth.models.text_encoder import SoftPromptModel, TextEncoderModule, make_projection

__all__ = ["SoftPromptModel", "TextEncoderModule", "make_projection"]
