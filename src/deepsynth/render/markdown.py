"""A small Markdown layout for the page renderer.

Supported, line by line (each source line stays its own line: soft line breaks are *not*
re-flowed into paragraphs, so ``Page.text`` keeps the source's line structure):

* ATX headings ``#``, ``##``, ``###`` (and ``####``..``######``): bold face, larger size
  (x1.6, x1.35, x1.15, then x1.0); the ``#`` markers (and closing ``#``s) are not drawn.
* List items ``- ``, ``* ``, ``+ `` (drawn as ``•``) and ``1. ``/``1) `` (number kept), nested
  by leading indentation; wrapped lines hang under the item's text.
* Fenced code blocks (```` ``` ```` or ``~~~``): the fence lines are not drawn; the lines inside
  are drawn verbatim in the monospace font (indentation and spaces kept, tabs expanded).
* Block quotes ``> ``: the marker is not drawn, the text is indented.
* Inline markup is drawn as plain text with its markers stripped: ``**bold**``, ``__bold__``,
  ``*em*``, ``~~strike~~`` and ``` `code` ```.  (No mixed fonts inside a line.)  Links and
  everything else are drawn as written.

``Page.text`` holds the text as drawn: markers stripped, bullets as ``•``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from .config import RenderConfig
from .fonts import MONO_FONT, Style, load_font, measure, resolve_font_path
from .wrap import Line, iter_wrap, normalize_spaces

HEADING_SCALE = {1: 1.6, 2: 1.35, 3: 1.15}
BULLET = "\u2022"

_FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})(?:\s+(.*?))?\s*$")
_CLOSING_HASHES = re.compile(r"\s+#+\s*$")
_LIST = re.compile(r"^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$")
_QUOTE = re.compile(r"^\s{0,3}>\s?(.*)$")

_INLINE = [
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*"), r"\1"),
    (re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)"), r"\1"),
    (re.compile(r"~~(?=\S)(.+?)(?<=\S)~~"), r"\1"),
    (re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])"), r"\1"),
]
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def strip_inline(text: str) -> str:
    """Remove inline emphasis / code markers, keeping the text inside them."""
    parts = []
    pos = 0
    # code spans are literal: strip their backticks but do not touch emphasis inside them
    for m in _CODE_SPAN.finditer(text):
        parts.append(_strip_emphasis(text[pos:m.start()]))
        parts.append(m.group(2))
        pos = m.end()
    parts.append(_strip_emphasis(text[pos:]))
    return "".join(parts)


def _strip_emphasis(text: str) -> str:
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return text


def _fitting_size(font_path: str, size: int, config: RenderConfig) -> int:
    """Largest size <= ``size`` whose line fits the page's content box."""
    while size > config.font_size:
        asc, desc = load_font(font_path, size).getmetrics()
        if asc + desc <= config.content_height and size <= config.content_width:
            break
        size -= 1
    return size


def layout_markdown(text: str, config: RenderConfig) -> list[Line]:
    """Turn Markdown source into wrapped lines (see the module docstring for what is supported)."""
    return list(iter_markdown_lines(text, config))


def _advanced(lines: Iterable[Line], advance: int) -> Iterator[Line]:
    for line in lines:
        line.advance = advance
        yield line


def iter_markdown_lines(text: str, config: RenderConfig) -> Iterator[Line]:
    """``layout_markdown`` one line at a time, so the page limit can stop it early."""
    body_path = str(resolve_font_path(config.font, config.bold))
    bold_path = str(resolve_font_path(config.font, True))
    mono_path = str(resolve_font_path(MONO_FONT, config.bold))
    body = Style(body_path, config.font_size)
    code = Style(mono_path, config.font_size)
    width = config.content_width
    max_indent = width // 2
    step = round(config.font_size * 1.5)
    lh = config.line_height

    fence: str | None = None
    for raw in text.split("\n"):
        src = normalize_spaces(raw.expandtabs(config.tab_size))
        m = _FENCE.match(src)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not src[m.end():].strip():
                fence = None
                continue
            yield from _advanced(iter_wrap(src, code, width, min(config.font_size, max_indent),
                                           min(config.font_size, max_indent)), lh)
            continue
        if m:
            fence = m.group(1)
            continue
        m = _HEADING.match(src)
        if m and (m.group(2) or "").strip():
            level = len(m.group(1))
            content = strip_inline(_CLOSING_HASHES.sub("", m.group(2)).strip())
            size = _fitting_size(bold_path, round(config.font_size * HEADING_SCALE.get(level, 1.0)), config)
            yield from _advanced(iter_wrap(content, Style(bold_path, size), width),
                                 round(size * config.line_spacing))
            continue
        m = _LIST.match(src)
        if m and m.group(3).strip():
            lead, marker, content = m.groups()
            depth = len(lead) // 2
            indent = min(depth * step, max_indent)
            drawn_marker = BULLET if marker in "-*+" else marker
            prefix = f"{drawn_marker} "
            hang = min(indent + round(measure(prefix, body)), max_indent)
            yield from _advanced(iter_wrap(prefix + strip_inline(content), body, width, indent, hang), lh)
            continue
        m = _QUOTE.match(src)
        if m:
            indent = min(step, max_indent)
            yield from _advanced(iter_wrap(strip_inline(m.group(1)), body, width, indent, indent), lh)
            continue
        yield from _advanced(iter_wrap(strip_inline(src), body, width), lh)

