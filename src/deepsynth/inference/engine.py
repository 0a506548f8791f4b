"""`InstructionEngine`: load a model once, answer (document, instruction) pairs.

A request goes through three steps, each reusable on its own:

1. `prepare(document)` reads the document (text, Markdown, PDF, images) and renders it to pages.
   Results are kept in a bounded LRU cache keyed by a content hash (document + render config),
   so asking many questions about one document renders it once.
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
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from deepsynth.inference.documents import (
    Document,
    DocumentError,
    DocumentLimits,
    Markdown,
    Pdf,
    check_image,
    clean_text,
    image_size,
    open_image,
    read_document,
    read_pdf,
)
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
from deepsynth.render import render_text

logger = logging.getLogger(__name__)

__all__ = ["Answer", "DEFAULT_GENERATION", "InstructionEngine", "PreparedDocument", "read_document"]

# Decoding defaults of models whose generation_config.json does not state them.
DEFAULT_GENERATION = GenerationSettings()


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


@dataclass
class PreparedDocument:
    """A document read and rendered: pages, text statistics, and (once encoded) page features."""

    key: str
    kind: str  # "text", "markdown", "pdf-text", "pdf-images", "images"
    pages: list[Image.Image]
    text: str | None = None
    text_tokens: int | None = None
    features: list[torch.Tensor] | None = None  # one (tokens, hidden) tensor per page
    uses: int = 0
    counted_visual_tokens: int | None = None

    @property
    def visual_tokens(self) -> int | None:
        return None if self.features is None else sum(int(f.shape[0]) for f in self.features)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encoded_pages: int = 0
    evictions: int = 0
    entries: int = 0
    pages: int = 0
    bytes: int = 0  # page pixels plus encoded page features held, as of the last insertion

    def to_dict(self) -> dict:
        return dict(self.__dict__)


#: Default byte bound of the document cache: room for ~1,000 pages at 256 px, or ~80 at 1024 px.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


def document_bytes(doc: PreparedDocument) -> int:
    """Memory a prepared document holds: its page pixels and its encoded page features."""
    pixels = sum(p.width * p.height * len(p.getbands()) for p in doc.pages)
    features = sum(f.numel() * f.element_size() for f in doc.features) if doc.features is not None else 0
    return pixels + features


class DocumentCache:
    """LRU of prepared documents, bounded by pages, bytes and entries (max_pages=0 turns it off).

    max_pages:   pages held, summed over documents.
    max_bytes:   page pixels plus encoded features held; features are added after a document is
                 cached, so they count from the next insertion on.
    max_entries: documents held.
    A document larger than a bound on its own is not cached.
    """

    def __init__(self, max_pages: int = 256, max_bytes: int = DEFAULT_CACHE_BYTES, max_entries: int = 1024) -> None:
        self.max_pages, self.max_bytes, self.max_entries = max_pages, max_bytes, max_entries
        self._items: OrderedDict[str, PreparedDocument] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: str) -> PreparedDocument | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item

    def put(self, item: PreparedDocument) -> None:
        if (self.max_pages <= 0 or self.max_entries <= 0 or len(item.pages) > self.max_pages
                or document_bytes(item) > self.max_bytes):
            return
        with self._lock:
            self._items[item.key] = item
            self._items.move_to_end(item.key)
            sizes = {key: document_bytes(x) for key, x in self._items.items()}
            pages, size = sum(len(x.pages) for x in self._items.values()), sum(sizes.values())
            while pages > self.max_pages or size > self.max_bytes or len(self._items) > self.max_entries:
                key, old = self._items.popitem(last=False)
                pages -= len(old.pages)
                size -= sizes[key]
                self.stats.evictions += 1
            self.stats.entries, self.stats.pages, self.stats.bytes = len(self._items), pages, size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.stats = CacheStats()


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _image_digest(img: Image.Image) -> bytes:
    return f"{img.mode}{img.size}".encode() + hashlib.sha256(img.tobytes()).digest()


class InstructionEngine:
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
        self.render_config = resolve_render(self.spec, render_preset)
        self._render_key = json.dumps(dataclasses.asdict(self.render_config), sort_keys=True, default=str).encode()
        self.loop_policy = loop_policy or self.spec.loop_policy()
        self.decoder = make_decoder(self.model, self.processor, self.spec, generation)
        self.decoder.loop_policy = self.loop_policy
        self.collator = self.decoder.collator
        self.tokenizer = self.processor.tokenizer
        self.generation = self.decoder.settings
        self.max_batch_size = max_batch_size
        self.cache = DocumentCache(cache_pages)
        self._model_lock = threading.RLock()
        self.image_token_id = self.decoder.image_token_id
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        # Page features are cached per document only where the model takes them pre-computed
        # (the backend says so); any other model gets pixels on every call (the render cache still applies).
        self.encodes_pages = self.decoder.encodes_pages

    def describe(self) -> dict:
        """What requests are answered with: the model, its render config and decoding defaults."""
        return {"model": self.name, "engine": self.engine_name, "dtype": self.dtype_name(),
                "backend": self.spec.backend, "render": dataclasses.asdict(self.render_config),
                "crop_mode": self.spec.crop_mode, "prompt_layout": self.spec.prompt_layout,
                "instruction_channel": self.spec.instruction_channel.get("kind"),
                "generation": {k: v for k, v in dataclasses.asdict(self.generation).items() if k != "extra"}}

    def dtype_name(self) -> str:
        """The weights' dtype ("float32", "bfloat16", ...)."""
        return str(self.model.dtype).removeprefix("torch.")

    def check_json_schema(self, schema: dict, settings: GenerationSettings | None = None,
                          field: str = "json_schema") -> dict:
        """`schema` if structured output can enforce it within the settings' max_new_tokens; else
        `SchemaError` naming the offending part (see `deepsynth.models.structured`)."""
        return check_schema(schema, (settings or self.generation).max_new_tokens, field)

    # ------------------------------------------------------------------ documents

    def settings(self, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """`settings` (or the engine's defaults) with `overrides` applied and validated."""
        base = settings or self.generation
        return dataclasses.replace(base, **overrides) if overrides else base

    def _key(self, document) -> tuple[str, str]:
        if isinstance(document, Markdown):
            return _hash(b"md", self._render_key, document.encode("utf-8", "surrogatepass")), "markdown"
        if isinstance(document, str):
            return _hash(b"text", self._render_key, document.encode("utf-8", "surrogatepass")), "text"
        if isinstance(document, Pdf):
            return _hash(b"pdf", self._render_key, document.data), "pdf"
        if isinstance(document, (bytes, bytearray)):
            kind = "pdf" if bytes(document[:5]) == b"%PDF-" else "image"
            return _hash(kind.encode(), self._render_key, bytes(document)), kind
        if isinstance(document, Image.Image):
            return _hash(b"images", _image_digest(document)), "images"
        parts = [b"images"]
        for item in document:
            parts.append(bytes(item) if isinstance(item, (bytes, bytearray)) else _image_digest(item))
        return _hash(*parts), "images"

    def prepare(self, document: Document | PreparedDocument, limits: DocumentLimits | None = None,
                field: str = "document") -> PreparedDocument:
        """Read and render a document (cached by content). Raises `DocumentError` naming `field`."""
        if isinstance(document, PreparedDocument):
            return document
        limits = limits or DocumentLimits()
        if isinstance(document, Path):
            document = read_document(document)
        if isinstance(document, (list, tuple)) and not document:
            raise DocumentError(field, "the document has no pages")
        key, kind = self._key(document)
        hit = self.cache.get(key)
        if hit is not None:
            limits.check_pages(len(hit.pages), field)
            if hit.text is not None:
                limits.check_text(hit.text, field)
            return hit
        prepared = self._read(document, kind, key, limits, field)
        limits.check_pages(len(prepared.pages), field)
        self.cache.put(prepared)
        return prepared

    def _read(self, document, kind: str, key: str, limits: DocumentLimits, field: str) -> PreparedDocument:
        if kind in ("text", "markdown"):
            limits.check_text(document, field)
            return self._render(clean_text(document), kind, key, limits, field)
        if kind == "pdf":
            data = document.data if isinstance(document, Pdf) else bytes(document)
            content = read_pdf(data, limits, page_side=self.max_page_side, field=field)
            if isinstance(content, str):
                return self._render(content, "pdf-text", key, limits, field)
            return PreparedDocument(key=key, kind="pdf-images", pages=content)
        if kind == "image":
            return PreparedDocument(key=key, kind="images",
                                    pages=[self._fit(open_image(bytes(document), limits, field))])
        if isinstance(document, Image.Image):
            return PreparedDocument(key=key, kind="images", pages=[self._fit(check_image(document, limits, field))])
        limits.check_pages(len(document), field)
        if limits.max_total_pixels is not None:  # from the headers, before any page is decoded
            sizes = [image_size(bytes(p), limits, f"{field}[{i}]") if isinstance(p, (bytes, bytearray)) else p.size
                     for i, p in enumerate(document)]
            limits.check_total_pixels(sizes, field)
        # each page is shrunk as soon as it is decoded, so only one full-size page is held at a time
        pages = [
            self._fit(open_image(bytes(p), limits, f"{field}[{i}]") if isinstance(p, (bytes, bytearray))
                      else check_image(p, limits, f"{field}[{i}]"))
            for i, p in enumerate(document)
        ]
        return PreparedDocument(key=key, kind="images", pages=pages)

    @property
    def max_page_side(self) -> int:
        """Longest page side, in pixels, the model reads: larger page images are shrunk to it.

        The image processor's input size, or its tile grid's extent when it cuts pages into tiles
        (up to `max_patches` tiles in a row), and never less than the rendered page's side.
        """
        side = getattr(self, "_max_page_side", None)
        if side is None:
            side = max(self.render_config.page_width, self.render_config.page_height)
            ip = getattr(self.processor, "image_processor", None)
            size = getattr(ip, "size", None) or {}
            size = size if isinstance(size, dict) else {"side": size}
            side = max([side, *(int(v) for v in size.values() if isinstance(v, (int, float)))])
            spec = getattr(self, "spec", None)
            if getattr(ip, "crop_to_patches", False) or getattr(spec, "crop_mode", "none") not in (None, "none"):
                tile, most = getattr(ip, "tile_size", None), getattr(ip, "max_patches", None)
                if tile and most:
                    side = max(side, int(tile) * int(most))
            self._max_page_side = side
        return side

    def _fit(self, img: Image.Image) -> Image.Image:
        """`img` shrunk (aspect kept) to `max_page_side`: what is cached is what the model reads."""
        side = self.max_page_side
        if max(img.size) <= side:
            return img
        scale = side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)

    def _render(self, text: str, kind: str, key: str, limits: DocumentLimits, field: str) -> PreparedDocument:
        config = self.render_config
        if kind == "markdown":
            config = dataclasses.replace(config, markdown=True)
        if limits.max_pages is not None and limits.max_pages < config.max_pages:
            config = dataclasses.replace(config, max_pages=limits.max_pages)
        if not text.strip():
            raise DocumentError(field, "the text is empty")
        try:
            pages = [p.image for p in render_text(text, config)]
        except ValueError as exc:
            if "max_pages" in str(exc):
                raise DocumentError(field, f"the text needs more than {config.max_pages} pages (max_pages)",
                                    config.max_pages) from None
            raise DocumentError(field, str(exc)) from None
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return PreparedDocument(key=key, kind=kind, pages=pages, text=text, text_tokens=tokens)

    def pages_for(self, document: Document) -> list[Image.Image]:
        """The page images the model reads for `document`."""
        return self.prepare(document).pages

    def visual_token_count(self, doc: PreparedDocument) -> int | None:
        """Image tokens the model spends on `doc`'s pages (exact: the processor's own expansion)."""
        if doc.features is not None:
            return doc.visual_tokens
        if self.image_token_id is None:
            return None
        if doc.counted_visual_tokens is None:
            enc = self.collator.encode_prompts([doc.pages], [""])
            doc.counted_visual_tokens = sum(1 for t in enc["input_ids"][0] if t == self.image_token_id)
        return doc.counted_visual_tokens

    # ------------------------------------------------------------------ encoding and prompts

    def _encode(self, docs: Sequence[PreparedDocument]) -> None:
        """Fill `features` of every document that has none (vision tower, once per document)."""
        todo = list({id(d): d for d in docs if d.features is None}.values())
        for d in todo:
            d.features = self.decoder.encode_pages(d.pages)
            self.cache.stats.encoded_pages += len(d.pages)

    # ------------------------------------------------------------------ generation

    def ask(self, document: Document | PreparedDocument, instruction: str,
            settings: GenerationSettings | None = None, json_schema: dict | None = None, **overrides) -> Answer:
        """Answer one instruction about one document; `overrides` change generation settings."""
        return self.ask_batch([document], [instruction], settings, json_schema=json_schema, **overrides)[0]

    def ask_batch(self, documents: Sequence[Document | PreparedDocument], instructions: Sequence[str],
                  settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                  json_schema: dict | None = None, **overrides) -> list[Answer]:
        """Answer each (document, instruction) pair, `max_batch_size` pairs per `generate` call.

        json_schema: structured output: every answer is JSON that validates against it (see
        `deepsynth.models.structured`); SchemaError for a schema that cannot be enforced."""
        if len(documents) != len(instructions):
            raise ValueError(f"{len(documents)} documents but {len(instructions)} instructions")
        settings = self.settings(settings, **overrides)
        start = time.perf_counter()
        docs = [self.prepare(d, field=f"documents[{i}]") for i, d in enumerate(documents)]
        answers: list[Answer] = []
        for i in range(0, len(docs), self.max_batch_size):
            rows = self._run(docs[i:i + self.max_batch_size], list(instructions[i:i + self.max_batch_size]),
                             settings, cancel=cancel, json_schema=json_schema)
            latency = (time.perf_counter() - start) * 1000
            answers.extend(self._answer(r, latency) for r in rows)
        return answers

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
                box["rows"] = self._run([doc], [instruction], settings, streamer=streamer, cancel=cancel,
                                        json_schema=json_schema)
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
        yield self._answer(box["rows"][0], (time.perf_counter() - start) * 1000)

    def _answer(self, row: dict, latency_ms: float) -> Answer:
        doc: PreparedDocument = row["doc"]
        visual = row["visual_tokens"]
        compression = round(doc.text_tokens / visual, 3) if doc.text_tokens is not None and visual else None
        return Answer(answer=row["answer"], pages=len(doc.pages), visual_tokens=visual,
                      prompt_tokens=row["prompt_tokens"], stopped=row["stopped"], latency_ms=round(latency_ms, 2),
                      text_tokens=doc.text_tokens, compression=compression, new_tokens=row["new_tokens"],
                      cached=row["cached"])

    def check_length(self, prompt_tokens: int, settings: GenerationSettings, field: str = "document") -> None:
        if self.max_positions and prompt_tokens + settings.max_new_tokens > self.max_positions:
            raise DocumentError(
                field, f"the prompt takes {prompt_tokens} tokens (pages + instruction) and max_new_tokens="
                f"{settings.max_new_tokens}; together they exceed the model's {self.max_positions} positions: "
                "use fewer pages, a shorter instruction or fewer new tokens", self.max_positions)

    def _run(self, docs: list[PreparedDocument], instructions: list[str], settings: GenerationSettings,
             streamer=None, cancel: threading.Event | None = None, json_schema: dict | None = None) -> list[dict]:
        instructions = [clean_text(i) for i in instructions]
        with self._model_lock:
            cached = [d.uses > 0 for d in docs]
            if self.encodes_pages:
                self._encode(docs)
            inputs = self.decoder.prepare_inputs([d.pages for d in docs], instructions,
                                                 [d.features for d in docs] if self.encodes_pages else None)
            for i, m in enumerate(inputs["attention_mask"]):
                self.check_length(int(m.sum()), settings, field=f"documents[{i}]" if len(docs) > 1 else "document")
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
