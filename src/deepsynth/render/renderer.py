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
* Cost is linear in the text's length, including a word wider than a line (``_fit_len``).
* Fonts are loaded from the files shipped in ``deepsynth/render/fonts`` with Pillow's BASIC
  layout engine (no dependency on libraqm), so the same input gives identical pixels on every
  machine.  Characters the chosen font cannot draw are drawn with a fallback font found on the
  system, if any (this is the only machine-dependent case); otherwise a warning names them.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from PIL import Image, ImageDraw, ImageFont

from .modes import as_token_counter, mode_for_page, resolve_mode, vision_tokens
from .reflow import reflow_text

logger = logging.getLogger(__name__)

FONT_DIR = Path(__file__).parent / "fonts"

#: Shipped font families: name -> (regular file, bold file) inside ``FONT_DIR``.
SHIPPED_FONTS: dict[str, tuple[str, str]] = {
    "DejaVuSans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    "DejaVuSansMono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"),
}

MONO_FONT = "DejaVuSansMono"

#: Named configurations. ``tiny`` is what the tiny offline model reads: keep it unchanged (it is
#: the project's 256 px test page, not DeepSeek-OCR's Tiny mode, which is ``ocr-tiny-*``).
#: Its geometry follows the tiny model's 4 x 4 grid of 64 px image tokens: a 64 px line height
#: puts each of the 4 lines inside one token row, and 32 px glyphs with a 4 px margin end a
#: ``"alpha: 42"`` line at x = 172, so a value never reaches the last token column.
#: The presets named after DeepSeek-OCR's modes follow below; the earlier short names are aliases.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(page_width=256, page_height=256, margin=4, font=MONO_FONT, font_size=32, bold=True,
                 line_spacing=2.0),
    # The page reader's page (deepsynth.training.page_reader): 14 lines of 30 characters on a
    # 256 px page; the 16 px line pitch is one row of the reader's 16 px image-token grid.
    "reader": dict(page_width=256, page_height=256, margin=8, font=MONO_FONT, font_size=13, bold=True,
                   line_spacing=1.25),
}

#: Presets matched to DeepSeek-OCR's modes (``deepsynth.render.modes``): the page is drawn at the
#: mode's resolution, so no pixel is lost to resizing, in two densities. "readable": the font sizes
#: of the presets above (line breaks as written). "dense": the smallest type an independent OCR
#: still reads (8 px DejaVu Sans with 15% leading), thin margins, half-height blank lines,
#: reflowed paragraphs. Every mode spends the same pixels per vision token (4096), so one dense
#: geometry fits all; benchmarks/compression.py measures what each preset holds and reads back.
#: Gundam pages are 1280 px: a 2 x 2 grid of 640 px tiles.
_MODE_PAGES = {"tiny": 512, "small": 640, "base": 1024, "large": 1280, "gundam": 1280}
_READABLE_FONT = {"tiny": 14, "small": 16, "base": 20, "large": 24, "gundam": 20}
_DENSE = dict(font_size=8, margin=8, line_spacing=1.15, reflow=True, blank_line_height=0.5)
#: Preset name -> the DeepSeek-OCR mode it is drawn for.
PRESET_MODES: dict[str, str] = {}
for _mode, _side in _MODE_PAGES.items():
    PRESETS[f"ocr-{_mode}-readable"] = dict(page_width=_side, page_height=_side, font_size=_READABLE_FONT[_mode])
    PRESETS[f"ocr-{_mode}-dense"] = dict(page_width=_side, page_height=_side, **_DENSE)
    PRESET_MODES[f"ocr-{_mode}-readable"] = PRESET_MODES[f"ocr-{_mode}-dense"] = _mode

#: The first short preset names, kept as aliases: they drew pages at DeepSeek-OCR's sizes but
#: under other modes' names ("large" drew Base's 1024 px pages). Alias -> the preset it draws
#: exactly (same RenderConfig); `describe_preset` says so wherever one is used.
PRESET_ALIASES: dict[str, str] = {"small": "ocr-tiny-readable", "base": "ocr-small-readable",
                                  "large": "ocr-base-readable", "gundam": "ocr-large-readable"}
for _alias, _target in PRESET_ALIASES.items():
    PRESETS[_alias] = dict(PRESETS[_target])
    PRESET_MODES[_alias] = PRESET_MODES[_target]


def describe_preset(name: str) -> str:
    """What a preset draws, in words: its page, the DeepSeek-OCR mode it is drawn for, and for an
    alias the preset it stands for."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown: choose one of {', '.join(PRESETS)}")
    side = PRESETS[name]["page_width"]
    if name == "tiny":
        return "tiny: the tiny offline models' 256 px page (not DeepSeek-OCR's Tiny mode: see ocr-tiny-*)"
    if name == "reader":
        return "reader: the page reader's 256 px page, 14 lines of 30 characters (tiny-page models)"
    mode = PRESET_MODES[name]
    what = f"{side} px pages for DeepSeek-OCR's {mode.capitalize()} mode"
    if name in PRESET_ALIASES:
        return (f"{name}: alias of {PRESET_ALIASES[name]} ({what}; DeepSeek's {name.capitalize()} mode is "
                f"ocr-{name}-readable / ocr-{name}-dense)")
    return f"{name}: {what}"

_PAGE_SIDE = (64, 4096)
_FONT_SIZE = (6, 200)
_LINE_SPACING = (1.0, 3.0)
_BLANK_LINE_HEIGHT = (0.25, 1.0)


# --------------------------------------------------------------------------- fonts


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
    """Code points the font maps to a glyph, read from its ``cmap`` table (formats 4 and 12)."""
    data = Path(path).read_bytes()
    try:
        return frozenset(_parse_cmap(data))
    except (struct.error, ValueError) as exc:  # pragma: no cover - exotic font files
        logger.warning("could not read the cmap of %s (%s); assuming it covers everything", path, exc)
        return frozenset()


def _parse_cmap(data: bytes) -> set[int]:
    offset = 0
    if data[:4] == b"ttcf":  # font collection: use the first font
        offset = struct.unpack_from(">I", data, 12)[0]
    num_tables = struct.unpack_from(">H", data, offset + 4)[0]
    cmap_off = None
    for i in range(num_tables):
        tag, _, toff, _ = struct.unpack_from(">4sIII", data, offset + 12 + 16 * i)
        if tag == b"cmap":
            cmap_off = toff
    if cmap_off is None:
        raise ValueError("no cmap table")
    n_sub = struct.unpack_from(">H", data, cmap_off + 2)[0]
    subtables: dict[int, int] = {}
    for i in range(n_sub):
        pid, eid, soff = struct.unpack_from(">HHI", data, cmap_off + 4 + 8 * i)
        if (pid, eid) in ((3, 10), (0, 4), (0, 6)):
            subtables.setdefault(12, cmap_off + soff)
        elif (pid, eid) in ((3, 1), (0, 3), (0, 1), (0, 0)):
            subtables.setdefault(4, cmap_off + soff)
    cps: set[int] = set()
    for start in subtables.values():
        fmt = struct.unpack_from(">H", data, start)[0]
        if fmt == 4:
            seg_x2 = struct.unpack_from(">H", data, start + 6)[0]
            n = seg_x2 // 2
            ends = struct.unpack_from(f">{n}H", data, start + 14)
            starts = struct.unpack_from(f">{n}H", data, start + 16 + seg_x2)
            deltas = struct.unpack_from(f">{n}h", data, start + 16 + 2 * seg_x2)
            ro_pos = start + 16 + 3 * seg_x2
            ranges = struct.unpack_from(f">{n}H", data, ro_pos)
            for i in range(n):
                for c in range(starts[i], ends[i] + 1):
                    if c == 0xFFFF:
                        continue
                    if ranges[i] == 0:
                        gid = (c + deltas[i]) & 0xFFFF
                    else:
                        pos = ro_pos + 2 * i + ranges[i] + 2 * (c - starts[i])
                        gid = struct.unpack_from(">H", data, pos)[0]
                        if gid:
                            gid = (gid + deltas[i]) & 0xFFFF
                    if gid:
                        cps.add(c)
        elif fmt == 12:
            n_groups = struct.unpack_from(">I", data, start + 12)[0]
            for i in range(n_groups):
                s, e, g = struct.unpack_from(">III", data, start + 16 + 12 * i)
                if g:
                    cps.update(range(s, e + 1))
                else:
                    cps.update(range(s + 1, e + 1))
    return cps


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
def _covered_chars(path: str) -> frozenset[str]:
    return frozenset(map(chr, font_codepoints(path)))


@lru_cache(maxsize=8192)
def _font_for_char(primary: str, cp: int, fallbacks: tuple[str, ...]) -> str | None:
    """Path of the first font (primary, then fallbacks) that draws ``cp``; None when none does."""
    cov = font_codepoints(primary)
    if not cov or cp in cov:
        return primary
    for path in fallbacks:
        if cp in font_codepoints(path):
            return path
    return None


# --------------------------------------------------------------------------- config


@dataclass
class RenderConfig:
    """How text is laid out on pages. All sizes are pixels."""

    # Page width in pixels, in [64, 4096].
    page_width: int = 1024
    # Page height in pixels, in [64, 4096].
    page_height: int = 1024
    # Blank border on every side, in pixels (>= 0, must leave room for a line and a character).
    margin: int = 32
    # Shipped font name (DejaVuSans, DejaVuSansMono) or a path to a .ttf/.otf file.
    font: str = "DejaVuSans"
    # Font size in pixels, in [6, 200].
    font_size: int = 20
    # Use the bold face of the font.
    bold: bool = False
    # Line height = round(font_size * line_spacing); in [1.0, 3.0].
    line_spacing: float = 1.25
    # Page colour (RGB).
    background: tuple[int, int, int] = (255, 255, 255)
    # Text colour (RGB).
    foreground: tuple[int, int, int] = (0, 0, 0)
    # Tabs expand to the next multiple of this many columns (>= 1).
    tab_size: int = 4
    # More pages than this raises ValueError (>= 1).
    max_pages: int = 64
    # Interpret the text as Markdown (headings, lists, fenced code).
    markdown: bool = False
    # Join the hard-wrapped lines of each paragraph before wrapping at the page width; blank
    # lines, lists, headings, tables and code keep their lines (deepsynth.render.reflow).
    reflow: bool = False
    # Height of a blank line as a fraction of the line height, in [0.25, 1.0]: below 1 the gap
    # between paragraphs shrinks (dense pages), while still separating them.
    blank_line_height: float = 1.0

    def __post_init__(self) -> None:
        def check_range(name: str, value: float, lo: float, hi: float) -> None:
            if not (lo <= value <= hi):
                raise ValueError(f"{name}={value!r} is out of range: allowed [{lo}, {hi}]")

        check_range("page_width", self.page_width, *_PAGE_SIDE)
        check_range("page_height", self.page_height, *_PAGE_SIDE)
        check_range("font_size", self.font_size, *_FONT_SIZE)
        check_range("line_spacing", self.line_spacing, *_LINE_SPACING)
        check_range("blank_line_height", self.blank_line_height, *_BLANK_LINE_HEIGHT)
        if self.tab_size < 1:
            raise ValueError(f"tab_size={self.tab_size!r} is out of range: allowed >= 1")
        if self.max_pages < 1:
            raise ValueError(f"max_pages={self.max_pages!r} is out of range: allowed >= 1")
        for name in ("background", "foreground"):
            colour = tuple(getattr(self, name))
            if len(colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour):
                raise ValueError(f"{name}={colour!r} must be an (R, G, B) tuple of ints in [0, 255]")
            setattr(self, name, colour)
        if self.margin < 0:
            raise ValueError(f"margin={self.margin!r} is out of range: allowed >= 0")
        path = resolve_font_path(self.font, self.bold)
        try:
            font = load_font(str(path), self.font_size)
        except OSError as exc:
            raise ValueError(f"font={self.font!r}: cannot load {path} as a TrueType/OpenType font ({exc})") from exc
        ascent, descent = font.getmetrics()
        max_w = self.page_width - self.font_size
        max_h = self.page_height - ascent - descent
        if 2 * self.margin > min(max_w, max_h):
            raise ValueError(
                f"margin={self.margin!r} is out of range: allowed [0, {max(0, min(max_w, max_h) // 2)}] "
                f"for a {self.page_width}x{self.page_height} page at font_size={self.font_size} "
                "(room for at least one line and one character)"
            )

    @property
    def line_height(self) -> int:
        """Distance between consecutive baselines, in pixels."""
        return round(self.font_size * self.line_spacing)

    @property
    def content_width(self) -> int:
        return self.page_width - 2 * self.margin

    @property
    def content_height(self) -> int:
        return self.page_height - 2 * self.margin

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "RenderConfig":
        """Build a config from a named preset (see ``PRESETS``), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is unknown: choose one of {', '.join(PRESETS)}")
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"unknown RenderConfig field(s) {bad}; valid fields: {sorted(valid)}")
        return cls(**{**PRESETS[name], **overrides})


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


# --------------------------------------------------------------------------- layout


class _Style(NamedTuple):
    """Font file and pixel size of a run of text (a tuple: it keys the width and bitmap caches,
    and tuples hash in C)."""

    font_path: str
    size: int


@dataclass
class _Line:
    text: str
    style: _Style
    indent: int = 0  # extra x offset in pixels
    broken: bool = False  # ends inside a word that continues on the next line
    advance: int = 0  # line height
    ascent: int = 0
    descent: int = 0


def _runs(text: str, style: _Style) -> list[tuple[str, str]]:
    """Split ``text`` into (substring, font path) runs, choosing fallback fonts per character.

    Characters that no font draws stay in the primary font (drawn as its .notdef box).
    """
    primary = style.font_path
    covered = _covered_chars(primary)
    if not covered or covered.issuperset(text):
        return [(text, primary)]
    fallbacks = fallback_font_paths()

    def font_of(ch: str) -> str:
        if ch in covered or ch.isspace():
            return primary
        return _font_for_char(primary, ord(ch), fallbacks) or primary

    # groupby joins each run once: growing a run one character at a time is quadratic in its length
    return [("".join(chars), path) for path, chars in groupby(text, key=font_of)]


def _missing_chars(text: str, style: _Style) -> set[str]:
    """Characters of ``text`` that neither the style's font nor any fallback font can draw."""
    covered = _covered_chars(style.font_path)
    if not covered or covered.issuperset(text):
        return set()
    fallbacks = fallback_font_paths()
    return {ch for ch in set(text) - covered if not ch.isspace()
            and _font_for_char(style.font_path, ord(ch), fallbacks) is None}


def _measure(text: str, style: _Style) -> float:
    """Width in pixels of ``text`` drawn in ``style`` (sum of its font runs)."""
    return sum(load_font(p, style.size).getlength(t) for t, p in _runs(text, style))


def _metrics(text: str, style: _Style) -> tuple[int, int]:
    asc, desc = load_font(style.font_path, style.size).getmetrics()
    for _, path in _runs(text, style):
        if path != style.font_path:
            a, d = load_font(path, style.size).getmetrics()
            asc, desc = max(asc, a), max(desc, d)
    return asc, desc


_TOKEN = re.compile(r"\s+|\S+")


def _fit_len(word: str, style: _Style, width: float) -> int:
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
        if _measure(word[:probe], style) > width:
            break
        fit = probe
        if probe == n:
            return n
        probe *= 2
    lo, hi = fit, probe - 1  # word[:fit] fits, word[:probe] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _measure(word[:mid], style) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fit_prefix(word: str, style: _Style, width: float) -> str:
    """Longest prefix of ``word`` no wider than ``width`` (at least one character)."""
    return word[:max(1, _fit_len(word, style, width))]


#: Tokens up to this many characters have their widths cached; longer ones (rare in real text,
#: and attacker-sized in hostile text) are measured each time so the cache's memory stays small.
_CACHED_TOKEN_CHARS = 64


@lru_cache(maxsize=1 << 16)
def _cached_token_width(text: str, style: _Style) -> float:
    return _measure(text, style)


def _token_width(text: str, style: _Style) -> float:
    return _cached_token_width(text, style) if len(text) <= _CACHED_TOKEN_CHARS else _measure(text, style)


def wrap_paragraph(text: str, style: _Style, width: float, first_indent: int = 0,
                   hanging_indent: int = 0) -> list[_Line]:
    """Greedy word wrap of one paragraph (no newlines) at ``width`` pixels (see ``iter_wrap``)."""
    return list(iter_wrap(text, style, width, first_indent, hanging_indent))


def iter_wrap(text: str, style: _Style, width: float, first_indent: int = 0,
              hanging_indent: int = 0) -> Iterator[_Line]:
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
        yield _Line("", style, first_indent)
        return
    tokens = _TOKEN.findall(text)
    tol = 1.0 + style.size * 0.05
    emitted = 0
    cur = ""
    cur_w = 0.0
    kerned = 0.0  # kerning at the token boundaries of the line, which cur_w leaves out
    starts: list[tuple[int, int]] = []  # (token index, len(cur) before it) of each word on the line
    indent = first_indent
    pending_ws = ""
    i = 0

    def avail() -> float:
        return width - indent

    def line(line_text: str, broken: bool = False) -> _Line:
        nonlocal indent, emitted
        made = _Line(line_text, style, indent, broken)
        indent = hanging_indent
        emitted += 1
        return made

    while True:
        if i >= len(tokens):  # end of paragraph: the last line
            if not cur and emitted:
                break
            if len(starts) > 1 and cur_w + kerned > avail() - tol and _measure(cur, style) > avail():
                while len(starts) > 1 and _measure(cur, style) > avail():  # kerning the estimate missed
                    i, cut = starts.pop()
                    cur = cur[:cut]
                yield line(cur)
                cur, cur_w, kerned, starts, pending_ws = "", 0.0, 0.0, [], ""
                continue
            yield line(cur)
            break
        tok = tokens[i]
        if tok[0].isspace():
            pending_ws = tok
            i += 1
            continue
        piece = pending_ws + tok if (cur or not emitted) else tok
        est = cur_w + _token_width(piece, style)
        limit = avail()
        if est <= limit - tol:
            fits = True
        elif est > limit + tol:
            fits = False
        else:
            fits = _measure(cur + piece, style) <= limit
        if fits:
            if cur:
                kerned += _kern(cur[-1], piece[0], style)
            starts.append((i, len(cur)))
            cur += piece
            cur_w = est
            pending_ws = ""
            i += 1
            continue
        if cur:
            # finish the line; the exact check catches kerning the summed estimate missed. The
            # summed widths plus the kerning at each token boundary are the line's width, so a
            # line narrower than the limit by the tolerance cannot fail the check: skip measuring
            if cur_w + kerned > limit - tol:
                while len(starts) > 1 and _measure(cur, style) > limit:
                    i, cut = starts.pop()
                    cur = cur[:cut]
            yield line(cur)
            cur, cur_w, kerned, starts, pending_ws = "", 0.0, 0.0, [], ""
            continue  # retry this token on the new line
        pending_ws = ""
        rest = tok
        fit = _fit_len(rest, style, limit)
        if fit == len(rest):  # only the leading indentation did not fit: drop it
            cur, cur_w, kerned, starts = tok, _token_width(tok, style), 0.0, [(i, 0)]
            i += 1
            continue
        while fit < len(rest):  # a word wider than a line: break it
            part = rest[:max(1, fit)]
            yield line(part, broken=True)
            rest = rest[len(part):]
            fit = _fit_len(rest, style, avail())
        cur, cur_w, kerned, starts = rest, _measure(rest, style), 0.0, [(i, 0)]
        i += 1


_OTHER_SPACE = re.compile(r"[^\S ]")


def normalize_spaces(line: str) -> str:
    """Replace every whitespace character other than " " (form feed, NBSP, ...) with " "."""
    return _OTHER_SPACE.sub(" ", line)


def _iter_plain(text: str, config: RenderConfig) -> Iterator[_Line]:
    style = _Style(str(resolve_font_path(config.font, config.bold)), config.font_size)
    for para in text.split("\n"):
        para = normalize_spaces(para.expandtabs(config.tab_size))
        for line in iter_wrap(para, style, config.content_width):
            line.advance = config.line_height
            yield line


def _warn_missing(missing: set[str]) -> None:
    if missing:
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in sorted(missing)[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        logger.warning("no installed font can draw %d character(s): %s%s; they are drawn as boxes",
                       len(missing), shown, more)


#: Draw single-font lines word by word from cached word bitmaps (``_draw_words``); False draws
#: every line with one ``ImageDraw.text`` call (the reference the cached path must match).
WORD_CACHE = True


def _word_mask(word: str, style: _Style, phase64: int) -> tuple[Any, int, int, int]:
    """The bitmap FreeType draws for ``word`` starting ``phase64``/64 px into a pixel: (mask,
    x offset, y offset, width), as ``ImageDraw.text`` would blend it at that position."""
    mask, (ox, oy) = load_font(style.font_path, style.size).getmask2(word, "L", anchor="ls",
                                                                      start=(phase64 / 64, 0))
    return mask, ox, oy, mask.size[0]


#: Cached word bitmaps, keyed by (word, style, phase); emptied when full, so memory stays bounded
#: (a few MB at body sizes) whatever the vocabulary.
_WORD_MASKS: dict[tuple[str, _Style, int], tuple[Any, int, int, int]] = {}
#: Words met once on a line drawn whole: cached when met again (most words of a text recur, most
#: distinct words occur once, and rendering a word alone costs more than its share of a line).
_SEEN_WORDS: set[tuple[str, _Style, int]] = set()
_MAX_CACHED_WORDS = 1 << 14


def clear_word_cache() -> None:
    """Forget every cached word bitmap (benchmarks: a fresh process's first render)."""
    _WORD_MASKS.clear()
    _SEEN_WORDS.clear()


@lru_cache(maxsize=1 << 12)
def _kern(left: str, right: str, style: _Style) -> float:
    """Kerning the font applies between two adjacent characters, in px (a multiple of 1/64)."""
    font = load_font(style.font_path, style.size)
    return font.getlength(left + right) - font.getlength(left) - font.getlength(right)


def _draw_words(draw: Any, line: _Line, x0: int, baseline: int, ink: int) -> bool:
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
    for tok in _TOKEN.findall(line.text):
        if prev:
            pen += _kern(prev, tok[0], style)
        if not tok[0].isspace():
            whole = int(pen)  # pen >= 0
            words.append(((tok, style, round((pen - whole) * 64)), whole))
        pen += _token_width(tok, style)
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


def _draw_page(placed: list[tuple[_Line, int]], config: RenderConfig) -> Image.Image:
    img = Image.new("RGB", (config.page_width, config.page_height), config.background)
    draw = ImageDraw.Draw(img)
    ink = draw._getink(config.foreground)[0]  # the ink ImageDraw.text blends with
    for line, baseline in placed:
        if not line.text:
            continue
        x0 = config.margin + line.indent
        runs = _runs(line.text, line.style)
        if WORD_CACHE and len(runs) == 1 and _draw_words(draw.draw, line, x0, baseline, ink):
            continue
        x: float = x0
        for i, (run, path) in enumerate(runs):
            font = load_font(path, line.style.size)
            draw.text((x, baseline), run, font=font, fill=config.foreground, anchor="ls")
            if i + 1 < len(runs):
                x += font.getlength(run)
    return img


def layout(text: str, config: RenderConfig, page_limit: int | None = None) -> list[list[tuple[_Line, int]]]:
    """Lay ``text`` out into pages of positioned lines (no drawing): per page, (line, baseline y).

    page_limit: stop as soon as a line lands on page ``page_limit + 1``; the result then holds
    ``page_limit + 1`` pages (the last one with that single line) and the rest of the text is
    never wrapped, so the cost of an over-long text is bounded by the limit, not by its length.
    """
    if config.reflow:
        text = reflow_text(text, config.tab_size, markdown=config.markdown)
    if config.markdown:
        from .markdown import iter_markdown_lines

        lines = iter_markdown_lines(text, config)
    else:
        lines = _iter_plain(text, config)
    bottom = config.page_height - config.margin
    pages: list[list[tuple[_Line, int]]] = [[]]
    y = config.margin
    missing: set[str] = set()
    for line in lines:
        line.ascent, line.descent = _metrics(line.text, line.style)
        if not line.advance:
            line.advance = line.ascent + line.descent
        if not line.text and config.blank_line_height != 1.0:
            line.advance = max(1, round(line.advance * config.blank_line_height))
        missing |= _missing_chars(line.text, line.style)
        ink = line.ascent + line.descent
        lead = max(0, (line.advance - ink) // 2)
        if pages[-1] and y + lead + ink > bottom:
            pages.append([])
            y = config.margin
        pages[-1].append((line, y + lead + line.ascent))
        y += line.advance
        if page_limit is not None and len(pages) > page_limit:
            break
    _warn_missing(missing)
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
