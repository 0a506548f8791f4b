"""Documents as the engine accepts them: text, Markdown, PDF bytes, encoded images, PIL images.

Every check here raises `DocumentError`, a ValueError that names the offending field and the
limit it broke, so that the CLI and the HTTP API can report it as it is.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Control characters other than tab/newline/carriage return are not text a page can show.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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

    def __init__(self, field: str, message: str, limit: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.limit = limit


@dataclass(frozen=True)
class DocumentLimits:
    """Limits applied while a document is read and rendered (None = no limit).

    max_text_chars:   characters of text (including a PDF's text layer).
    max_pages:        pages of a document (rendered text, PDF pages, or images).
    max_image_pixels: width x height of any one image, checked from the header *before* the image
                      is decoded (a small PNG can claim 100000 x 100000 pixels: a decompression bomb).
    """

    max_text_chars: int | None = None
    max_pages: int | None = None
    max_image_pixels: int | None = 40_000_000

    def check_pages(self, n: int, field: str) -> None:
        if self.max_pages is not None and n > self.max_pages:
            raise DocumentError(field, f"{n} pages exceed the limit of {self.max_pages} pages", self.max_pages)

    def check_text(self, text: str, field: str) -> None:
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            raise DocumentError(field, f"{len(text)} characters exceed the limit of {self.max_text_chars}",
                                self.max_text_chars)


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
            img.load()
            return img.convert("RGB")
    except DocumentError:
        raise
    except Image.DecompressionBombError:
        raise DocumentError(field, "the image header claims far too many pixels (a decompression bomb); "
                            f"the limit is {limits.max_image_pixels} pixels", limits.max_image_pixels) from None
    except Exception:  # PIL raises many types for corrupt data; none of them is the caller's fault
        raise DocumentError(field, "not a readable image (PNG, JPEG, WebP, BMP, GIF or TIFF expected)") from None


def check_image(img: Image.Image, limits: DocumentLimits, field: str) -> Image.Image:
    width, height = img.size
    if limits.max_image_pixels is not None and width * height > limits.max_image_pixels:
        raise DocumentError(field, f"{width}x{height} = {width * height} pixels exceed the limit of "
                            f"{limits.max_image_pixels} pixels", limits.max_image_pixels)
    if width < 1 or height < 1:
        raise DocumentError(field, "the image has no pixels")
    return img.convert("RGB")


def read_pdf(data: bytes, limits: DocumentLimits = DocumentLimits(), page_side: int = 1024,
             field: str = "pdf") -> str | list[Image.Image]:
    """A PDF's text layer (pages joined by blank lines) or, when it has no text, its pages as images.

    page_side: longest side, in pixels, of pages rendered as images (the scale follows from the
    page size, so a huge page size cannot ask for a huge bitmap).
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_raw

    if not data.startswith(b"%PDF-"):
        raise DocumentError(field, "not a PDF (it must start with %PDF-)")
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
        for i in range(n):
            page = pdf[i]
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
            # Embedded images are decoded at full size while a page renders: check their declared
            # pixel counts first (a few compressed bytes can declare a gigapixel image).
            for obj in page.get_objects(filter=[pdfium_raw.FPDF_PAGEOBJ_IMAGE], max_depth=4):
                w, h = obj.get_px_size()
                if limits.max_image_pixels is not None and w * h > limits.max_image_pixels:
                    raise DocumentError(field, f"page {i + 1} embeds a {w}x{h} image; more than the limit of "
                                        f"{limits.max_image_pixels} pixels", limits.max_image_pixels)
            width, height = page.get_size()
            scale = page_side / max(width, height, 1.0)
            images.append(page.render(scale=scale).to_pil().convert("RGB"))
            page.close()
        return images
    except DocumentError:
        raise
    except Exception:
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
