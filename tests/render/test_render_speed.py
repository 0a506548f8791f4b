"""The word-bitmap cache draws exactly the pixels of per-line drawing (ImageDraw.text per line).

Pages are compared byte for byte with the cache on and off, on texts chosen to stress what the
cache depends on: kerned pairs (fractional pen positions), punctuation, indentation, every preset
(font sizes 9 to 32, bold, mono), Markdown (mixed sizes), reflow, broken long words and characters
drawn with a fallback font. Work is counted, never timed.
"""

from __future__ import annotations

import random

import pytest

from deepsynth.render import PRESETS, RenderConfig, render_text
from deepsynth.render import renderer as R

KERNED = "AVAVA To Ty Wa Yo LT P. T, V. F. \"Quote\" 'single' r. y, f(x) AT&T Av Aw Ay"


def _text(seed: int, n_words: int = 600) -> str:
    rng = random.Random(seed)
    vocab = KERNED.split() + ["the", "licence", "Software", "WAVE", "jiffy", "ff", "fi", "(c)", "—", "…",
                               "naïve", "façade", "$4.2M", "12%", "x" * 70, "Übergröße"]
    lines, words = [], []
    for _ in range(n_words):
        words.append(rng.choice(vocab))
        if rng.random() < 0.08:
            lines.append(" " * rng.choice([0, 0, 1, 2, 4, 8]) + "  ".join(words) if rng.random() < 0.2
                         else " ".join(words))
            words = []
            if rng.random() < 0.3:
                lines.append("")
    lines.append(" ".join(words))
    return "\n".join(lines)


def _pages(text, config, cached):
    old = R.WORD_CACHE
    R.WORD_CACHE = cached
    R.clear_word_cache()
    try:
        return [(p.image.tobytes(), p.text) for p in render_text(text, config)]
    finally:
        R.WORD_CACHE = old


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cached_words_draw_the_same_pixels_as_whole_lines(preset):
    config = RenderConfig.from_preset(preset, max_pages=200)
    text = _text(sum(map(ord, preset)))
    assert _pages(text, config, cached=True) == _pages(text, config, cached=False)


@pytest.mark.parametrize("kw", [dict(font_size=7, margin=4, line_spacing=1.0), dict(font_size=11, bold=True),
                                dict(font="DejaVuSansMono", font_size=13), dict(markdown=True), dict(reflow=True),
                                dict(foreground=(200, 30, 40), background=(10, 10, 60))])
def test_same_pixels_for_other_fonts_colours_and_layouts(kw):
    config = RenderConfig(page_width=700, page_height=500, max_pages=200, **kw)
    text = "# Heading To Ty\n\n- item AVAVA " + _text(7, 300) + "\n```\ncode\tTo  Ty\n```\n> quote Wa Yo"
    assert _pages(text, config, cached=True) == _pages(text, config, cached=False)


def test_fallback_font_lines_are_drawn_per_run_and_stay_identical():
    text = "Latin then 漢字 and ∑ math → arrows To Ty\n" * 5
    config = RenderConfig.from_preset("base")
    assert _pages(text, config, cached=True) == _pages(text, config, cached=False)


def test_repeated_words_are_rendered_once_and_new_lines_drawn_whole(monkeypatch):
    rendered: list[str] = []
    whole_lines: list[str] = []
    original_mask, original_draw = R._word_mask, R._draw_words

    def spy_mask(word, style, phase64):
        rendered.append(word)
        return original_mask(word, style, phase64)

    def spy_draw(draw, line, x0, baseline, ink):
        drawn = original_draw(draw, line, x0, baseline, ink)
        if not drawn:
            whole_lines.append(line.text)
        return drawn

    monkeypatch.setattr(R, "_word_mask", spy_mask)
    monkeypatch.setattr(R, "_draw_words", spy_draw)
    R.clear_word_cache()
    distinct = " ".join(f"w{i}" for i in range(60))
    render_text(distinct + "\n" + ("alpha beta gamma " * 400).strip(), RenderConfig.from_preset("large"))
    # three words at a few sub-pixel phases, not one rendering per drawn word (1,200); lines of new
    # words (seen once) are drawn whole, and none of them is rendered alone
    assert set(rendered) == {"alpha", "beta", "gamma"} and len(rendered) <= 3 * 64
    assert whole_lines and all(set(t.split()) <= set(distinct.split()) for t in whole_lines)


def test_a_full_cache_is_emptied_and_refilled_without_changing_pixels(monkeypatch):
    monkeypatch.setattr(R, "_MAX_CACHED_WORDS", 12)  # far fewer than the words of a page
    config = RenderConfig.from_preset("base", max_pages=200)
    text = _text(3)
    assert _pages(text, config, cached=True) == _pages(text, config, cached=False)
    assert len(R._WORD_MASKS) <= 12 and len(R._SEEN_WORDS) <= 12
