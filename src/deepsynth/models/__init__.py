"""Model backends, presets, the model bundle, prompt building, collation and decoding."""

from deepsynth.models.backend import Backend
from deepsynth.models.bundle import (BUNDLE_FILE, BundleError, LoadedModel, ModelSpec, load_bundle, load_model,
                                     save_bundle)
from deepsynth.models.collate import IGNORE_INDEX, Collator, build_prompt
from deepsynth.models.registry import BACKENDS, register_backend

__all__ = ["BACKENDS", "BUNDLE_FILE", "Backend", "BundleError", "Collator", "IGNORE_INDEX", "LoadedModel", "ModelSpec",
           "build_prompt", "load_bundle", "load_model", "register_backend", "save_bundle"]
