"""`DocumentPreparer`: a document as one model reads it, the part every engine shares.

Whatever generates the answer (transformers in `InstructionEngine`, vLLM in
`deepsynth.vllm.engine.VLLMEngine`), a request's document is first read (text, Markdown, PDF,
images: `deepsynth.inference.documents`), checked against the request's limits, rendered with the
model's render config, shrunk to the largest page the model reads, and kept in a bounded LRU
cache keyed by a content hash (document + render config), so many questions about one document
render it once. Each engine holds one `DocumentPreparer` built from its model's bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

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
from deepsynth.render import RenderConfig, render_text

if TYPE_CHECKING:
    import torch

    from deepsynth.models.bundle import ModelSpec
    from deepsynth.models.collate import Collator
    from deepsynth.models.generate import GenerationSettings


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


class DocumentPreparer:
    """Documents to the pages one model reads, cached; and what those pages cost in its prompt.

    spec:           the model's bundle spec (crop mode, prompt layout, instruction channel).
    processor:      the model's processor (its tokenizer counts text tokens; its image processor
                    says how large a page the model reads).
    collator:       builds the model's prompts: counts the image tokens a document's pages take.
    render_config:  how text is rendered to pages (the bundle's, or the engine's override).
    image_token_id: the model's image token (None for a model without one).
    max_positions:  longest prompt + answer the model takes (None: no bound known).
    cache_pages:    pages the document cache may hold (0 turns it off).
    """

    def __init__(self, spec: ModelSpec, processor, collator: Collator, render_config: RenderConfig,
                 image_token_id: int | None, max_positions: int | None, cache_pages: int = 256) -> None:
        self.spec = spec
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.collator = collator
        self.render_config = render_config
        self.image_token_id = image_token_id
        self.max_positions = max_positions
        self.cache = DocumentCache(cache_pages)
        # Part of every cache key: the same text rendered another way is another document.
        self._render_key = json.dumps(dataclasses.asdict(render_config), sort_keys=True, default=str).encode()
        self._max_page_side: int | None = None

    def describe(self) -> dict:
        """What the model reads: backend, render config, crop mode, prompt layout, instruction channel."""
        return {"backend": self.spec.backend, "render": dataclasses.asdict(self.render_config),
                "crop_mode": self.spec.crop_mode, "prompt_layout": self.spec.prompt_layout,
                "instruction_channel": self.spec.instruction_channel.get("kind")}

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

    def pages_for(self, document: Document) -> list[Image.Image]:
        """The page images the model reads for `document`."""
        return self.prepare(document).pages

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
                                    pages=[self.fit(open_image(bytes(document), limits, field))])
        if isinstance(document, Image.Image):
            return PreparedDocument(key=key, kind="images", pages=[self.fit(check_image(document, limits, field))])
        limits.check_pages(len(document), field)
        if limits.max_total_pixels is not None:  # from the headers, before any page is decoded
            sizes = [image_size(bytes(p), limits, f"{field}[{i}]") if isinstance(p, (bytes, bytearray)) else p.size
                     for i, p in enumerate(document)]
            limits.check_total_pixels(sizes, field)
        # each page is shrunk as soon as it is decoded, so only one full-size page is held at a time
        pages = [
            self.fit(open_image(bytes(p), limits, f"{field}[{i}]") if isinstance(p, (bytes, bytearray))
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
        if self._max_page_side is None:
            side = max(self.render_config.page_width, self.render_config.page_height)
            ip = getattr(self.processor, "image_processor", None)
            size = getattr(ip, "size", None) or {}
            size = size if isinstance(size, dict) else {"side": size}
            side = max([side, *(int(v) for v in size.values() if isinstance(v, (int, float)))])
            if getattr(ip, "crop_to_patches", False) or self.spec.crop_mode not in (None, "none"):
                tile, most = getattr(ip, "tile_size", None), getattr(ip, "max_patches", None)
                if tile and most:
                    side = max(side, int(tile) * int(most))
            self._max_page_side = side
        return self._max_page_side

    def fit(self, img: Image.Image) -> Image.Image:
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

    def check_length(self, prompt_tokens: int, settings: GenerationSettings, field: str = "document") -> None:
        """`DocumentError` when the prompt and the answer's budget together exceed the model's positions."""
        if self.max_positions and prompt_tokens + settings.max_new_tokens > self.max_positions:
            raise DocumentError(
                field, f"the prompt takes {prompt_tokens} tokens (pages + instruction) and max_new_tokens="
                f"{settings.max_new_tokens}; together they exceed the model's {self.max_positions} positions: "
                "use fewer pages, a shorter instruction or fewer new tokens", self.max_positions)
