"""Inference: load a model once and answer instructions about documents."""

from deepsynth.inference.documents import DocumentError, DocumentLimits, Markdown, Pdf, read_document
from deepsynth.inference.engine import DEFAULT_GENERATION, InstructionEngine
from deepsynth.inference.interface import Answer
from deepsynth.inference.prepare import PreparedDocument
from deepsynth.models.loops import LoopPolicy, find_loop
from deepsynth.inference.templates import TEMPLATES, Template, get_template

__all__ = [
    "Answer", "DEFAULT_GENERATION", "DocumentError", "DocumentLimits", "InstructionEngine", "LoopPolicy",
    "Markdown", "Pdf", "PreparedDocument", "TEMPLATES", "Template", "find_loop", "get_template", "read_document",
]
