"""`InstructionEngine`: load a model once, answer (document, instruction) pairs.

A request goes through three steps, each reusable on its own:

1. `prepare(document)` reads the document (text, Markdown, PDF, images) and renders it to pages,
   through the engine's `DocumentPreparer` (`deepsynth.inference.prepare`, shared with the vLLM
   engine). Results are kept in a bounded LRU cache keyed by a content hash (document + render
   config), so asking many questions about one document renders it once.
2. The pages are encoded by the vision tower once per cached document (the features live in the
   same cache entry) and handed to `generate` as `mm_encoder_outputs`, transformers' input for
   pre-computed multimodal features, so the next question about the document skips the vision
   tower entirely.
3. Answers come from the project's one decoding path (`deepsynth.models.generate.Decoder`, the
   same that evaluation uses) with the model bundle's decoding defaults and loop guards: n-gram
   blocking while decoding and a stop when the answer ends in a repeated cycle (the answer then
   says `stopped="loop"` and keeps one copy of the cycle).

The model, its render config, prompt layout and decoding defaults come from its bundle
(`deepsynth.models.bundle`); arguments given here override them with a warning.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from deepsynth.inference.documents import Document, clean_text
from deepsynth.inference.interface import Answer, EngineBase
from deepsynth.inference.prepare import DocumentPreparer, PreparedDocument
from deepsynth.models.bundle import (
    LoadedModel,
    apply_adapter,
    load_bundle,
    make_decoder,
    resolve_render,
    spec_of_loaded,
)
from deepsynth.models.generate import GenerationSettings
from deepsynth.models.loops import LoopPolicy
from deepsynth.models.structured import check_schema

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_GENERATION", "InstructionEngine", "encode_png"]

# Decoding defaults of models whose generation_config.json does not state them.
DEFAULT_GENERATION = GenerationSettings()


class InstructionEngine(EngineBase):
    """Answers instructions about documents with one loaded model (implements
    `deepsynth.inference.interface.Engine`).

    model:          preset, alias, hub id, model directory or adapter bundle (anything
                    `load_bundle` takes), or an already loaded `LoadedModel` / (model, processor[, spec]).
    render_preset:  override of the bundle's render config (logged when it differs); None = the
                    pages the model was trained on, as its bundle states.
    adapter:        optional LoRA adapter directory applied to `model` and merged at load time.
    cache_pages:    pages the document cache may hold (0 turns the cache off).
    generation:     default generation settings (None = the model's generation_config.json); each
                    call may override fields.
    max_batch_size: largest batch handed to one `generate` call.
    loop_policy:    override of the bundle's loop-stop policy.
    """

    # One model, one `generate` at a time: concurrent callers wait for the model lock.
    concurrency = 1
    engine_name = "hf"

    def __init__(self, model: str | tuple | LoadedModel = "tiny-reader", render_preset: str | None = None,
                 device: str | None = None, dtype: torch.dtype | None = None, adapter: str | None = None,
                 cache_pages: int = 256, generation: GenerationSettings | None = None,
                 max_batch_size: int = 16, loop_policy: LoopPolicy | None = None) -> None:
        if isinstance(model, tuple):  # already loaded: (model, processor) or (model, processor, spec)
            loaded = model if len(model) == 3 else LoadedModel(*model, spec_of_loaded(*model))
            self.name = type(loaded.model).__name__
        else:
            loaded, self.name = load_bundle(model, dtype=dtype), model
        if adapter is not None:
            loaded = apply_adapter(loaded, adapter, base_name=self.name)
        self.model, self.processor, self.spec = loaded
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.loop_policy = loop_policy or self.spec.loop_policy()
        self.decoder = make_decoder(self.model, self.processor, self.spec, generation)
        self.decoder.loop_policy = self.loop_policy
        self.collator = self.decoder.collator
        self.tokenizer = self.processor.tokenizer
        self.generation = self.decoder.settings
        self.max_batch_size = max_batch_size
        self._model_lock = threading.RLock()
        self.image_token_id = self.decoder.image_token_id
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.documents = DocumentPreparer(self.spec, self.processor, self.collator,
                                          resolve_render(self.spec, render_preset), self.image_token_id,
                                          self.max_positions, cache_pages)
        self.cache = self.documents.cache
        self.render_config = self.documents.render_config
        # Page features are cached per document only where the model takes them pre-computed
        # (the backend says so); any other model gets pixels on every call (the render cache still applies).
        self.encodes_pages = self.decoder.encodes_pages

    def describe(self) -> dict:
        """What requests are answered with: the model, its render config and decoding defaults."""
        return {"model": self.name, "engine": self.engine_name, "dtype": self.dtype_name(),
                **self.documents.describe(),
                "generation": {k: v for k, v in dataclasses.asdict(self.generation).items() if k != "extra"}}

    def dtype_name(self) -> str:
        """The weights' dtype ("float32", "bfloat16", ...)."""
        return str(self.model.dtype).removeprefix("torch.")

    def check_json_schema(self, schema: dict, settings: GenerationSettings | None = None,
                          field: str = "json_schema") -> dict:
        """`schema` if structured output can enforce it within the settings' max_new_tokens; else
        `SchemaError` naming the offending part (see `deepsynth.models.structured`)."""
        return check_schema(schema, (settings or self.generation).max_new_tokens, field)

    def settings(self, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """`settings` (or the engine's defaults) with `overrides` applied and validated."""
        base = settings or self.generation
        return dataclasses.replace(base, **overrides) if overrides else base

    # ------------------------------------------------------------------ encoding and prompts

    def _encode(self, docs: Sequence[PreparedDocument]) -> None:
        """Fill `features` of every document that has none (vision tower, once per document)."""
        todo = list({id(d): d for d in docs if d.features is None}.values())
        for d in todo:
            d.features = self.decoder.encode_pages(d.pages)
            self.cache.stats.encoded_pages += len(d.pages)

    # ------------------------------------------------------------------ generation

    def stream(self, document: Document | PreparedDocument, instruction: str,
               settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
               json_schema: dict | None = None, **overrides) -> Iterator[str | Answer]:
        """Yield the answer's text as it is generated, then the final `Answer`.

        The final `Answer` is authoritative: when a loop was detected its text has the repeats
        cut, while the streamed pieces showed them as they came.
        """
        settings = self.settings(settings, **overrides)
        if json_schema is not None:  # before the generating thread starts: a bad schema raises here
            self.check_json_schema(json_schema, settings)
        start = time.perf_counter()
        cancel = cancel or threading.Event()
        doc = self.prepare(document)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        box: dict = {}

        def work() -> None:
            try:
                box["rows"] = self._rows([doc], [instruction], settings, cancel=cancel, json_schema=json_schema,
                                         streamer=streamer)
            except BaseException as exc:  # re-raised in the caller's thread below
                box["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, name="deepsynth-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        except GeneratorExit:  # the consumer stopped early: stop generating too
            cancel.set()
            raise
        finally:
            thread.join()
        if "error" in box:
            raise box["error"]
        yield Answer.from_row(box["rows"][0], (time.perf_counter() - start) * 1000)

    def _rows(self, docs: list[PreparedDocument], instructions: list[str], settings: GenerationSettings,
              cancel: threading.Event | None = None, json_schema: dict | None = None, streamer=None) -> list[dict]:
        """One `generate` call's rows (`Decoder.run`'s, with "doc" and "cached"): a batch of `ask_batch`."""
        instructions = [clean_text(i) for i in instructions]
        with self._model_lock:
            cached = [d.uses > 0 for d in docs]
            if self.encodes_pages:
                self._encode(docs)
            inputs = self.decoder.prepare_inputs([d.pages for d in docs], instructions,
                                                 [d.features for d in docs] if self.encodes_pages else None)
            for i, m in enumerate(inputs["attention_mask"]):
                self.documents.check_length(int(m.sum()), settings,
                                            field=f"documents[{i}]" if len(docs) > 1 else "document")
            rows = self.decoder.run([d.pages for d in docs], instructions, settings, streamer=streamer, cancel=cancel,
                                    inputs=inputs, json_schema=json_schema)
        for doc, row, was_cached in zip(docs, rows, cached):
            row.update(doc=doc, cached=was_cached)
            doc.uses += 1
        return rows


def encode_png(img: Image.Image, max_side: int | None = None) -> bytes:
    """PNG bytes of `img`, shrunk to `max_side` pixels on its longest side when given."""
    if max_side and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
