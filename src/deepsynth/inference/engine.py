"""`InstructionEngine`: load a model once, answer (document, instruction) pairs.

A request goes through three steps, each reusable on its own:

1. `prepare(document)` reads the document (text, Markdown, PDF, images) and renders it to pages.
   Results are kept in a bounded LRU cache keyed by a content hash (document + render config),
   so asking many questions about one document renders it once.
2. The pages are encoded by the vision tower once per cached document (the features live in the
   same cache entry) and handed to `generate` as `mm_encoder_outputs`, transformers' input for
   pre-computed multimodal features, so the next question about the document skips the vision
   tower entirely.
3. `generate` runs with loop guards: n-gram blocking (`no_repeat_ngram_size`) while decoding and
   `LoopStop`, which ends a row whose answer ends in a repeated cycle; the answer then says
   `stopped="loop"` and keeps one copy of the cycle.
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
from transformers import DeepseekOcr2ForConditionalGeneration, StoppingCriteriaList, TextIteratorStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from deepsynth.inference.documents import (
    Document,
    DocumentError,
    DocumentLimits,
    Markdown,
    Pdf,
    check_image,
    clean_text,
    open_image,
    read_document,
    read_pdf,
)
from deepsynth.inference.loops import CancelStop, LoopPolicy, LoopStop, trim_loop
from deepsynth.models import Collator, load_model
from deepsynth.models.collate import RAW_PROMPT
from deepsynth.models.generate import GenerationSettings
from deepsynth.render import RenderConfig, render_text

logger = logging.getLogger(__name__)

__all__ = ["Answer", "DEFAULT_GENERATION", "InstructionEngine", "PreparedDocument", "read_document"]

# Defaults for long outputs. No exact 30-token repeat (DeepSeek-OCR's own serving recipe blocks
# repeated n-grams of this order) and a loop stop for shorter cycles; no token-level repetition
# penalty, because answers copy numbers, names and words from the page, and penalising every
# reused token distorts those copies (more so with a character-level tokenizer).
DEFAULT_GENERATION = GenerationSettings(max_new_tokens=256, no_repeat_ngram_size=30, repetition_penalty=1.0)


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class DocumentCache:
    """LRU of prepared documents, bounded by the total number of pages it holds (0 = off)."""

    def __init__(self, max_pages: int = 256) -> None:
        self.max_pages = max_pages
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
        if self.max_pages <= 0 or len(item.pages) > self.max_pages:
            return
        with self._lock:
            self._items[item.key] = item
            self._items.move_to_end(item.key)
            total = sum(len(x.pages) for x in self._items.values())
            while total > self.max_pages:
                _, old = self._items.popitem(last=False)
                total -= len(old.pages)
                self.stats.evictions += 1
            self.stats.entries, self.stats.pages = len(self._items), total

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
    """Answers instructions about documents with one loaded model.

    model:          preset, alias, hub id or directory (anything `load_model` takes), or a LoRA
                    adapter directory (adapter_config.json naming its base model).
    render_preset:  how text documents become pages; must match what the model was trained on.
    adapter:        optional LoRA adapter directory applied to `model` and merged at load time.
    cache_pages:    pages the document cache may hold (0 turns the cache off).
    generation:     default generation settings; each call may override fields.
    max_batch_size: largest batch handed to one `generate` call.
    """

    def __init__(self, model: str | tuple = "tiny-reader", render_preset: str = "tiny",
                 device: str | None = None, dtype: torch.dtype | None = None, adapter: str | None = None,
                 cache_pages: int = 256, generation: GenerationSettings | None = None,
                 max_batch_size: int = 16, loop_policy: LoopPolicy = LoopPolicy()) -> None:
        if isinstance(model, tuple):  # an already loaded (model, processor)
            (self.model, self.processor), self.name = model, type(model[0]).__name__
        else:
            (self.model, self.processor), self.name = self._load(model, adapter, dtype), model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.collator = Collator.for_model(self.model, self.processor)
        self.tokenizer = self.processor.tokenizer
        self.render_config = RenderConfig.from_preset(render_preset)
        self._render_key = json.dumps(dataclasses.asdict(self.render_config), sort_keys=True, default=str).encode()
        self.render_preset = render_preset
        self.generation = generation or DEFAULT_GENERATION
        self.max_batch_size = max_batch_size
        self.loop_policy = loop_policy
        self.cache = DocumentCache(cache_pages)
        self._model_lock = threading.RLock()
        self.image_token_id = getattr(self.model.config, "image_token_id", None)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        # Soft-prompt models (text-encoder channel) generate from inputs_embeds: the token ids that
        # stopping criteria see hold the new tokens only.
        self._ids_hold_prompt = getattr(self.model, "text_encoder", None) is None
        # Pre-computed page features (mm_encoder_outputs) for DeepSeek-OCR-2 with the raw prompt
        # layout; any other model gets pixels on every call (the render cache still applies).
        self.encodes_pages = (
            isinstance(self.model, DeepseekOcr2ForConditionalGeneration)
            and self.collator.instruction_tokenizer is None
            and self.collator.prompt_builder is RAW_PROMPT
            and self.model._supports_mm_encoder_outputs()
        )

    @staticmethod
    def _load(model: str, adapter: str | None, dtype):
        adapter_dir = Path(adapter) if adapter else None
        if adapter_dir is None and (Path(model) / "adapter_config.json").is_file():
            adapter_dir = Path(model)
            model = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        net, processor = load_model(model, dtype=dtype)
        if adapter_dir is not None:
            from peft import PeftModel

            if not (adapter_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(f"adapter directory {str(adapter_dir)!r} has no adapter_config.json")
            net = PeftModel.from_pretrained(net, str(adapter_dir)).merge_and_unload()
            logger.info("merged LoRA adapter %s into %s", adapter_dir, model)
        return net, processor

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
            side = max(self.render_config.page_width, self.render_config.page_height)
            content = read_pdf(data, limits, page_side=side, field=field)
            if isinstance(content, str):
                return self._render(content, "pdf-text", key, limits, field)
            return PreparedDocument(key=key, kind="pdf-images", pages=content)
        if kind == "image":
            return PreparedDocument(key=key, kind="images", pages=[open_image(bytes(document), limits, field)])
        if isinstance(document, Image.Image):
            return PreparedDocument(key=key, kind="images", pages=[check_image(document, limits, field)])
        limits.check_pages(len(document), field)
        pages = [
            open_image(bytes(p), limits, f"{field}[{i}]") if isinstance(p, (bytes, bytearray))
            else check_image(p, limits, f"{field}[{i}]")
            for i, p in enumerate(document)
        ]
        return PreparedDocument(key=key, kind="images", pages=pages)

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
                raise DocumentError(field, f"the text needs more than {config.max_pages} pages",
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

    @torch.no_grad()
    def _encode(self, docs: Sequence[PreparedDocument], chunk: int = 16) -> None:
        """Fill `features` of every document that has none (vision tower, once per document)."""
        todo = [d for d in docs if d.features is None]
        todo = list({id(d): d for d in todo}.values())
        if not todo:
            return
        pages = [(d, i, p) for d in todo for i, p in enumerate(d.pages)]
        feats: dict[int, list] = {id(d): [None] * len(d.pages) for d in todo}
        for start in range(0, len(pages), chunk):
            part = pages[start:start + chunk]
            enc = self.processor.image_processor(images=[p for _, _, p in part], return_tensors="pt")
            kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()
                      if k in ("pixel_values", "pixel_values_local", "num_local_patches")}
            if "pixel_values" in kwargs:
                kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
            if kwargs.get("pixel_values_local") is not None:
                kwargs["pixel_values_local"] = kwargs["pixel_values_local"].to(self.model.dtype)
            out = self.model.get_image_features(**kwargs, return_dict=True)
            for (d, i, _), f in zip(part, out.pooler_output):
                feats[id(d)][i] = f
        for d in todo:
            d.features = feats[id(d)]
        self.cache.stats.encoded_pages += len(pages)

    def _prompt_ids(self, doc: PreparedDocument, instruction: str) -> list[int]:
        image_token = self.processor.image_token
        text = "".join(image_token * int(f.shape[0]) for f in doc.features) + "\n" + instruction + "\n"
        return self.tokenizer(text)["input_ids"]

    # ------------------------------------------------------------------ generation

    def ask(self, document: Document | PreparedDocument, instruction: str,
            settings: GenerationSettings | None = None, **overrides) -> Answer:
        """Answer one instruction about one document; `overrides` change generation settings."""
        return self.ask_batch([document], [instruction], settings, **overrides)[0]

    def ask_batch(self, documents: Sequence[Document | PreparedDocument], instructions: Sequence[str],
                  settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                  **overrides) -> list[Answer]:
        """Answer each (document, instruction) pair, `max_batch_size` pairs per `generate` call."""
        if len(documents) != len(instructions):
            raise ValueError(f"{len(documents)} documents but {len(instructions)} instructions")
        settings = self.settings(settings, **overrides)
        start = time.perf_counter()
        docs = [self.prepare(d, field=f"documents[{i}]") for i, d in enumerate(documents)]
        answers: list[Answer] = []
        for i in range(0, len(docs), self.max_batch_size):
            rows = self._run(docs[i:i + self.max_batch_size], list(instructions[i:i + self.max_batch_size]),
                             settings, cancel=cancel)
            latency = (time.perf_counter() - start) * 1000
            answers.extend(self._answer(r, latency) for r in rows)
        return answers

    def stream(self, document: Document | PreparedDocument, instruction: str,
               settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
               **overrides) -> Iterator[str | Answer]:
        """Yield the answer's text as it is generated, then the final `Answer`.

        The final `Answer` is authoritative: when a loop was detected its text has the repeats
        cut, while the streamed pieces showed them as they came.
        """
        settings = self.settings(settings, **overrides)
        start = time.perf_counter()
        cancel = cancel or threading.Event()
        doc = self.prepare(document)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        box: dict = {}

        def work() -> None:
            try:
                box["rows"] = self._run([doc], [instruction], settings, streamer=streamer, cancel=cancel)
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

    @torch.no_grad()
    def _run(self, docs: list[PreparedDocument], instructions: list[str], settings: GenerationSettings,
             streamer=None, cancel: threading.Event | None = None) -> list[dict]:
        tok = self.tokenizer
        instructions = [clean_text(i) for i in instructions]
        with self._model_lock:
            cached = [d.uses > 0 for d in docs]
            if self.encodes_pages:
                self._encode(docs)
                prompts = [self._prompt_ids(d, ins) for d, ins in zip(docs, instructions)]
                width = max(len(p) for p in prompts)
                input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
                features = [f for d in docs for f in d.features]
                inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                          "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
            else:
                batch = self.collator.prompt_batch([d.pages for d in docs], instructions)
                inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                width = inputs["input_ids"].shape[1]
                mask = inputs["attention_mask"].cpu()
                input_ids = inputs["input_ids"].cpu()
            for i, m in enumerate(mask):
                self.check_length(int(m.sum()), settings, field=f"documents[{i}]" if len(docs) > 1 else "document")
            criteria = StoppingCriteriaList([LoopStop(width if self._ids_hold_prompt else 0, self.loop_policy)])
            canceller = CancelStop(cancel) if cancel is not None else None
            if canceller is not None:
                criteria.append(canceller)
            kwargs = settings.kwargs()
            if self.image_token_id is not None:  # an answer never holds image tokens
                kwargs.setdefault("suppress_tokens", [self.image_token_id])
            out = self.model.generate(**inputs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      stopping_criteria=criteria, streamer=streamer, **kwargs)
        cancelled = canceller is not None and canceller.fired
        rows = []
        for doc, ids, m, new, was_cached in zip(docs, input_ids, mask, out[:, width:].tolist(), cached):
            ended = tok.eos_token_id in new
            if ended:
                new = new[:new.index(tok.eos_token_id)]
            else:
                while new and new[-1] == tok.pad_token_id:
                    new.pop()
            n_new = len(new)
            looped = False
            if not ended:
                new, looped = trim_loop(new, self.loop_policy)
            stopped = ("eos" if ended else "loop" if looped else "cancelled" if cancelled
                       else "max_new_tokens")
            rows.append({
                "doc": doc,
                "answer": tok.decode(new, skip_special_tokens=True).strip(),
                "prompt_tokens": int(m.sum()),
                "visual_tokens": int((ids[m.bool()] == self.image_token_id).sum()) if self.image_token_id is not None else 0,
                "new_tokens": n_new,
                "stopped": stopped,
                "cached": was_cached,
            })
        for doc in docs:
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
