"""The engine's document cache holds what the model reads, bounded in bytes as well as pages."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from deepsynth.inference import DocumentError, DocumentLimits, InstructionEngine
from deepsynth.inference.prepare import DocumentCache, PreparedDocument, document_bytes

from .helpers import png_bytes


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return InstructionEngine("tiny", cache_pages=64)


def test_the_page_side_comes_from_the_image_processor(engine):
    assert engine.documents.max_page_side == engine.processor.image_processor.size["height"] == 256


def test_large_pages_are_shrunk_to_what_the_model_reads_before_caching(engine, monkeypatch):
    decoded_sizes = []
    fit = engine.documents.fit
    monkeypatch.setattr(engine.documents, "fit", lambda img: decoded_sizes.append(img.size) or fit(img))
    pages = [png_bytes(4_000, 3_000, (i, 0, 0)) for i in range(3)]
    doc = engine.prepare(pages, DocumentLimits(max_image_pixels=16_000_000), field="pages")
    assert [p.size for p in doc.pages] == [(256, 192)] * 3  # aspect kept
    assert decoded_sizes == [(4_000, 3_000)] * 3  # each shrunk as soon as it was decoded
    assert engine.cache.get(doc.key) is doc and document_bytes(doc) == 3 * 256 * 192 * 3
    small = engine.prepare(Image.new("RGB", (200, 100), "white"))
    assert small.pages[0].size == (200, 100)  # never enlarged


def _doc(key: str, side: int, pages: int = 1) -> PreparedDocument:
    return PreparedDocument(key=key, kind="images", pages=[Image.new("RGB", (side, side))] * pages)


def test_the_cache_is_bounded_in_bytes():
    cache = DocumentCache(max_pages=1_000, max_bytes=1_000_000)
    for i in range(10):
        cache.put(_doc(f"d{i}", 256))  # 196,608 bytes each
    assert cache.stats.bytes <= 1_000_000 and cache.stats.entries == 5 and cache.stats.evictions == 5
    assert cache.get("d9") is not None and cache.get("d4") is None  # least recently used went first
    cache.put(_doc("huge", 1_000))  # 3 MB alone: not cached, nothing evicted for it
    assert cache.get("huge") is None and cache.stats.entries == 5


def test_encoded_features_count_toward_the_byte_bound():
    cache = DocumentCache(max_pages=1_000, max_bytes=1_000_000)
    first = _doc("a", 64)
    cache.put(first)
    first.features = [torch.zeros(1_000, 250)]  # 1,000,000 bytes added after caching (by the vision tower)
    cache.put(_doc("b", 64))
    assert cache.get("a") is None and cache.stats.bytes == 64 * 64 * 3


def test_the_cache_is_bounded_in_entries():
    cache = DocumentCache(max_pages=1_000, max_entries=3)
    for i in range(5):
        cache.put(_doc(f"d{i}", 8))
    assert cache.stats.entries == 3 and cache.get("d0") is None and cache.get("d4") is not None


def test_a_degenerate_page_is_refused_by_the_engine_before_the_model(engine):
    with pytest.raises(DocumentError, match="min_image_side"):
        engine.prepare([png_bytes(64, 64), png_bytes(1, 16_000)], DocumentLimits(), field="pages")
