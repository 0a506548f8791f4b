"""Reflow: turn hard-wrapped text into paragraphs, keeping its structure.

Plain-text files (licences, RFCs, e-mails, Project Gutenberg books) break every line at a fixed
number of characters. Drawn as is, a page line holds no more than that source line, however wide
the page and small the font. ``reflow_text`` joins the lines of a paragraph with single spaces so
the renderer wraps them at the page's width instead. Only line breaks change: ``reflow_text(t)
.split() == t.split()`` always holds, so every word stays, in order.

A line is joined to the line before it unless one of these keeps it on its own line:

* a blank line before it (paragraphs stay apart; blank lines are kept as they are);
* fenced code (```` ``` ```` / ``~~~`` up to the closing fence): kept verbatim, fences included;
* it starts a structure: a list item (``-``, ``*``, ``+``, ``•``, ``1.``, ``1)``, ``a)``, ``(i)``),
  an ATX heading (``#``), a block quote (``>``), a table row (starts or ends with ``|``, or has
  two ``|``), a rule or setext underline (``---``, ``===``, ``***``), a grid-table border (``+--+``);
* it is indented by 4 or more columns (indented code, centred titles, addresses, ASCII art), or,
  after a list item, by 4 or more columns more than the item (its continuation lines are joined);
* the line before it cannot take a continuation: a heading, a table row, a rule, a line indented by
  4 or more columns that is not the first line of its paragraph, or (Markdown) a hard break
  (two trailing spaces or a trailing backslash).

A list item takes the lines that follow it (its continuation lines), as in Markdown. The first
line of a paragraph keeps its indentation; joined lines lose theirs (it was only wrapping).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

#: Indentation (in columns, tabs expanded) from which a line is preformatted.
PRE_INDENT = 4

_FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,9}[.)]|[A-Za-z][.)]|\((?:\d{1,3}|[A-Za-z]|[ivxlcdm]{1,6})\))\s+\S")
_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s|$)")
_QUOTE = re.compile(r"^\s{0,3}>")
_RULE = re.compile(r"^\s*([-=*_~])(?:\s*\1){2,}\s*$")
_GRID_BORDER = re.compile(r"^\s*\+[-=+:]+\+\s*$")


def _indent(line: str, tab_size: int) -> int:
    expanded = line.expandtabs(tab_size)
    return len(expanded) - len(expanded.lstrip(" "))


def _is_table_row(stripped: str) -> bool:
    return "|" in stripped and (stripped.startswith("|") or stripped.endswith("|") or stripped.count("|") >= 2)


def _starts_structure(line: str) -> bool:
    stripped = line.strip()
    return bool(_LIST_ITEM.match(line) or _HEADING.match(line) or _QUOTE.match(line) or _RULE.match(line)
                or _GRID_BORDER.match(line) or _is_table_row(stripped))


def _closed(line: str, markdown: bool) -> bool:
    """True when nothing may be joined after ``line`` (a heading, a table row, a rule, a hard break)."""
    stripped = line.strip()
    if _HEADING.match(line) or _RULE.match(line) or _GRID_BORDER.match(line) or _is_table_row(stripped):
        return True
    return markdown and (line.endswith("  ") or line.rstrip(" ").endswith("\\"))


def iter_reflow(lines: list[str], tab_size: int = 4, markdown: bool = False) -> Iterator[str]:
    """Reflowed lines of ``lines`` (source lines without their newlines); see the module docstring."""
    out: str | None = None  # the output line being built
    out_open = False  # whether the next source line may be joined to it
    out_limit = PRE_INDENT  # a line indented this far or more is not joined to it
    fence: str | None = None
    for line in lines:
        if fence is not None:
            m = _FENCE.match(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence = None
            yield line
            continue
        m = _FENCE.match(line)
        if m:
            if out is not None:
                yield out
            out, out_open, fence = None, False, m.group(1)
            yield line
            continue
        if not line.strip():
            if out is not None:
                yield out
            out, out_open = None, False
            yield line
            continue
        indent = _indent(line, tab_size)
        if out is not None and out_open and indent < out_limit and not _starts_structure(line):
            out = out.rstrip() + " " + line.strip()
            out_open = not _closed(line, markdown)
            continue
        if out is not None:
            yield out
        first_of_paragraph = out is None
        out = line
        # an indented first line is a paragraph indent; an indented later line is preformatted
        out_open = not _closed(line, markdown) and (first_of_paragraph or indent < PRE_INDENT)
        # a list item's continuation lines are indented like its text, however deep the item is
        out_limit = indent + PRE_INDENT if _LIST_ITEM.match(line) else PRE_INDENT
    if out is not None:
        yield out


def reflow_text(text: str, tab_size: int = 4, markdown: bool = False) -> str:
    """``text`` with the single line breaks inside its paragraphs replaced by spaces.

    Structure (blank lines, lists, headings, quotes, tables, code) is kept; see the module
    docstring for the rules. ``markdown``: a line ending in a hard break (two spaces or ``\\``) is
    not joined to the next one.
    """
    return "\n".join(iter_reflow(text.split("\n"), tab_size, markdown))
