"""`Engine`: what the server (its routers and micro-batcher) asks of an inference engine.

`InstructionEngine` (transformers `generate` through the project's `Decoder`) and `VLLMEngine`
(`deepsynth.vllm.engine`) implement it, each holding a `deepsynth.inference.prepare.DocumentPreparer`
for the documents; any other engine that implements it is served by the same HTTP API, web page,
limits, auth, templates and answer fields (`Answer`, below).

Errors an engine raises, so the server can answer them as 4xx instead of 500:
    `DocumentError`   a document (or a prompt built from it) breaks a limit; names the field.
    `SchemaError`     a JSON schema cannot be enforced (a ValueError; names the JSON path).
    `ValueError`      generation settings out of range.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from deepsynth.inference.documents import Document, DocumentLimits
    from deepsynth.inference.prepare import DocumentCache, DocumentPreparer, PreparedDocument
    from deepsynth.models.generate import GenerationSettings


@dataclass
class Answer:
    """One answer and what it cost.

    stopped:      "eos" (the model ended its answer), "max_new_tokens" (cut at the limit),
                  "loop" (the answer ended in a repeated cycle; the repeats were cut) or
                  "cancelled" (the caller stopped it).
    latency_ms:   wall time from the call until this answer was complete (a batch's answers
                  are complete together).
    text_tokens:  tokens the document's text takes for the model's tokenizer (None for images).
    compression:  text_tokens / visual_tokens (None for images).
    """

    answer: str
    pages: int
    visual_tokens: int
    prompt_tokens: int
    stopped: str
    latency_ms: float
    text_tokens: int | None = None
    compression: float | None = None
    new_tokens: int = 0
    cached: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_row(cls, row: dict, latency_ms: float) -> "Answer":
        """The answer of an engine's row: the Decoder's fields ("answer", "stopped", "new_tokens",
        "prompt_tokens", "visual_tokens") plus the row's `PreparedDocument` ("doc") and whether it
        was cached before ("cached")."""
        doc: PreparedDocument = row["doc"]
        visual = row["visual_tokens"]
        compression = round(doc.text_tokens / visual, 3) if doc.text_tokens is not None and visual else None
        return cls(answer=row["answer"], pages=len(doc.pages), visual_tokens=visual,
                   prompt_tokens=row["prompt_tokens"], stopped=row["stopped"], latency_ms=round(latency_ms, 2),
                   text_tokens=doc.text_tokens, compression=compression, new_tokens=row["new_tokens"],
                   cached=row["cached"])


@runtime_checkable
class Engine(Protocol):
    """One loaded model answering instructions about documents.

    name:       the model's id as requests and answers name it (fixed while the engine lives).
    generation: decoding defaults (the model bundle's), the base of `settings`.
    cache:      the document cache (prepared pages, and features where the engine keeps them);
                the server bounds `cache.max_bytes` and reports `cache.stats` as metrics.
    concurrency: `ask_batch`/`stream` calls worth running at once: 1 for an engine that runs one
                `generate` at a time (the server's batcher then queues batches), more for one that
                schedules all the requests it holds together (vLLM).
    """

    name: str
    generation: GenerationSettings
    cache: DocumentCache
    concurrency: int

    def describe(self) -> dict:
        """The model, its render config (key "render") and decoding defaults."""
        ...

    def settings(self, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """`settings` (or the defaults) with `overrides`; ValueError for values out of range."""
        ...

    def prepare(self, document: Document | PreparedDocument, limits: DocumentLimits | None = None,
                field: str = "document") -> PreparedDocument:
        """Read and render a document with the model's render config (cached by content)."""
        ...

    def visual_token_count(self, doc: PreparedDocument) -> int | None:
        """Image tokens the model spends on `doc`'s pages (None when the model has no image token)."""
        ...

    def check_json_schema(self, schema: dict, settings: GenerationSettings, field: str = "json_schema") -> dict:
        """`schema` if structured output can enforce it within `settings.max_new_tokens`, else SchemaError."""
        ...

    def ask_batch(self, documents: Sequence[Document | PreparedDocument], instructions: Sequence[str],
                  settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                  json_schema: dict | None = None) -> list[Answer]:
        """One answer per (document, instruction); with `json_schema` each answer parses and validates."""
        ...

    def stream(self, document: Document | PreparedDocument, instruction: str,
               settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
               json_schema: dict | None = None) -> Iterator[str | Answer]:
        """The answer's text piece by piece, then the final (authoritative) `Answer`."""
        ...


class EngineBase:
    """What every engine does the same way: the document methods, answered by the
    `DocumentPreparer` it holds as `documents`; `ask_batch` in batches of `max_batch_size` pairs,
    each answered by the engine's `_rows`; `ask` (one pair through `ask_batch`)."""

    documents: DocumentPreparer
    max_batch_size: int

    def _rows(self, docs: list[PreparedDocument], instructions: list[str], settings: GenerationSettings,
              cancel: threading.Event | None = None, json_schema: dict | None = None) -> list[dict]:
        """One batch's rows: `Decoder.run`'s fields plus "doc" (its `PreparedDocument`) and "cached"."""
        raise NotImplementedError

    def prepare(self, document: Document | PreparedDocument, limits: DocumentLimits | None = None,
                field: str = "document") -> PreparedDocument:
        """Read and render a document (cached by content). Raises `DocumentError` naming `field`."""
        return self.documents.prepare(document, limits, field)

    def pages_for(self, document: Document) -> list[Image.Image]:
        """The page images the model reads for `document`."""
        return self.documents.pages_for(document)

    def visual_token_count(self, doc: PreparedDocument) -> int | None:
        """Image tokens the model spends on `doc`'s pages (exact: the processor's own expansion, which
        vLLM's is too)."""
        return self.documents.visual_token_count(doc)

    def ask(self, document: Document | PreparedDocument, instruction: str,
            settings: GenerationSettings | None = None, json_schema: dict | None = None, **overrides) -> Answer:
        """Answer one instruction about one document; `overrides` change generation settings."""
        return self.ask_batch([document], [instruction], settings, json_schema=json_schema, **overrides)[0]

    def ask_batch(self, documents: Sequence[Document | PreparedDocument], instructions: Sequence[str],
                  settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                  json_schema: dict | None = None, **overrides) -> list[Answer]:
        """Answer each (document, instruction) pair, `max_batch_size` pairs per `_rows` call (one
        `generate` call for the HF engine; vLLM batches them with other callers' requests too). Every
        document is read first: a bad one fails before anything is generated.

        json_schema: structured output: every answer is JSON that validates against it (see
        `deepsynth.models.structured`); SchemaError for a schema that cannot be enforced."""
        if len(documents) != len(instructions):
            raise ValueError(f"{len(documents)} documents but {len(instructions)} instructions")
        settings = self.settings(settings, **overrides)
        start = time.perf_counter()
        docs = [self.prepare(d, field=f"documents[{i}]") for i, d in enumerate(documents)]
        answers: list[Answer] = []
        for i in range(0, len(docs), self.max_batch_size):
            rows = self._rows(docs[i:i + self.max_batch_size], list(instructions[i:i + self.max_batch_size]),
                              settings, cancel=cancel, json_schema=json_schema)
            latency = (time.perf_counter() - start) * 1000
            answers.extend(Answer.from_row(r, latency) for r in rows)
        return answers
