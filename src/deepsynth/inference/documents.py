"""Documents as the engine accepts them: text, Markdown, PDF bytes, encoded images, PIL images.

Every check here raises `DocumentError`, a ValueError that names the offending field and the
limit it broke, so that the CLI and the HTTP API can report it as it is.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import zlib
from base64 import a85decode
from binascii import unhexlify
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Control characters other than tab/newline/carriage return are not text a page can show.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# PDFium is not thread-safe: every call into it, from any thread, holds this lock.
PDFIUM_LOCK = threading.Lock()

logger = logging.getLogger(__name__)


class Markdown(str):
    """Text that is laid out as Markdown (headings, lists, code) when rendered."""


@dataclass(frozen=True)
class Pdf:
    """A PDF file's bytes. Its text layer is re-rendered; a PDF without text is used as page images."""

    data: bytes


Document = str | Markdown | Pdf | bytes | Path | Image.Image | Sequence[Image.Image] | Sequence[bytes]


class DocumentError(ValueError):
    """Bad document input. `field` names the input (e.g. "text", "pdf", "pages[2]"), `limit` the
    limit that was broken (None when the input was malformed rather than too large)."""

    def __init__(self, field: str, message: str, limit: int | float | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.limit = limit


@dataclass(frozen=True)
class DocumentLimits:
    """Limits applied while a document is read and rendered (None = no limit).

    Every limit is checked before the work it bounds: image sizes from the header, PDF content
    from the raw file before PDFium parses a page, text pages while they are laid out.
    """

    # Characters of text (including a PDF's text layer).
    max_text_chars: int | None = None
    # Pages of a document (rendered text, PDF pages, or images).
    max_pages: int | None = None
    # Width x height of any one image, checked from the header *before* the image is decoded
    # (a small PNG can claim 100000 x 100000 pixels: a decompression bomb).
    max_image_pixels: int | None = 40_000_000
    # Width x height summed over a document's page images, checked from every page's header before
    # any page is decoded: decoding costs time and memory in proportion to pixels, however small
    # the compressed upload (16 plain 16-megapixel PNGs fit in about 1 MB).
    max_total_pixels: int | None = None
    # Shortest side, in pixels, of an image page (PDF pages: in points): a 1-pixel-wide sliver
    # is not a page, and resizing it for the vision tower leaves nothing to read.
    min_image_side: int | None = 8
    # Longest side / shortest side of an image page or a PDF page.  Normal pages are within
    # 1:2 (a long receipt or a scrolling screenshot maybe 1:10); a 1x16000 strip is not a page.
    max_aspect_ratio: float | None = 20.0
    # Decoded bytes of a PDF's page-description streams (page contents and form XObjects, not
    # images or fonts), measured from the raw file with bounded decompression *before* PDFium
    # parses any page.  PDFium builds one object of about 300 bytes of memory per drawing
    # operation (an operation takes 4+ bytes), so this bounds the parse; a dense text page
    # takes 10-50 KB.  Streams that cannot be decoded here (encrypted, exotic filters) count at
    # zlib's largest expansion (1032x their size).
    max_pdf_content_bytes: int | None = 4_000_000
    # Page objects (text runs, paths, images) PDFium finds, summed over the pages read so far;
    # checked after each page is parsed and before its text is extracted (the most expensive
    # step), so pages that share one content stream cannot multiply its cost.
    max_pdf_objects: int | None = 300_000

    def check_pages(self, n: int, field: str) -> None:
        if self.max_pages is not None and n > self.max_pages:
            raise DocumentError(field, f"{n} pages exceed the limit of {self.max_pages} pages", self.max_pages)

    def check_text(self, text: str, field: str) -> None:
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            raise DocumentError(field, f"{len(text)} characters exceed the limit of {self.max_text_chars}",
                                self.max_text_chars)

    def check_total_pixels(self, sizes: Sequence[tuple[int, int]], field: str) -> None:
        total = sum(w * h for w, h in sizes)
        if self.max_total_pixels is not None and total > self.max_total_pixels:
            raise DocumentError(field, f"the {len(sizes)} pages hold {total} pixels together, more than the limit of "
                                f"{self.max_total_pixels} (max_total_pixels)", self.max_total_pixels)

    def check_shape(self, width: float, height: float, field: str, unit: str = "pixels") -> None:
        """Refuse a degenerate page shape (too thin, too elongated) before any work on it."""
        short, long = min(width, height), max(width, height)
        if self.min_image_side is not None and short < self.min_image_side:
            raise DocumentError(field, f"the page is {width:g}x{height:g} {unit}: its shortest side is under the "
                                f"limit of {self.min_image_side} {unit} (min_image_side)", self.min_image_side)
        if self.max_aspect_ratio is not None and long > self.max_aspect_ratio * short:
            raise DocumentError(field, f"the page is {width:g}x{height:g} {unit}: aspect ratio {long / short:.1f} "
                                f"exceeds the limit of {self.max_aspect_ratio:g} (max_aspect_ratio)",
                                self.max_aspect_ratio)


def clean_text(text: str) -> str:
    """Text safe to render: unpaired surrogates become U+FFFD, control characters are dropped."""
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return _CONTROL.sub("", text)


def open_image(data: bytes, limits: DocumentLimits = DocumentLimits(), field: str = "image") -> Image.Image:
    """Decode an encoded image (PNG, JPEG, ...) to RGB, refusing oversized ones before decoding."""
    if not data:
        raise DocumentError(field, "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if limits.max_image_pixels is not None and width * height > limits.max_image_pixels:
                raise DocumentError(
                    field, f"{width}x{height} = {width * height} pixels exceed the limit of "
                    f"{limits.max_image_pixels} pixels", limits.max_image_pixels)
            limits.check_shape(width, height, field)
            img.load()
            return img.convert("RGB")
    except DocumentError:
        raise
    except Image.DecompressionBombError:
        raise DocumentError(field, "the image header claims far too many pixels (a decompression bomb); "
                            f"the limit is {limits.max_image_pixels} pixels", limits.max_image_pixels) from None
    except Exception:  # PIL raises many types for corrupt data; none of them is the caller's fault
        raise DocumentError(field, "not a readable image (PNG, JPEG, WebP, BMP, GIF or TIFF expected)") from None


def image_size(data: bytes, limits: DocumentLimits = DocumentLimits(), field: str = "image") -> tuple[int, int]:
    """Width and height from an encoded image's header (nothing is decoded), within `max_image_pixels`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise DocumentError(field, "the image header claims far too many pixels (a decompression bomb); "
                            f"the limit is {limits.max_image_pixels} pixels", limits.max_image_pixels) from None
    except Exception:  # PIL raises many types for corrupt data; none of them is the caller's fault
        raise DocumentError(field, "not a readable image (PNG, JPEG, WebP, BMP, GIF or TIFF expected)") from None
    if limits.max_image_pixels is not None and width * height > limits.max_image_pixels:
        raise DocumentError(field, f"{width}x{height} = {width * height} pixels exceed the limit of "
                            f"{limits.max_image_pixels} pixels", limits.max_image_pixels)
    return width, height


def check_image(img: Image.Image, limits: DocumentLimits, field: str) -> Image.Image:
    width, height = img.size
    if limits.max_image_pixels is not None and width * height > limits.max_image_pixels:
        raise DocumentError(field, f"{width}x{height} = {width * height} pixels exceed the limit of "
                            f"{limits.max_image_pixels} pixels", limits.max_image_pixels)
    if width < 1 or height < 1:
        raise DocumentError(field, "the image has no pixels")
    limits.check_shape(width, height, field)
    return img.convert("RGB")


# A stream keyword (not "endstream") and the dictionary before it, found in the raw file: stream
# objects are never inside compressed object streams, so every one of them is visible here.
_STREAM = re.compile(rb"(?<!end)stream(?:\r\n|\n|\r)")
_NAME = {key: re.compile(rb"/" + key + rb"\s*/(\w+)") for key in (b"Type", b"Subtype")}
_FILTERS = re.compile(rb"/Filter\s*(\[[^\]]*\]|/\w+)")
_DIRECT_LENGTH = re.compile(rb"/Length\s+(\d+)(?!\s+\d+\s+R)")
# zlib's largest expansion: what a stream that cannot be decoded here may still become.
_WORST_EXPANSION = 1032


def _decoded_size(raw: bytes, filters: list[bytes], cap: int) -> int:
    """Decoded length of one stream, decoding at most ``cap + 1`` bytes; undecodable: the worst case."""
    data = raw
    for i, name in enumerate(filters):
        last = i == len(filters) - 1
        try:
            if name in (b"FlateDecode", b"Fl"):
                d = zlib.decompressobj()
                out = d.decompress(data, cap + 1)
                if last:
                    return len(out)
                data = out
            elif name in (b"ASCIIHexDecode", b"AHx"):
                hexa = re.sub(rb"\s", b"", data).split(b">")[0]
                data = unhexlify(hexa + b"0" * (len(hexa) % 2))
            elif name in (b"ASCII85Decode", b"A85"):
                data = a85decode(re.sub(rb"\s", b"", data).split(b"~>")[0], adobe=False)
            else:
                return len(raw) * _WORST_EXPANSION
        except (zlib.error, ValueError):
            return len(raw) * _WORST_EXPANSION
    return len(data)


def pdf_content_bytes(data: bytes, budget: int) -> int:
    """Decoded bytes of a PDF's page-description streams, read from the raw file without PDFium.

    Counts streams that can hold drawing operations (page contents, form XObjects); skips images,
    fonts, ICC profiles, metadata, object and xref streams.  Stops as soon as the count passes
    ``budget`` (the result is then > budget), so the work is bounded by the budget, not the file.
    """
    total = 0
    for m in _STREAM.finditer(data):
        head = data[max(0, m.start() - 4096):m.start()]
        obj = head.rfind(b"obj")
        head = head[obj + 3:] if obj >= 0 else head
        names = {key: (found.group(1) if (found := rx.search(head)) else None) for key, rx in _NAME.items()}
        if names[b"Subtype"] not in (None, b"Form") or names[b"Type"] not in (None, b"XObject"):
            continue
        if b"/Length1" in head or b"/N " in head or re.search(rb"/N\s+\d", head):  # font programs, ICC profiles
            continue
        begin = m.end()
        length = _DIRECT_LENGTH.search(head)
        stop = begin + int(length.group(1)) if length else -1
        if stop < 0 or stop > len(data) or b"endstream" not in data[stop:stop + 32]:
            stop = data.find(b"endstream", begin)
            stop = len(data) if stop < 0 else stop
        filters = _FILTERS.search(head)
        names_list = re.findall(rb"/(\w+)", filters.group(1)) if filters else []
        total += _decoded_size(data[begin:stop], names_list, budget - total)
        if total > budget:
            break
    return total


def read_pdf(data: bytes, limits: DocumentLimits = DocumentLimits(), page_side: int = 1024,
             field: str = "pdf") -> str | list[Image.Image]:
    """A PDF's text layer (pages joined by blank lines) or, when it has no text, its pages as images.

    page_side: longest side, in pixels, of pages rendered as images (the scale follows from the
    page size, so a huge page size cannot ask for a huge bitmap).

    Cost is checked before each expensive step: the decoded size of the page-description
    streams before PDFium parses a page (``max_pdf_content_bytes``), the page objects found
    before a page's text is extracted (``max_pdf_objects``), and page shapes and embedded image
    sizes before a page is rendered.  PDFium is not thread-safe, so all of it holds PDFIUM_LOCK.
    """
    if not data.startswith(b"%PDF-"):
        raise DocumentError(field, "not a PDF (it must start with %PDF-)")
    if limits.max_pdf_content_bytes is not None:
        content = pdf_content_bytes(data, limits.max_pdf_content_bytes)
        if content > limits.max_pdf_content_bytes:
            raise DocumentError(field, f"the page contents decode to more than {limits.max_pdf_content_bytes} "
                                "bytes (max_pdf_content_bytes); refused before parsing",
                                limits.max_pdf_content_bytes)
    with PDFIUM_LOCK:
        return _read_pdf_locked(data, limits, page_side, field)


def _read_pdf_locked(data: bytes, limits: DocumentLimits, page_side: int, field: str) -> str | list[Image.Image]:
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_raw

    try:
        pdf = pdfium.PdfDocument(data)
    except Exception:
        raise DocumentError(field, "not a readable PDF (corrupt or encrypted)") from None
    try:
        n = len(pdf)
        if n == 0:
            raise DocumentError(field, "the PDF has no pages")
        limits.check_pages(n, field)
        texts: list[str] = []
        chars = 0
        objects = 0
        for i in range(n):
            page = pdf[i]
            objects += pdfium_raw.FPDFPage_CountObjects(page)
            if limits.max_pdf_objects is not None and objects > limits.max_pdf_objects:
                page.close()
                raise DocumentError(field, f"pages 1-{i + 1} hold {objects} drawing objects, more than the limit "
                                    f"of {limits.max_pdf_objects} (max_pdf_objects)", limits.max_pdf_objects)
            textpage = page.get_textpage()
            text = textpage.get_text_bounded().replace("\r\n", "\n").strip()
            textpage.close()
            page.close()
            chars += len(text)
            if limits.max_text_chars is not None and chars > limits.max_text_chars:
                raise DocumentError(field, f"the text layer exceeds the limit of {limits.max_text_chars} characters",
                                    limits.max_text_chars)
            texts.append(text)
        joined = clean_text("\n\n".join(t for t in texts if t))
        if joined.strip():
            return joined
        images = []
        for i in range(n):
            page = pdf[i]
            width, height = page.get_size()
            limits.check_shape(width, height, f"{field} page {i + 1}", unit="points")
            # Embedded images are decoded at full size while a page renders: check their declared
            # pixel counts first (a few compressed bytes can declare a gigapixel image).
            for obj in page.get_objects(filter=[pdfium_raw.FPDF_PAGEOBJ_IMAGE], max_depth=4):
                w, h = obj.get_px_size()
                if limits.max_image_pixels is not None and w * h > limits.max_image_pixels:
                    raise DocumentError(field, f"page {i + 1} embeds a {w}x{h} image; more than the limit of "
                                        f"{limits.max_image_pixels} pixels", limits.max_image_pixels)
            scale = page_side / max(width, height, 1.0)
            images.append(page.render(scale=scale).to_pil().convert("RGB"))
            page.close()
        return images
    except DocumentError:
        raise
    except Exception as exc:
        logger.info("PDF page could not be read: %s: %s", type(exc).__name__, exc)
        raise DocumentError(field, "not a readable PDF (a page could not be read)") from None
    finally:
        pdf.close()


def read_document(path: str | Path) -> str | Markdown | Pdf | Image.Image:
    """A file as a document: .pdf -> Pdf, image files -> one page, .md -> Markdown, else text."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return open_image(path.read_bytes(), field=str(path))
    if suffix == ".pdf":
        return Pdf(path.read_bytes())
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DocumentError(str(path), "not UTF-8 text (and not a .pdf or image file)") from None
    return Markdown(text) if suffix in {".md", ".markdown"} else text
