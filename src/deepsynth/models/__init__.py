"""Model backends, presets, prompt building and collation."""

from deepsynth.models.collate import IGNORE_INDEX, Collator, build_prompt
from deepsynth.models.registry import BACKENDS, Backend, load_model, register_backend

__all__ = ["BACKENDS", "Backend", "Collator", "IGNORE_INDEX", "build_prompt", "load_model", "register_backend"]
