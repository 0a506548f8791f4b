"""Core renderer: wrapping, pagination, determinism, errors, presets, stats, fonts."""

from __future__ import annotations

import logging

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFont

from deepsynth.render import PRESETS, Page, RenderConfig, join_pages, render_stats, render_text
from deepsynth.render import fonts as F
from deepsynth.render import renderer as R

WORDS = [f"w{i:04d}" for i in range(3000)]
LONG_TEXT = " ".join(WORDS)


def ink_bbox(img: Image.Image, background=(255, 255, 255)):
    """Bounding box of every non-background pixel (None for a blank image)."""
    bg = Image.new("RGB", img.size, background)
    return ImageChops.difference(img, bg).getbbox()


def measure(text: str, config: RenderConfig) -> float:
    font = R.load_font(str(R.resolve_font_path(config.font, config.bold)), config.font_size)
    return font.getlength(text)


@pytest.fixture(scope="module")
def long_pages() -> list[Page]:
    return render_text(LONG_TEXT, RenderConfig.from_preset("small"))


def test_long_document_every_word_on_exactly_one_page_in_order(long_pages):
    assert len(long_pages) > 3
    seen: list[str] = []
    for page in long_pages:
        page_words = page.text.split()
        assert page_words, f"page {page.index} is empty"
        seen.extend(page_words)
    assert seen == WORDS  # each word once, in order, nothing dropped or duplicated
    assert [p.index for p in long_pages] == list(range(len(long_pages)))
    assert all(p.broken_lines == () for p in long_pages)


def test_pages_are_full_except_the_last(long_pages):
    counts = [len(p.text.split("\n")) for p in long_pages]
    assert len(set(counts[:-1])) == 1
    assert counts[-1] <= counts[0]


def test_wrapping_uses_pixel_width_greedily(long_pages):
    config = RenderConfig.from_preset("small")
    lines = [line for p in long_pages for line in p.text.split("\n")]
    for line, nxt in zip(lines, lines[1:]):
        assert measure(line, config) <= config.content_width
        # greedy: the next line's first word would not have fitted
        assert measure(line + " " + nxt.split()[0], config) > config.content_width
    # proportional font: "iiii" lines hold more characters than "WWWW" lines
    narrow = render_text(" ".join(["iiii"] * 400), config)[0].text.split("\n")[0]
    wide = render_text(" ".join(["WWWW"] * 400), config)[0].text.split("\n")[0]
    assert len(narrow) > 2 * len(wide)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_page_images_have_exact_size(preset):
    config = RenderConfig.from_preset(preset, max_pages=1000)
    pages = render_text(" ".join(WORDS[:300]), config)
    for page in pages:
        assert page.image.mode == "RGB"
        assert page.image.size == (config.page_width, config.page_height)


def test_deterministic_pixels():
    config = RenderConfig.from_preset("base")
    a = render_text(LONG_TEXT[:5000], config)
    R.load_font.cache_clear()
    b = render_text(LONG_TEXT[:5000], RenderConfig.from_preset("base"))
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert pa.text == pb.text
        assert pa.image.tobytes() == pb.image.tobytes()


def test_ink_stays_inside_margins_no_clipping():
    # tall accents and deep descenders at the tightest line spacing, over several pages
    config = RenderConfig(page_width=300, page_height=200, margin=10, font_size=24, line_spacing=1.0)
    text = "\n".join(["ÁÉÍ|jgpqy{}ÅÇ"] * 40)
    pages = render_text(text, config)
    assert len(pages) > 1
    for page in pages:
        box = ink_bbox(page.image)
        assert box is not None
        left, top, right, bottom = box
        assert left >= config.margin and top >= config.margin
        assert right <= config.page_width - config.margin
        assert bottom <= config.page_height - config.margin
    # first line starts at the top margin (the accent touches it within a few pixels)
    assert ink_bbox(pages[0].image)[1] - config.margin <= 4


def test_blank_lines_and_paragraphs_kept():
    text = "first paragraph\n\nsecond one\n\n\nthird\n  indented line"
    pages = render_text(text)
    assert len(pages) == 1
    assert pages[0].text == text
    assert join_pages(pages) == text


def test_trailing_whitespace_and_wrap_whitespace_are_reflowed():
    text = "a  b   \n c"
    pages = render_text(text)
    assert pages[0].text == "a  b\n c"
    assert " ".join(join_pages(pages).split()) == " ".join(text.split())


def test_long_word_is_broken_and_rejoined():
    config = RenderConfig.from_preset("small")
    long_word = "".join(chr(ord("a") + i % 26) for i in range(700))
    text = f"start {long_word} end"
    pages = render_text(text, config)
    lines = pages[0].text.split("\n")
    assert lines[0] == "start"
    assert pages[0].broken_lines  # recorded
    for line in lines:
        assert measure(line, config) <= config.content_width
    assert join_pages(pages).split() == text.split()
    assert "".join(lines[1:]).replace(" end", "") == long_word


def test_long_word_broken_across_a_page_boundary():
    config = RenderConfig.from_preset("tiny", max_pages=100)
    word = "X" * 60
    pages = render_text("a " + word + " b", config)
    assert len(pages) > 1
    assert join_pages(pages).split() == ["a", word, "b"]
    # the last line of some page continues on the next page
    assert any(len(p.text.split("\n")) - 1 in p.broken_lines for p in pages[:-1])


def test_tabs_expanded():
    pages = render_text("a\tb\n\tc", RenderConfig(tab_size=4))
    assert pages[0].text == "a   b\n    c"
    pages = render_text("a\tb", RenderConfig(tab_size=8))
    assert pages[0].text == "a       b"
    assert "\t" not in pages[0].text


def test_crlf_normalised():
    assert render_text("a\r\nb\rc")[0].text == "a\nb\nc"


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t \n"])
def test_empty_text_raises(text):
    with pytest.raises(ValueError, match="text is empty"):
        render_text(text)


def test_max_pages_error_names_the_limit():
    config = RenderConfig.from_preset("small", max_pages=2)
    assert len(render_text(LONG_TEXT, RenderConfig.from_preset("small"))) > 2
    with pytest.raises(ValueError, match=r"needs more than 2 pages but max_pages=2"):
        render_text(LONG_TEXT, config)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("page_width", 63, "[64, 4096]"),
        ("page_height", 5000, "[64, 4096]"),
        ("font_size", 5, "[6, 200]"),
        ("font_size", 201, "[6, 200]"),
        ("line_spacing", 0.9, "[1.0, 3.0]"),
        ("line_spacing", 3.5, "[1.0, 3.0]"),
        ("max_pages", 0, ">= 1"),
        ("margin", -1, ">= 0"),
        ("tab_size", 0, ">= 1"),
    ],
)
def test_config_range_errors_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        RenderConfig(**{field: value})
    msg = str(info.value)
    assert f"{field}={value!r}" in msg and allowed in msg


def test_margin_must_leave_room_for_a_line_and_a_character():
    with pytest.raises(ValueError, match=r"margin=503 .*allowed \[0, 500\]"):
        RenderConfig(margin=503)
    RenderConfig(margin=500)
    with pytest.raises(ValueError, match="margin="):
        RenderConfig(page_width=64, page_height=64, font_size=40, margin=10)
    RenderConfig(page_width=64, page_height=64, font_size=20, margin=4)  # fits


def test_unknown_font_and_colour_errors(tmp_path):
    with pytest.raises(ValueError, match="font='Nope'"):
        RenderConfig(font="Nope")
    junk = tmp_path / "junk.ttf"
    junk.write_bytes(b"not a font")
    with pytest.raises(ValueError, match="cannot load"):
        RenderConfig(font=str(junk))
    with pytest.raises(ValueError, match="foreground"):
        RenderConfig(foreground=(0, 0, 300))


def test_presets():
    tiny = RenderConfig.from_preset("tiny")
    assert (tiny.page_width, tiny.page_height, tiny.margin, tiny.font_size, tiny.bold, tiny.line_spacing) == (
        256, 256, 4, 32, True, 2.0)
    expected = {"small": (512, 14), "base": (640, 16), "large": (1024, 20), "gundam": (1280, 24)}
    for name, (side, size) in expected.items():
        c = RenderConfig.from_preset(name)
        assert (c.page_width, c.page_height, c.font_size) == (side, side, size)
    c = RenderConfig.from_preset("base", font_size=12, margin=8)
    assert (c.page_width, c.font_size, c.margin) == (640, 12, 8)
    with pytest.raises(ValueError, match="preset='nope'"):
        RenderConfig.from_preset("nope")
    with pytest.raises(ValueError, match="unknown RenderConfig field"):
        RenderConfig.from_preset("base", colour=1)
    # A model bundle stores the render config, not its name: the preset that draws it is found again
    # (the first name of an alias), and a config no preset draws has none.
    assert RenderConfig.from_preset("reader-large").preset_name() == "reader-large"
    assert RenderConfig.from_preset("small").preset_name() == "ocr-tiny-readable"
    assert RenderConfig.from_preset("tiny", margin=5).preset_name() is None


def test_tiny_preset_puts_each_fact_line_in_one_token_row():
    """The tiny reader sees a 4 x 4 grid of 64 px tokens: every line of a 4-fact page must lie in
    one token row, and the values must end before the last token column."""
    from deepsynth.data.synthetic import KEYS, fact_line

    keys = ["alpha", "bravo", "delta", "oscar"]
    text = "\n".join(fact_line(key, "88", KEYS) for key in keys)
    (page,) = render_text(text, RenderConfig.from_preset("tiny"))
    for row in range(4):
        band = page.image.crop((0, 64 * row, 256, 64 * row + 64))
        left, top, right, bottom = ink_bbox(band)
        assert 0 < top and bottom < 64, f"line {row} touches a token-row boundary: y {top}..{bottom}"
        assert right <= 192, f"line {row} reaches the last token column: x up to {right}"


def test_colours_and_bold():
    config = RenderConfig(background=(10, 20, 30), foreground=(200, 100, 0), page_width=200, page_height=100)
    img = render_text("Hello", config)[0].image
    assert img.getpixel((0, 0)) == (10, 20, 30)
    assert (200, 100, 0) in {c for _, c in img.getcolors(100000)}
    regular = render_text("Hello world", RenderConfig())[0].image
    bold = render_text("Hello world", RenderConfig(bold=True))[0].image

    def dark(im: Image.Image) -> int:
        return sum(im.convert("L").histogram()[:128])

    assert dark(bold) > dark(regular)


def test_font_by_path(tmp_path):
    mono = R.FONT_DIR / "DejaVuSansMono.ttf"
    pages = render_text("iiii WWWW", RenderConfig(font=str(mono)))
    assert pages[0].text == "iiii WWWW"
    font = ImageFont.truetype(str(mono), 20)
    assert font.getlength("iiii") == font.getlength("WWWW")  # really monospace
    # bold=True with a path finds the -Bold sibling
    assert R.resolve_font_path(str(mono), bold=True).name == "DejaVuSansMono-Bold.ttf"


def test_render_stats_with_simple_tokenizer(long_pages):
    def tokenizer(text):
        return {"input_ids": list(range(len(text.split()) * 2))}

    stats = render_stats(LONG_TEXT, long_pages, tokenizer=tokenizer, visual_tokens_per_page=100)
    assert stats["words"] == 3000
    assert stats["characters"] == len(LONG_TEXT)
    assert stats["pages"] == len(long_pages)
    assert stats["words_per_page"] == pytest.approx(3000 / len(long_pages))
    assert stats["text_tokens"] == 6000
    assert stats["visual_tokens"] == 100 * len(long_pages)
    assert stats["compression_ratio"] == pytest.approx(6000 / (100 * len(long_pages)))
    plain = render_stats(LONG_TEXT, long_pages)
    assert plain["text_tokens"] is None and plain["compression_ratio"] is None
    assert plain["visual_tokens"] == 256 * len(long_pages)


# ---------------------------------------------------------------- glyph coverage / fallback


def drawn_glyph(font, ch: str) -> bytes:
    """The pixels of `ch` drawn alone in `font`."""
    img = Image.new("L", (40, 40))
    ImageDraw.Draw(img).text((5, 5), ch, font=font, fill=255)
    return img.tobytes()


def test_cmap_coverage_matches_notdef_rendering():
    path = str(R.FONT_DIR / "DejaVuSans.ttf")
    cps = R.font_codepoints(path)
    assert {ord(c) for c in "AZaz09é€•"} <= cps
    assert 0x4E2D not in cps  # CJK: not in DejaVu
    font = ImageFont.truetype(path, 20)
    notdef = drawn_glyph(font, "\U0010FFFD")
    assert drawn_glyph(font, "\u4e2d") == notdef  # not in the cmap -> drawn as .notdef
    assert drawn_glyph(font, "A") != notdef and drawn_glyph(font, "\u2022") != notdef


def test_cmap_of_each_shipped_face_matches_its_drawn_glyphs():
    for name in ("DejaVuSans.ttf", "DejaVuSansMono-Bold.ttf"):
        path = str(R.FONT_DIR / name)
        cps = R.font_codepoints(path)
        font = ImageFont.truetype(path, 20)
        notdef = drawn_glyph(font, "\U0010FFFD")
        assert {0x41, 0xE9, 0x2022} <= cps and all(drawn_glyph(font, chr(c)) != notdef for c in (0x41, 0xE9, 0x2022))
        assert 0x4E2D not in cps and drawn_glyph(font, "\u4e2d") == notdef


def test_an_unreadable_font_file_is_assumed_to_cover_everything(tmp_path, caplog):
    bad = tmp_path / "broken.ttf"
    bad.write_bytes(b"not a font at all")
    with caplog.at_level(logging.WARNING, logger="deepsynth.render"):
        assert R.font_codepoints(str(bad)) == frozenset()
    assert any("could not read the cmap" in r.getMessage() and "broken.ttf" in r.getMessage() for r in caplog.records)
    # no fallback is tried for such a font: every character stays in it
    assert F.runs("a\u4e2d", F.Style(str(bad), 20)) == [("a\u4e2d", str(bad))]


def test_missing_characters_are_warned(monkeypatch, caplog):
    monkeypatch.setattr(F, "fallback_font_paths", lambda: ())
    with caplog.at_level(logging.WARNING, logger="deepsynth.render"):
        pages = render_text("Hello 中文 world")
    assert pages[0].text == "Hello 中文 world"  # kept in the text, drawn as boxes
    assert any("U+4E2D" in r.getMessage() and "U+6587" in r.getMessage() for r in caplog.records)


def test_fallback_font_draws_missing_characters(monkeypatch, caplog):
    char = "\u01c4"  # in DejaVuSans, not in DejaVuSansMono
    mono = str(R.FONT_DIR / "DejaVuSansMono.ttf")
    assert ord(char) not in R.font_codepoints(mono)
    config = RenderConfig(font="DejaVuSansMono", page_width=200, page_height=100)
    monkeypatch.setattr(F, "fallback_font_paths", lambda: ())
    with caplog.at_level(logging.WARNING, logger="deepsynth.render"):
        boxed = render_text(f"a{char}b", config)[0].image
    assert any("U+01C4" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(F, "fallback_font_paths", lambda: (str(R.FONT_DIR / "DejaVuSans.ttf"),))
    with caplog.at_level(logging.WARNING, logger="deepsynth.render"):
        drawn = render_text(f"a{char}b", config)[0].image
    assert not caplog.records
    assert boxed.tobytes() != drawn.tobytes()
    style = F.Style(mono, 20)
    assert [p for _, p in F.runs(f"a{char}b", style)] == [mono, str(R.FONT_DIR / "DejaVuSans.ttf"), mono]


def test_final_newlines_are_not_blank_lines_but_leading_ones_are():
    assert render_text("hello\n")[0].text == "hello"
    assert render_text("hello\n\n\n  \n")[0].text == "hello"
    assert render_text("\n\nhello")[0].text == "\n\nhello"
