"""Markdown layout: headings, lists, fenced code, inline markers."""

from __future__ import annotations

from PIL import Image, ImageChops

from deepsynth.render import RenderConfig, join_pages, render_text
from deepsynth.render.markdown import BULLET, strip_inline

MD = RenderConfig.from_preset("base", markdown=True)


def row_ink(img: Image.Image) -> list[int]:
    """Number of dark pixels per row."""
    gray = img.convert("L").point(lambda v: 255 if v < 128 else 0)
    w, h = gray.size
    data = gray.tobytes()
    return [data[y * w:(y + 1) * w].count(255) for y in range(h)]


def ink_runs(img: Image.Image) -> list[tuple[int, int]]:
    """Vertical extents (top, bottom) of the text lines on a page."""
    runs, start = [], None
    for y, n in enumerate(row_ink(img)):
        if n and start is None:
            start = y
        elif not n and start is not None:
            runs.append((start, y))
            start = None
    return runs


def left_edge(img: Image.Image, top: int, bottom: int) -> int:
    box = ImageChops.invert(img.convert("L").crop((0, top, img.width, bottom))).getbbox()
    return box[0]


def test_headings_are_bold_larger_and_markers_stripped():
    pages = render_text("# Heading\nHeading\n### Heading ###\n####### not a heading", MD)
    assert pages[0].text.split("\n") == ["Heading", "Heading", "Heading", "####### not a heading"]
    runs = ink_runs(pages[0].image)
    h1, body, h3 = (b - t for t, b in runs[:3])
    assert h1 > h3 > body
    ink = row_ink(pages[0].image)
    assert sum(ink[runs[0][0]:runs[0][1]]) > 1.5 * sum(ink[runs[1][0]:runs[1][1]])  # bold + larger


def test_fenced_code_uses_monospace_and_keeps_spaces():
    text = "llllllll\n```python\nllllllll\nWWWWWWWW\n  x  =  1\n```\nafter"
    pages = render_text(text, MD)
    assert pages[0].text.split("\n") == ["llllllll", "llllllll", "WWWWWWWW", "  x  =  1", "after"]
    img = pages[0].image
    runs = ink_runs(img)

    def width(run):
        box = ImageChops.invert(img.convert("L").crop((0, run[0], img.width, run[1]))).getbbox()
        return box[2] - box[0]

    body_l, code_l, code_w = runs[0], runs[1], runs[2]
    advance = MD.font_size * 0.6  # DejaVu Sans Mono advance is 0.6 em
    assert abs(width(code_l) - width(code_w)) <= advance  # monospace: same advance for l and W
    assert width(code_l) > 2 * width(body_l)


def test_unclosed_fence_runs_to_the_end():
    pages = render_text("```\ncode line\nmore", MD)
    assert pages[0].text == "code line\nmore"


def test_lists_have_bullets_numbers_and_hanging_indent():
    item = "word " * 60
    text = f"- {item}\n* second\n  - nested\n1. one\n2) two"
    pages = render_text(text, MD)
    lines = pages[0].text.split("\n")
    assert lines[0].startswith(f"{BULLET} word")
    assert not lines[1].startswith(BULLET)  # continuation of the long first item
    assert f"{BULLET} second" in lines and f"{BULLET} nested" in lines
    assert "1. one" in lines and "2) two" in lines
    img = pages[0].image
    runs = ink_runs(img)
    first, cont = runs[0], runs[1]
    assert left_edge(img, *cont) > left_edge(img, *first) + 5  # hanging indent
    nested = runs[lines.index(f"{BULLET} nested")]
    second = runs[lines.index(f"{BULLET} second")]
    assert left_edge(img, *nested) > left_edge(img, *second)


def test_inline_markers_stripped():
    assert strip_inline("a **bold** and __b__ and *em* and `co*de*` ~~s~~") == "a bold and b and em and co*de* s"
    assert strip_inline("2 * 3 * 4 and snake_case_name") == "2 * 3 * 4 and snake_case_name"
    pages = render_text("Some **bold** text", MD)
    assert pages[0].text == "Some bold text"


def test_quote_and_blank_lines():
    pages = render_text("para\n\n> quoted **x**\n\nend", MD)
    assert pages[0].text == "para\n\nquoted x\n\nend"


def test_markdown_words_round_trip_over_pages():
    sections = []
    for s in range(30):
        words = " ".join(f"s{s:02d}w{i:02d}" for i in range(40))
        sections.append(f"## Section {s}\n{words}\n- item {s} {words}\n```\ncode{s}  {s}\n```\n")
    text = "\n".join(sections)
    pages = render_text(text, RenderConfig.from_preset("small", markdown=True))
    assert len(pages) > 3
    expected = (text.replace("## ", "").replace("- item", f"{BULLET} item").replace("```\n", "")).split()
    assert join_pages(pages).split() == expected


def test_markdown_is_deterministic():
    text = "# T\n- a\n```\nx\n```\n" * 20
    a = render_text(text, MD)
    b = render_text(text, MD)
    assert [p.image.tobytes() for p in a] == [p.image.tobytes() for p in b]


def test_huge_heading_on_tiny_page_still_fits():
    config = RenderConfig.from_preset("tiny", markdown=True)
    pages = render_text("# A big heading\nbody", config)
    for page in pages:
        box = ImageChops.invert(page.image.convert("L")).getbbox()
        assert box[1] >= config.margin and box[3] <= config.page_height - config.margin
