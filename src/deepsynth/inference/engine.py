"""`InstructionEngine`: load a model once, answer (document, instruction) pairs."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from deepsynth.models import Collator, load_model
from deepsynth.models.generate import GenerationSettings, generate_with_stats
from deepsynth.render import RenderConfig, render_text

logger = logging.getLogger(__name__)

Document = str | Image.Image | Sequence[Image.Image]


@dataclass
class Answer:
    answer: str
    pages: int
    visual_tokens: int
    prompt_tokens: int
    stopped: str  # "eos" (the model ended its answer) or "max_new_tokens" (cut at the limit)
    latency_ms: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class InstructionEngine:
    """Answers instructions about documents with one loaded model.

    model:          preset, alias, hub id or directory (anything `load_model` takes).
    render_preset:  how text documents become pages; must match what the model was trained on.
    """

    def __init__(self, model: str = "tiny-reader", render_preset: str = "tiny",
                 device: str | None = None, dtype: torch.dtype | None = None) -> None:
        self.model, self.processor = load_model(model, dtype=dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.collator = Collator(self.processor)
        self.render_config = RenderConfig.from_preset(render_preset)
        self.name = model

    def pages_for(self, document: Document) -> list[Image.Image]:
        """Text is rendered; an image or a list of images is used as the pages."""
        if isinstance(document, str):
            return [p.image for p in render_text(document, self.render_config)]
        if isinstance(document, Image.Image):
            return [document.convert("RGB")]
        pages = [p.convert("RGB") for p in document]
        if not pages:
            raise ValueError("document has no pages")
        return pages

    def ask(self, document: Document, instruction: str, settings: GenerationSettings | None = None) -> Answer:
        return self.ask_batch([document], [instruction], settings)[0]

    def ask_batch(self, documents: Sequence[Document], instructions: Sequence[str],
                  settings: GenerationSettings | None = None) -> list[Answer]:
        if len(documents) != len(instructions):
            raise ValueError(f"{len(documents)} documents but {len(instructions)} instructions")
        start = time.perf_counter()
        pages = [self.pages_for(d) for d in documents]
        results = generate_with_stats(self.model, self.collator, pages, instructions, settings)
        latency = (time.perf_counter() - start) * 1000 / len(documents)
        return [
            Answer(answer=r["answer"], pages=len(p), visual_tokens=r["visual_tokens"],
                   prompt_tokens=r["prompt_tokens"], stopped=r["stopped"], latency_ms=round(latency, 2))
            for r, p in zip(results, pages)
        ]


def read_document(path: str | Path) -> Document:
    """A .txt/.md file as text, an image file as one page."""
    path = Path(path)
    if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}:
        return Image.open(path).convert("RGB")
    return path.read_text(encoding="utf-8")
