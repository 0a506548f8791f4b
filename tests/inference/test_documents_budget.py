"""Cost budget of reading documents: refused with the limit named, before the expensive step.

The expensive steps are counted with spies (PDFium documents opened, pages parsed, text pages
built, images decoded), never timed.
"""

from __future__ import annotations

import threading

import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageFile

from deepsynth.inference import documents as D
from deepsynth.inference.documents import DocumentError, DocumentLimits, check_image, open_image, read_pdf

from .helpers import glyph_stream, image_pdf, png_bytes, shared_stream_pdf, text_pdf


@pytest.fixture()
def calls(monkeypatch):
    """Counts of the expensive steps: image decodes, PDFs opened, pages parsed, text pages built."""
    counts = {"decode": 0, "open": 0, "page": 0, "textpage": 0}

    def spy(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    spy(ImageFile.ImageFile, "load", "decode")
    spy(pdfium.PdfDocument, "get_page", "page")
    spy(pdfium.PdfPage, "get_textpage", "textpage")
    original_init = pdfium.PdfDocument.__init__

    def init(self, *args, **kwargs):
        counts["open"] += 1
        assert D.PDFIUM_LOCK.locked(), "PDFium was entered without PDFIUM_LOCK"
        return original_init(self, *args, **kwargs)

    monkeypatch.setattr(pdfium.PdfDocument, "__init__", init)
    return counts


# --------------------------------------------------------------------------- page shapes


def test_a_one_pixel_wide_png_page_is_refused_from_its_header(calls):
    data = png_bytes(1, 16_000)
    assert len(data) < 200  # the 147-byte page
    with pytest.raises(DocumentError, match="min_image_side") as err:
        open_image(data, DocumentLimits(), field="pages[0]")
    assert err.value.field == "pages[0]" and err.value.limit == 8
    assert calls["decode"] == 0


def test_an_elongated_page_is_refused_naming_the_aspect_ratio(calls):
    with pytest.raises(DocumentError, match=r"aspect ratio 40.0 exceeds the limit of 20 \(max_aspect_ratio\)") as err:
        open_image(png_bytes(50, 2_000), DocumentLimits())
    assert err.value.limit == 20
    assert calls["decode"] == 0
    with pytest.raises(DocumentError, match="max_aspect_ratio"):
        check_image(Image.new("RGB", (3_000, 100)), DocumentLimits(), "image")


def test_shape_limits_can_be_changed_or_turned_off():
    relaxed = DocumentLimits(min_image_side=None, max_aspect_ratio=None)
    assert open_image(png_bytes(1, 400), relaxed).size == (1, 400)
    assert open_image(png_bytes(100, 1_500), DocumentLimits(max_aspect_ratio=16)).size == (100, 1_500)
    assert open_image(png_bytes(8, 8), DocumentLimits()).size == (8, 8)  # small but square: fine


def test_an_image_pdf_with_a_sliver_page_is_refused_before_rendering(monkeypatch):
    rendered = []
    original = pdfium.PdfPage.render
    monkeypatch.setattr(pdfium.PdfPage, "render", lambda self, *a, **k: rendered.append(1) or original(self, *a, **k))
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 600), "white").save(buf, format="PDF")  # a 4 x 600 point page
    with pytest.raises(DocumentError, match="min_image_side") as err:
        read_pdf(buf.getvalue(), DocumentLimits())
    assert "page 1" in err.value.field
    assert rendered == []


# --------------------------------------------------------------------------- PDF content


def test_a_shared_ten_million_glyph_stream_is_refused_before_pdfium_opens_it(calls):
    data = shared_stream_pdf(16, glyph_stream(10_000_000))
    assert len(data) < 120_000  # the 99 KB PDF (70 MB of drawing operations)
    with pytest.raises(DocumentError, match=r"more than 4000000 bytes \(max_pdf_content_bytes\)") as err:
        read_pdf(data, DocumentLimits())
    assert err.value.limit == 4_000_000
    assert calls["open"] == 0 and calls["page"] == 0


def test_content_bytes_are_counted_with_bounded_decompression(monkeypatch):
    decoded = []
    real = D.zlib.decompressobj

    class Spy:
        def __init__(self):
            self.inner = real()

        def decompress(self, data, max_length=0):
            out = self.inner.decompress(data, max_length)
            decoded.append(len(out))
            return out

    monkeypatch.setattr(D.zlib, "decompressobj", Spy)
    data = shared_stream_pdf(1, glyph_stream(10_000_000))
    assert D.pdf_content_bytes(data, 1_000) == 1_001
    assert decoded == [1_001]  # the 70 MB stream was never inflated past the budget


def test_pages_sharing_a_stream_stop_at_the_object_limit_before_their_text(calls):
    data = shared_stream_pdf(16, glyph_stream(600))  # 600 objects per page, 16 pages
    with pytest.raises(DocumentError, match=r"pages 1-2 hold 1200 drawing objects.*max_pdf_objects") as err:
        read_pdf(data, DocumentLimits(max_pdf_objects=1_000))
    assert err.value.limit == 1_000
    assert calls["page"] == 2 and calls["textpage"] == 1  # page 2 was refused before its text


def test_streams_that_cannot_be_measured_count_at_the_worst_expansion(calls):
    data = shared_stream_pdf(1, b"x" * 5_000, filters=("LZWDecode",))
    assert D.pdf_content_bytes(data, 10**9) == 5_000 * 1032
    with pytest.raises(DocumentError, match="max_pdf_content_bytes"):
        read_pdf(data, DocumentLimits())
    assert calls["open"] == 0


def test_ordinary_pdfs_are_within_the_budget():
    assert D.pdf_content_bytes(text_pdf(["Quarterly revenue: 4.2M"] * 16), 10**9) < 5_000
    assert D.pdf_content_bytes(image_pdf(3), 10**9) < 1_000  # the page images are not content
    assert read_pdf(text_pdf(["alpha", "bravo"]), DocumentLimits()) == "alpha\n\nbravo"
    assert len(read_pdf(image_pdf(2), DocumentLimits())) == 2


def test_pdfium_calls_are_serialised_across_threads(calls):
    inside, overlap = [0], [0]
    original = pdfium.PdfPage.get_textpage

    def slow_textpage(self, *args, **kwargs):
        inside[0] += 1
        overlap[0] = max(overlap[0], inside[0])
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] -= 1

    pdfium.PdfPage.get_textpage = slow_textpage
    try:
        results: list[str] = []
        threads = [threading.Thread(target=lambda i=i: results.append(read_pdf(text_pdf([f"doc {i}"] * 8))))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pdfium.PdfPage.get_textpage = original
    assert sorted(r.split("\n")[0] for r in results) == [f"doc {i}" for i in range(6)]
    assert overlap[0] == 1 and calls["open"] == 6  # the spy in `calls` checks the lock at every open
