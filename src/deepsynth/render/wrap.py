"""Line wrapping of the page renderer: paragraphs broken into lines at a width in pixels, with
real font metrics (``fonts.measure``), never at a fixed character count.

Every input line is a paragraph. Runs of spaces inside a line and its leading indentation are
kept; the whitespace at a wrap point is dropped (it becomes the line break) and trailing
whitespace is not drawn. A word wider than a whole line is broken across lines (``Line.broken``),
in work linear in its length (``fit_len``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .fonts import Style, kern, measure, resolve_font_path

if TYPE_CHECKING:
    from .config import RenderConfig


@dataclass
class Line:
    """One line of a page, before (``advance``) and after layout (``ascent``, ``descent``)."""

    # The text drawn (markdown markers stripped, trailing whitespace dropped).
    text: str
    # Font file and size of the line.
    style: Style
    # Extra x offset in pixels (list items, quotes, hanging indents).
    indent: int = 0
    # The line ends inside a word that continues on the next line.
    broken: bool = False
    # Distance to the next line's top in pixels; 0: ascent + descent.
    advance: int = 0
    # Font metrics of the line's text, set by the layout.
    ascent: int = 0
    descent: int = 0


#: Words and the whitespace runs between them.
TOKEN = re.compile(r"\s+|\S+")


def fit_len(word: str, style: Style, width: float) -> int:
    """Largest ``k`` with ``word[:k]`` no wider than ``width`` (0 when not even one character fits).

    Galloping search: prefixes of 1, 2, 4, ... characters until one is too wide, then a binary
    search between the last two.  Every probe is at most twice the answer, so breaking a word of
    ``n`` characters into lines costs O(n log(line length)) measured characters, not O(n^2):
    the rest of the word is never measured as a whole.  Widths grow with the prefix (no glyph has a
    negative advance), so this finds the same prefix as a binary search over the whole word.
    """
    n = len(word)
    fit, probe = 0, 1
    while True:
        probe = min(probe, n)
        if measure(word[:probe], style) > width:
            break
        fit = probe
        if probe == n:
            return n
        probe *= 2
    lo, hi = fit, probe - 1  # word[:fit] fits, word[:probe] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(word[:mid], style) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


#: Tokens up to this many characters have their widths cached; longer ones (rare in real text,
#: and attacker-sized in hostile text) are measured each time so the cache's memory stays small.
_CACHED_TOKEN_CHARS = 64


@lru_cache(maxsize=1 << 16)
def _cached_token_width(text: str, style: Style) -> float:
    return measure(text, style)


def token_width(text: str, style: Style) -> float:
    """Width of one token (a word or a whitespace run), cached for the short ones."""
    return _cached_token_width(text, style) if len(text) <= _CACHED_TOKEN_CHARS else measure(text, style)


def clear_width_cache() -> None:
    """Forget every cached token width (benchmarks: a fresh process's first render)."""
    _cached_token_width.cache_clear()


def wrap_paragraph(text: str, style: Style, width: float, first_indent: int = 0,
                   hanging_indent: int = 0) -> list[Line]:
    """Greedy word wrap of one paragraph (no newlines) at ``width`` pixels (see ``iter_wrap``)."""
    return list(iter_wrap(text, style, width, first_indent, hanging_indent))


def _trim(cur: str, starts: list[tuple[int, int]], style: Style, limit: float) -> tuple[str, int | None]:
    """Drop words from the end of the line ``cur`` until it is no wider than ``limit`` (kerning the
    summed token widths missed), keeping its first word: (line, index of the first token dropped,
    None when none was)."""
    resume = None
    while len(starts) > 1 and measure(cur, style) > limit:
        resume, cut = starts.pop()
        cur = cur[:cut]
    return cur, resume


def iter_wrap(text: str, style: Style, width: float, first_indent: int = 0,
              hanging_indent: int = 0) -> Iterator[Line]:
    """Greedy word wrap of one paragraph (no newlines) at ``width`` pixels, one line at a time.

    The first line starts ``first_indent`` px in, later lines ``hanging_indent`` px in.
    Leading whitespace and inner runs of spaces are kept; whitespace at a wrap point is dropped.
    Widths are summed from cached per-token widths (exact for fonts without kerning across
    spaces, such as DejaVu); near the limit, and for every finished line, the whole line is
    measured exactly, so no line is ever wider than ``width``.  Lines are produced lazily, so a
    caller that stops early (the page limit) never pays for the rest of the paragraph.
    """
    text = text.rstrip()
    if not text:
        yield Line("", style, first_indent)
        return
    tokens = TOKEN.findall(text)
    tol = 1.0 + style.size * 0.05
    indent, emitted, i = first_indent, 0, 0
    cur, cur_w, kerned, pending_ws = "", 0.0, 0.0, ""  # kerned: at the line's token boundaries
    starts: list[tuple[int, int]] = []  # (token index, len(cur) before it) of each word on the line

    def line(line_text: str, broken: bool = False) -> Line:
        nonlocal indent, emitted
        made = Line(line_text, style, indent, broken)
        indent, emitted = hanging_indent, emitted + 1
        return made

    while True:
        limit = width - indent
        if i < len(tokens):
            tok = tokens[i]
            if tok[0].isspace():
                pending_ws, i = tok, i + 1
                continue
            piece = pending_ws + tok if (cur or not emitted) else tok
            est = cur_w + token_width(piece, style)
            fits = est <= limit - tol or (est <= limit + tol and measure(cur + piece, style) <= limit)
            if fits:
                if cur:
                    kerned += kern(cur[-1], piece[0], style)
                starts.append((i, len(cur)))
                cur, cur_w, pending_ws, i = cur + piece, est, "", i + 1
                continue
        elif not cur and emitted:  # end of the paragraph
            return
        if cur or i >= len(tokens):
            # finish the line (then retry this token, or end); the summed widths plus the kerning
            # at each token boundary are the line's width, so a line narrower than the limit by
            # the tolerance cannot be too wide: skip measuring it
            if cur_w + kerned > limit - tol:
                cur, resume = _trim(cur, starts, style, limit)
                i = i if resume is None else resume
            yield line(cur)
            cur, cur_w, kerned, starts, pending_ws = "", 0.0, 0.0, [], ""
            continue
        pending_ws, rest = "", tok
        fit = fit_len(rest, style, limit)
        broke = fit < len(rest)  # False: only the leading indentation did not fit; it is dropped
        while fit < len(rest):  # a word wider than a line: break it
            part = rest[:max(1, fit)]
            yield line(part, broken=True)
            rest = rest[len(part):]
            fit = fit_len(rest, style, width - indent)
        cur, kerned, starts, i = rest, 0.0, [(i, 0)], i + 1
        cur_w = measure(rest, style) if broke else token_width(tok, style)


_OTHER_SPACE = re.compile(r"[^\S ]")


def normalize_spaces(line: str) -> str:
    """Replace every whitespace character other than " " (form feed, NBSP, ...) with " "."""
    return _OTHER_SPACE.sub(" ", line)


def iter_plain_lines(text: str, config: RenderConfig) -> Iterator[Line]:
    """Lines of plain ``text`` (every input line a paragraph) wrapped at the config's width."""
    style = Style(str(resolve_font_path(config.font, config.bold)), config.font_size)
    for para in text.split("\n"):
        para = normalize_spaces(para.expandtabs(config.tab_size))
        for line in iter_wrap(para, style, config.content_width):
            line.advance = config.line_height
            yield line
