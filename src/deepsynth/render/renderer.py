"""Pixel-accurate text -> page-image renderer.

Layout rules (see ``render_text``):

* Text is wrapped with real font metrics (``FreeTypeFont.getlength``) at the pixel width
  available between the margins, never at a fixed character count.
* Every input line is a paragraph; blank lines are kept as blank lines.  Runs of spaces
  inside a line and its leading indentation are kept; the whitespace at a wrap point is
  dropped (it becomes the line break) and trailing whitespace is not drawn.
* Trailing blank lines at the end of the text are not drawn (leading ones are).
* Tabs are expanded to spaces (``RenderConfig.tab_size`` columns).
* A word wider than a whole line is broken across lines.  The lines that end inside such a
  word are listed in ``Page.broken_lines``; :func:`join_pages` glues the pieces back together
  without a separator, so ``join_pages(pages).split() == text.split()`` always holds for plain
  text.
* Text that does not fit on a page continues on the next page.  Nothing is cropped or dropped:
  when more than ``max_pages`` pages would be needed a ``ValueError`` is raised instead, as soon
  as the first line of page ``max_pages + 1`` is placed (the rest of the text is not laid out).
* Cost is linear in the text's length, including a word wider than a line (``wrap.fit_len``).
* Fonts are loaded from the files shipped in ``deepsynth/render/fonts`` with Pillow's BASIC
  layout engine (no dependency on libraqm), so the same input gives identical pixels on every
  machine.  Characters the chosen font cannot draw are drawn with a fallback font found on the
  system, if any (this is the only machine-dependent case); otherwise a warning names them.

The jobs live in one module each: ``fonts`` (font files, coverage, fallbacks, widths),
``config`` (``RenderConfig`` and the presets), ``wrap`` (line wrapping), ``markdown`` (Markdown
lines) and this module (layout on pages, drawing, ``render_text``). The names of the first three
that other code uses are importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageDraw

from .config import PRESET_ALIASES, PRESET_MODES, PRESETS, RenderConfig, describe_preset
from .fonts import (
    FONT_DIR,
    MONO_FONT,
    SHIPPED_FONTS,
    Style,
    fallback_font_paths,
    font_codepoints,
    kern,
    line_metrics,
    load_font,
    missing_chars,
    resolve_font_path,
    runs,
    warn_missing,
)
from .markdown import iter_markdown_lines
from .modes import as_token_counter, mode_for_page, resolve_mode, vision_tokens
from .reflow import reflow_text
from .wrap import TOKEN, Line, iter_plain_lines, iter_wrap, normalize_spaces, token_width, wrap_paragraph

__all__ = ["FONT_DIR", "MONO_FONT", "PRESET_ALIASES", "PRESET_MODES", "PRESETS", "SHIPPED_FONTS", "WORD_CACHE", "Page",
           "RenderConfig", "clear_word_cache", "describe_preset", "fallback_font_paths", "font_codepoints",
           "iter_wrap", "join_pages", "layout", "load_font", "normalize_spaces", "render_stats", "render_text",
           "resolve_font_path", "wrap_paragraph"]


@dataclass
class Page:
    """One rendered page."""

    # RGB image, exactly page_width x page_height.
    image: Image.Image
    # 0-based page number.
    index: int
    # The exact text drawn on this page: its lines joined with "\n" (markdown markers stripped).
    text: str
    # Indexes (0-based, into text.split("\n")) of lines whose last word was too wide for a line
    # and continues on the next line (the first line of the next page for the last line).
    broken_lines: tuple[int, ...] = ()


#: Draw single-font lines word by word from cached word bitmaps (``_draw_words``); False draws
#: every line with one ``ImageDraw.text`` call (the reference the cached path must match).
WORD_CACHE = True


def _word_mask(word: str, style: Style, phase64: int) -> tuple[Any, int, int, int]:
    """The bitmap FreeType draws for ``word`` starting ``phase64``/64 px into a pixel: (mask,
    x offset, y offset, width), as ``ImageDraw.text`` would blend it at that position."""
    mask, (ox, oy) = load_font(style.font_path, style.size).getmask2(word, "L", anchor="ls",
                                                                      start=(phase64 / 64, 0))
    return mask, ox, oy, mask.size[0]


#: Cached word bitmaps, keyed by (word, style, phase); emptied when full, so memory stays bounded
#: (a few MB at body sizes) whatever the vocabulary.
_WORD_MASKS: dict[tuple[str, Style, int], tuple[Any, int, int, int]] = {}
#: Words met once on a line drawn whole: cached when met again (most words of a text recur, most
#: distinct words occur once, and rendering a word alone costs more than its share of a line).
_SEEN_WORDS: set[tuple[str, Style, int]] = set()
_MAX_CACHED_WORDS = 1 << 14


def clear_word_cache() -> None:
    """Forget every cached word bitmap (benchmarks: a fresh process's first render)."""
    _WORD_MASKS.clear()
    _SEEN_WORDS.clear()


def _draw_words(draw: Any, line: Line, x0: int, baseline: int, ink: int) -> bool:
    """Draw a single-font line word by word from cached bitmaps; False (nothing drawn) when two
    words' bitmaps would overlap, where blending them one by one could differ from one line mask,
    or when most of its words are new.

    FreeType places each glyph at its pen position rounded to a pixel, the pen advancing by the
    glyph advances plus the kerning of each adjacent pair (BASIC layout). A word drawn alone at
    its pen position within the line therefore gets the same pixels as in the line: its bitmap
    depends only on the word and the fraction of a pixel it starts at, so it is rendered once
    and reused. A line of mostly new words is left to the caller (False), which draws it whole.
    tests/render/test_render_speed.py checks the pixels against per-line drawing.
    """
    style = line.style
    pen = 0.0  # from x0, in px; sums of 26.6 fixed-point values, so exact in a float
    prev = ""
    words = []  # (key, whole pixels of the pen)
    for tok in TOKEN.findall(line.text):
        if prev:
            pen += kern(prev, tok[0], style)
        if not tok[0].isspace():
            whole = int(pen)  # pen >= 0
            words.append(((tok, style, round((pen - whole) * 64)), whole))
        pen += token_width(tok, style)
        prev = tok[-1]
    missing = list(dict.fromkeys(key for key, _ in words if key not in _WORD_MASKS))
    unseen = [key for key in missing if key not in _SEEN_WORDS]
    if 2 * len(unseen) > len(words):  # mostly new words: one FreeType call for the line is cheaper
        if len(_SEEN_WORDS) + len(unseen) > _MAX_CACHED_WORDS:
            _SEEN_WORDS.clear()
        _SEEN_WORDS.update(unseen)
        return False
    if len(_WORD_MASKS) + len(missing) > _MAX_CACHED_WORDS:
        _WORD_MASKS.clear()  # then every word of the line is missing
        missing = list(dict.fromkeys(key for key, _ in words))
    for key in missing:
        _WORD_MASKS[key] = _word_mask(*key)
    placements = []
    right_edge = None
    for key, whole in words:
        mask, ox, oy, width = _WORD_MASKS[key]
        left = x0 + whole + ox
        if width:
            if right_edge is not None and left < right_edge:
                return False
            right_edge = left + width
            placements.append((left, baseline + oy, mask))
    for left, top, mask in placements:
        draw.draw_bitmap((left, top), mask, ink)
    return True


def _draw_page(placed: list[tuple[Line, int]], config: RenderConfig) -> Image.Image:
    img = Image.new("RGB", (config.page_width, config.page_height), config.background)
    draw = ImageDraw.Draw(img)
    ink = draw._getink(config.foreground)[0]  # the ink ImageDraw.text blends with
    for line, baseline in placed:
        if not line.text:
            continue
        x0 = config.margin + line.indent
        parts = runs(line.text, line.style)
        if WORD_CACHE and len(parts) == 1 and _draw_words(draw.draw, line, x0, baseline, ink):
            continue
        x: float = x0
        for i, (run, path) in enumerate(parts):
            font = load_font(path, line.style.size)
            draw.text((x, baseline), run, font=font, fill=config.foreground, anchor="ls")
            if i + 1 < len(parts):
                x += font.getlength(run)
    return img


def layout(text: str, config: RenderConfig, page_limit: int | None = None) -> list[list[tuple[Line, int]]]:
    """Lay ``text`` out into pages of positioned lines (no drawing): per page, (line, baseline y).

    page_limit: stop as soon as a line lands on page ``page_limit + 1``; the result then holds
    ``page_limit + 1`` pages (the last one with that single line) and the rest of the text is
    never wrapped, so the cost of an over-long text is bounded by the limit, not by its length.
    """
    if config.reflow:
        text = reflow_text(text, config.tab_size, markdown=config.markdown)
    if config.markdown:
        lines = iter_markdown_lines(text, config)
    else:
        lines = iter_plain_lines(text, config)
    bottom = config.page_height - config.margin
    pages: list[list[tuple[Line, int]]] = [[]]
    y = config.margin
    missing: set[str] = set()
    for line in lines:
        line.ascent, line.descent = line_metrics(line.text, line.style)
        if not line.advance:
            line.advance = line.ascent + line.descent
        if not line.text and config.blank_line_height != 1.0:
            line.advance = max(1, round(line.advance * config.blank_line_height))
        missing |= missing_chars(line.text, line.style)
        ink = line.ascent + line.descent
        lead = max(0, (line.advance - ink) // 2)
        if pages[-1] and y + lead + ink > bottom:
            pages.append([])
            y = config.margin
        pages[-1].append((line, y + lead + line.ascent))
        y += line.advance
        if page_limit is not None and len(pages) > page_limit:
            break
    warn_missing(missing)
    return pages


def render_text(text: str, config: RenderConfig | None = None) -> list[Page]:
    """Render ``text`` to one or more page images.

    Raises ValueError("text is empty") for empty/whitespace-only text and a ValueError naming
    ``max_pages`` as soon as the layout reaches page ``max_pages + 1`` (the rest is not laid out).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")
    config = config or RenderConfig()
    # trailing whitespace / blank lines at the end are not drawn (a file's final newline is
    # a line terminator, not a blank line)
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip()
    placed_pages = layout(text, config, page_limit=config.max_pages)
    if len(placed_pages) > config.max_pages:
        raise ValueError(
            f"text needs more than {config.max_pages} pages but max_pages={config.max_pages} (layout stopped "
            "there); raise max_pages, use a larger page or a smaller font, or split the text"
        )
    pages = []
    for i, placed in enumerate(placed_pages):
        lines = [line for line, _ in placed]
        pages.append(Page(
            image=_draw_page(placed, config),
            index=i,
            text="\n".join(line.text for line in lines),
            broken_lines=tuple(j for j, line in enumerate(lines) if line.broken),
        ))
    return pages


def join_pages(pages: Sequence[Page]) -> str:
    """Text of all pages joined with "\\n", with broken words glued back together."""
    parts: list[str] = []
    for page in pages:
        broken = set(page.broken_lines)
        for j, line in enumerate(page.text.split("\n")):
            parts.append(line)
            parts.append("" if j in broken else "\n")
    return "".join(parts[:-1]) if parts else ""


def render_stats(text: str, pages: list[Page], tokenizer: Any = None,
                 visual_tokens_per_page: int | None = None, *, config: RenderConfig | None = None,
                 mode: str | None = None) -> dict[str, Any]:
    """Compression statistics for ``text`` rendered as ``pages``.

    Vision tokens: ``visual_tokens_per_page`` when given, else those of DeepSeek-OCR's ``mode``
    (see ``deepsynth.render.modes``; by default the mode matching ``config``'s page size, Base
    without a config) for a page of the config's size.
    ``text_tokens``: counted with ``tokenizer`` (a Hugging Face tokenizer, a ``tokenizers``
    Tokenizer, a (name, function) pair or ``"default"``: see ``modes.as_token_counter``); None
    without one. ``compression_ratio`` = text tokens per vision token (None without a tokenizer).
    """
    words = len(text.split())
    n_pages = len(pages)
    width, height = (config.page_width, config.page_height) if config else (1024, 1024)
    chosen = resolve_mode(mode) if mode else (mode_for_page(width, height) if config else resolve_mode("base"))
    per_page = visual_tokens_per_page if visual_tokens_per_page is not None else vision_tokens(chosen, width, height)
    text_tokens = tokenizer_name = None
    if tokenizer is not None:
        tokenizer_name, count = as_token_counter(tokenizer)
        text_tokens = count(text)
    visual_tokens = n_pages * per_page
    return {
        "words": words,
        "characters": len(text),
        "pages": n_pages,
        "words_per_page": words / n_pages if n_pages else 0.0,
        "mode": chosen.name if visual_tokens_per_page is None else None,
        "visual_tokens_per_page": per_page,
        "tokenizer": tokenizer_name,
        "text_tokens": text_tokens,
        "visual_tokens": visual_tokens,
        "compression_ratio": (text_tokens / visual_tokens) if (text_tokens is not None and visual_tokens) else None,
    }
