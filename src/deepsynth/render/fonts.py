"""Fonts of the page renderer: the shipped font files, which characters a font draws (its cmap,
read with fontTools), system fallback fonts for the others, and text widths and metrics.

Fonts are loaded with Pillow's BASIC layout engine (no dependency on libraqm), so the same input
gives identical pixels on every machine. Characters the chosen font cannot draw are drawn with a
fallback font found on the system, if any (the only machine-dependent case).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import NamedTuple

from fontTools.ttLib import TTFont, TTLibError
from PIL import ImageFont

logger = logging.getLogger(__name__)

FONT_DIR = Path(__file__).parent / "fonts"

#: Shipped font families: name -> (regular file, bold file) inside ``FONT_DIR``.
SHIPPED_FONTS: dict[str, tuple[str, str]] = {
    "DejaVuSans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    "DejaVuSansMono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"),
}

MONO_FONT = "DejaVuSansMono"


def resolve_font_path(font: str, bold: bool = False) -> Path:
    """Return the .ttf/.otf file for ``font`` (a shipped family name or a path).

    For a path with ``bold=True`` a sibling ``<stem>-Bold<suffix>`` is used when it exists;
    otherwise the given file is used and a warning is logged.
    """
    if font in SHIPPED_FONTS:
        return FONT_DIR / SHIPPED_FONTS[font][1 if bold else 0]
    path = Path(font).expanduser()
    if not path.is_file():
        raise ValueError(
            f"font={font!r}: not a shipped font ({', '.join(SHIPPED_FONTS)}) nor an existing font file"
        )
    if bold:
        bold_path = path.with_name(f"{path.stem}-Bold{path.suffix}")
        if bold_path.is_file():
            return bold_path
        logger.warning("bold=True but no bold face %s next to %s; using the regular face", bold_path.name, path)
    return path


@lru_cache(maxsize=128)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """Load (and cache) a font file at ``size`` pixels with the deterministic BASIC layout."""
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=64)
def font_codepoints(path: str) -> frozenset[int]:
    """Code points the font maps to a glyph (its best Unicode ``cmap`` subtable; the first font of
    a collection). Empty, with a warning, for a font whose cmap cannot be read: such a font is
    then assumed to draw everything (no fallback is tried for it)."""
    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            cmap = font.getBestCmap()
    except (TTLibError, OSError, KeyError, ValueError, AssertionError) as exc:
        logger.warning("could not read the cmap of %s (%s); assuming it covers everything", path, exc)
        return frozenset()
    if cmap is None:  # pragma: no cover - a font with no Unicode cmap subtable
        logger.warning("%s has no Unicode cmap subtable; assuming it covers everything", path)
        return frozenset()
    return frozenset(cmap)


_FALLBACK_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts")
_FALLBACK_PATTERNS = ("NotoSans-Regular", "NotoSansCJK", "NotoSansSymbols", "NotoSansMath", "NotoEmoji",
                      "NotoSans", "Noto", "DejaVuSans.", "DejaVu", "FreeSans", "FreeSerif", "Unifont", "unifont")


@lru_cache(maxsize=1)
def fallback_font_paths() -> tuple[str, ...]:
    """System fonts usable as fallbacks, best first (Noto, then DejaVu, FreeFont, Unifont)."""
    found: list[Path] = []
    for d in _FALLBACK_DIRS:
        root = Path(d).expanduser()
        if root.is_dir():
            found.extend(p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))

    def rank(p: Path) -> tuple[int, str]:
        for i, pat in enumerate(_FALLBACK_PATTERNS):
            if p.name.startswith(pat):
                return (i, p.name)
        return (len(_FALLBACK_PATTERNS), p.name)

    wanted = [p for p in found if rank(p)[0] < len(_FALLBACK_PATTERNS)
              and not any(s in p.stem for s in ("Bold", "Italic", "Oblique", "Light", "Condensed"))]
    return tuple(str(p) for p in sorted(wanted, key=rank))


@lru_cache(maxsize=64)
def covered_chars(path: str) -> frozenset[str]:
    """Characters the font at ``path`` draws (empty: unknown, assumed to draw everything)."""
    return frozenset(map(chr, font_codepoints(path)))


@lru_cache(maxsize=8192)
def font_for_char(primary: str, cp: int, fallbacks: tuple[str, ...]) -> str | None:
    """Path of the first font (primary, then fallbacks) that draws ``cp``; None when none does."""
    cov = font_codepoints(primary)
    if not cov or cp in cov:
        return primary
    for path in fallbacks:
        if cp in font_codepoints(path):
            return path
    return None


class Style(NamedTuple):
    """Font file and pixel size of a run of text (a tuple: it keys the width and bitmap caches,
    and tuples hash in C)."""

    font_path: str
    size: int


def runs(text: str, style: Style) -> list[tuple[str, str]]:
    """Split ``text`` into (substring, font path) runs, choosing fallback fonts per character.

    Characters that no font draws stay in the primary font (drawn as its .notdef box).
    """
    primary = style.font_path
    covered = covered_chars(primary)
    if not covered or covered.issuperset(text):
        return [(text, primary)]
    fallbacks = fallback_font_paths()

    def font_of(ch: str) -> str:
        if ch in covered or ch.isspace():
            return primary
        return font_for_char(primary, ord(ch), fallbacks) or primary

    # groupby joins each run once: growing a run one character at a time is quadratic in its length
    return [("".join(chars), path) for path, chars in groupby(text, key=font_of)]


def missing_chars(text: str, style: Style) -> set[str]:
    """Characters of ``text`` that neither the style's font nor any fallback font can draw."""
    covered = covered_chars(style.font_path)
    if not covered or covered.issuperset(text):
        return set()
    fallbacks = fallback_font_paths()
    return {ch for ch in set(text) - covered if not ch.isspace()
            and font_for_char(style.font_path, ord(ch), fallbacks) is None}


def warn_missing(missing: set[str]) -> None:
    """Log the characters no installed font draws (they are drawn as boxes), if any."""
    if missing:
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in sorted(missing)[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        logger.warning("no installed font can draw %d character(s): %s%s; they are drawn as boxes",
                       len(missing), shown, more)


def measure(text: str, style: Style) -> float:
    """Width in pixels of ``text`` drawn in ``style`` (sum of its font runs)."""
    return sum(load_font(p, style.size).getlength(t) for t, p in runs(text, style))


def line_metrics(text: str, style: Style) -> tuple[int, int]:
    """(ascent, descent) in pixels of a line of ``text``: the largest of its fonts'."""
    asc, desc = load_font(style.font_path, style.size).getmetrics()
    for _, path in runs(text, style):
        if path != style.font_path:
            a, d = load_font(path, style.size).getmetrics()
            asc, desc = max(asc, a), max(desc, d)
    return asc, desc


@lru_cache(maxsize=1 << 12)
def kern(left: str, right: str, style: Style) -> float:
    """Kerning the font applies between two adjacent characters, in px (a multiple of 1/64)."""
    font = load_font(style.font_path, style.size)
    return font.getlength(left + right) - font.getlength(left) - font.getlength(right)
