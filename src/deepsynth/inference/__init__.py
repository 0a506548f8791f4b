"""Inference: load a model once and answer instructions about documents."""

from deepsynth.inference.engine import Answer, InstructionEngine, read_document

__all__ = ["Answer", "InstructionEngine", "read_document"]
