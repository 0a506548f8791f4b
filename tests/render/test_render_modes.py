"""Presets matched to DeepSeek-OCR's modes: page sizes, vision tokens, text tokens, the ratio."""

from __future__ import annotations

import pytest

from deepsynth.render import MODES, PRESET_MODES, PRESETS, RenderConfig, render_stats, render_text, vision_tokens
from deepsynth.render.modes import count_pretokens, default_token_counter, gundam_tiles, mode_for_page

PAPER = {"tiny": (512, 64), "small": (640, 100), "base": (1024, 256), "large": (1280, 400)}


def test_every_mode_has_a_readable_and_a_dense_preset_at_its_resolution():
    for mode in MODES:
        readable, dense = (RenderConfig.from_preset(f"ocr-{mode}-{d}") for d in ("readable", "dense"))
        assert PRESET_MODES[f"ocr-{mode}-readable"] == PRESET_MODES[f"ocr-{mode}-dense"] == mode
        side = PAPER.get(mode, (1280, None))[0]
        assert (readable.page_width, readable.page_height) == (dense.page_width, dense.page_height) == (side, side)
        assert dense.font_size < readable.font_size and dense.reflow and not readable.reflow
    assert set(PRESET_MODES) <= set(PRESETS)


def test_vision_tokens_of_each_mode():
    for mode, (side, tokens) in PAPER.items():
        assert vision_tokens(mode, side, side) == tokens
        assert mode_for_page(side, side).name == mode
    # Gundam: a 1024 px global view (256) plus 640 px tiles of 100 tokens, 2 x 2 for a 1280 px page
    assert gundam_tiles(1280, 1280) == 4 and vision_tokens("gundam", 1280, 1280) == 256 + 400
    assert gundam_tiles(640, 640) == 0 and gundam_tiles(1280, 2560) == 2  # a 1 x 2 page: 2 tiles
    assert gundam_tiles(1280, 1920) == 6  # 2 x 3 for a 2:3 page
    with pytest.raises(ValueError, match="mode='huge' is unknown"):
        vision_tokens("huge", 1024, 1024)


@pytest.mark.parametrize("preset", sorted(PRESET_MODES))
def test_stats_of_each_preset(preset):
    text = " ".join(f"token{i % 97}, word." for i in range(400))
    config = RenderConfig.from_preset(preset, max_pages=200)
    pages = render_text(text, config)
    counter = ("two per word", lambda t: 2 * len(t.split()))
    stats = render_stats(text, pages, tokenizer=counter, config=config, mode=PRESET_MODES[preset])
    mode = PRESET_MODES[preset]
    per_page = vision_tokens(mode, config.page_width, config.page_height)
    assert stats["mode"] == mode and stats["visual_tokens_per_page"] == per_page
    assert stats["visual_tokens"] == per_page * len(pages)
    assert stats["text_tokens"] == 2 * len(text.split()) and stats["tokenizer"] == "two per word"
    assert stats["compression_ratio"] == pytest.approx(stats["text_tokens"] / (per_page * len(pages)))


def test_dense_presets_hold_more_text_per_vision_token_than_readable_ones():
    text = "\n".join(f"Line {i} of a hard wrapped licence text that breaks at" for i in range(600))
    ratio = {}
    for density in ("readable", "dense"):
        config = RenderConfig.from_preset(f"ocr-base-{density}", max_pages=200)
        ratio[density] = render_stats(text, render_text(text, config), tokenizer=("pre", count_pretokens),
                                      config=config, mode="base")["compression_ratio"]
    assert ratio["dense"] > 3 * ratio["readable"]


def test_default_counter_is_a_real_tokenizer_or_the_documented_rule():
    name, count = default_token_counter()
    n = count("Tokenization of unbelievably long words, e.g. antidisestablishmentarianism.")
    if name.startswith("bert-wordpiece"):
        assert n > count_pretokens("Tokenization of unbelievably long words, e.g. antidisestablishmentarianism.")
        assert count("word " * 600) == 600  # no truncation at the model's window
    else:
        assert name == "bert-pretokens" and n == 11


def test_stats_without_config_assume_the_base_mode_and_infer_it_from_the_page():
    pages = render_text("hello world", RenderConfig.from_preset("small"))  # 512 px
    assert render_stats("hello world", pages)["visual_tokens_per_page"] == 256
    assert render_stats("hello world", pages, config=RenderConfig.from_preset("small"))["mode"] == "tiny"
