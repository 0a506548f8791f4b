"""Cost budget of the renderer: linear in a word's length, stops at the page limit, same pixels.

Work is counted (characters handed to the measuring function, lines placed on pages), never timed.
"""

from __future__ import annotations

import hashlib

import PIL
import PIL.features
import pytest

from deepsynth.render import RenderConfig, render_text
from deepsynth.render import renderer as R
from deepsynth.render import wrap as W
from deepsynth.render.renderer import layout


@pytest.fixture()
def measured(monkeypatch):
    """Every string the renderer measures (the expensive step of wrapping)."""
    seen: list[str] = []
    original = W.measure

    def spy(text, style):
        seen.append(text)
        return original(text, style)

    monkeypatch.setattr(W, "measure", spy)
    return seen


@pytest.fixture()
def placed(monkeypatch):
    """Texts of the lines the layout placed on pages (it takes each line's metrics once)."""
    lines: list[str] = []
    original = R.line_metrics

    def spy(text, style):
        lines.append(text)
        return original(text, style)

    monkeypatch.setattr(R, "line_metrics", spy)
    return lines


@pytest.mark.parametrize("n", [4_000, 16_000])
def test_breaking_a_long_word_measures_a_linear_number_of_characters(n, measured):
    pages = render_text("a" * n, RenderConfig.from_preset("base", max_pages=1000))
    assert "".join(p.text.replace("\n", "") for p in pages) == "a" * n
    # each character is measured a bounded number of times (about 8 at this line length); the old
    # wrap re-measured the rest of the word for every line: about n^2 / (2 * line length) characters
    assert sum(map(len, measured)) <= 20 * n
    # the whole word once (it is wider than a line), otherwise only prefixes near a line's length
    assert sum(len(t) > 200 for t in measured) == 1


def test_cost_per_character_does_not_grow_with_the_word(measured):
    config = RenderConfig.from_preset("small", max_pages=1000)
    render_text("b" * 3_000, config)
    short = sum(map(len, measured))
    measured.clear()
    render_text("b" * 12_000, config)
    assert sum(map(len, measured)) <= 4.5 * short  # 4x the word, ~4x the work (16x if quadratic)


def test_layout_stops_at_the_first_line_past_the_page_limit(placed, measured):
    config = RenderConfig.from_preset("tiny", max_pages=2)
    per_page = len(render_text("x\ny\nz\nw\nv\nu", RenderConfig.from_preset("tiny"))[0].text.split("\n"))
    placed.clear()
    text = "\n".join(f"line {i}" for i in range(5_000)) + "\n" + "Z" * 50_000
    with pytest.raises(ValueError, match=r"needs more than 2 pages but max_pages=2"):
        render_text(text, config)
    assert len(placed) == 2 * per_page + 1  # two full pages and the line that opened page 3
    assert not any("Z" in t for t in measured)  # the rest of the text was never wrapped


def test_a_single_huge_word_stops_at_the_page_limit(placed, measured):
    first = render_text("q" * 1_000, RenderConfig.from_preset("tiny", max_pages=100))[0].text.split("\n")
    per_page, per_line = len(first), len(first[0])
    placed.clear()
    measured.clear()
    with pytest.raises(ValueError, match="max_pages=16"):
        render_text("q" * 100_000, RenderConfig.from_preset("tiny", max_pages=16))
    assert len(placed) == 16 * per_page + 1
    # the whole word is measured once (to learn it is wider than a line), then only prefixes of
    # about a line for the lines laid out: nothing of the other ~99,000 characters
    prefixes = [t for t in measured if len(t) < 100_000]
    assert sum(map(len, prefixes)) <= 20 * per_line * len(placed)


def test_markdown_layout_stops_at_the_page_limit(placed, measured):
    config = RenderConfig.from_preset("small", markdown=True, max_pages=1)
    text = "# Title\n\n" + "\n".join(f"- item {i}" for i in range(3_000)) + "\n```\n" + "Z" * 20_000 + "\n```"
    with pytest.raises(ValueError, match="max_pages=1"):
        render_text(text, config)
    assert len(placed) < 60  # one page of lines (and the one that opened page 2), not 3,000
    assert not any("Z" in t for t in measured)


def test_layout_without_a_limit_counts_every_page():
    config = RenderConfig.from_preset("tiny", max_pages=1)
    text = "\n".join(f"l{i}" for i in range(20))
    full = layout(text, config)
    assert len(full) == 5  # 4 lines a page on the tiny preset
    assert len(layout(text, config, page_limit=2)) == 3


# --------------------------------------------------------------------------- same pixels as before

# Digests of (pixels, text, broken lines) of every page, computed with the renderer as it was before
# the cost budget (re-measuring the rest of a long word per line, laying out everything before the
# page check). Pixels depend on the FreeType build, so they are compared only on the one they were
# computed with.
GOLDEN_PILLOW, GOLDEN_FREETYPE = "13.0.0", "2.14.3"
PROSE = ("The quarterly report shows revenue of $4.2M, up 12% (AVAVA To Ty Wa). "
         "Operating costs fell; margins improved.  Two  spaces  kept.\n") * 6
GOLDEN = {
    "prose-base": (PROSE, dict(preset="base"), 1, "8e0f16691114e5af"),
    "long-word-small": ("x" + "abcdefghij" * 300 + " tail words", dict(preset="small"), 3, "7c305f2adbe84880"),
    "indent-tabs-tiny": ("alpha: 12\n\tbravo: 34\n\n    delta:   56\necho: 78", dict(preset="tiny"), 2,
                         "ed181eec5b59bb96"),
    "indent-too-wide": (" " * 200 + "word " + "W" * 400, dict(preset="small"), 1, "f964af72069fcb71"),
    "multipage-small": (" ".join(f"w{i:04d}" for i in range(1500)), dict(preset="small"), 8, "aaeeaae5b48e0e09"),
    "markdown": ("# Title here\n\n## Sub *em* **bold**\n\n- item one " + "long " * 40 + "\n  - nested " + "Q" * 300
                 + "\n1. first\n> quoted " + "text " * 30 + "\n\n```\ncode   line\n\tindented " + "c" * 200
                 + "\n```\n### small heading\nplain `code` ~~strike~~", dict(preset="base", markdown=True), 2,
                 "538343200095e068"),
    "mono-long-word-tiny": ("k" * 500, dict(preset="tiny", max_pages=20), 10, "32734731a95b5f11"),
    "latin1-large": ("Ünïcödé façade — naïve “quotes” … ß€ " * 40, dict(preset="large"), 1, "2d90a47b117f474d"),
}


def _digest(pages) -> str:
    h = hashlib.sha256()
    for p in pages:
        h.update(p.image.tobytes())
        h.update(p.text.encode())
        h.update(repr(p.broken_lines).encode())
    return h.hexdigest()[:16]


@pytest.mark.skipif((PIL.__version__, PIL.features.version("freetype2")) != (GOLDEN_PILLOW, GOLDEN_FREETYPE),
                    reason="golden digests were computed with Pillow 13.0.0 / FreeType 2.14.3")
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_pages_are_pixel_identical_to_the_previous_renderer(name):
    text, kw, n_pages, digest = GOLDEN[name]
    kw = dict(kw)
    pages = render_text(text, RenderConfig.from_preset(kw.pop("preset"), **kw))
    assert (len(pages), _digest(pages)) == (n_pages, digest)
