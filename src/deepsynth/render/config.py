"""What a page looks like: ``RenderConfig`` (page size, margins, font, spacing, options) and the
named presets, among them those matched to DeepSeek-OCR's modes (``deepsynth.render.modes``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .fonts import MONO_FONT, load_font, resolve_font_path

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
    # 256 px page; the 16 px line pitch is half a row of the reader's 32 px image-token grid.
    "reader": dict(page_width=256, page_height=256, margin=8, font=MONO_FONT, font_size=13, bold=True,
                   line_spacing=1.25),
    # The same page in twice the type: 7 lines of 15 characters, a 32 px line pitch (one row of
    # image tokens per line) and a 15.7 px advance (two characters per 32 px token).
    "reader-large": dict(page_width=256, page_height=256, margin=8, font=MONO_FONT, font_size=26, bold=True,
                         line_spacing=1.231),
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
    if name == "reader-large":
        return "reader-large: the page reader's 256 px page in 26 px type, 7 lines of 15 characters (tiny-page models)"
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

    def preset_name(self) -> str | None:
        """The preset that draws exactly these pages (the first of its aliases), or None."""
        return next((name for name, fields in PRESETS.items() if RenderConfig(**fields) == self), None)

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
