"""Reflow: paragraphs joined, every word kept in order, structure (lists, code, tables) kept."""

from __future__ import annotations

from dataclasses import asdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsynth.render import RenderConfig, join_pages, reflow_text, render_text

WRAPPED = """Permission is hereby granted, free of charge, to any person obtaining a
copy of this software, to deal in the Software without restriction,
including without limitation the rights to use.

  The licenses for most software are designed to take away your
freedom to share and change the works."""


def test_single_line_breaks_inside_a_paragraph_become_spaces():
    out = reflow_text(WRAPPED).split("\n")
    assert out == [
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software, to deal "
        "in the Software without restriction, including without limitation the rights to use.",
        "",
        "  The licenses for most software are designed to take away your freedom to share and change the works.",
    ]


def test_lists_headings_quotes_and_rules_keep_their_lines():
    text = ("# Title\nIntro line one\nintro line two\n\n- item one wraps\n  onto a second line\n- item two\n"
            "1. numbered\n2) other\n  a) lettered item\n  (iv) roman item\n> quoted\n> more\n---\nafter rule")
    assert reflow_text(text).split("\n") == [
        "# Title", "Intro line one intro line two", "", "- item one wraps onto a second line", "- item two",
        "1. numbered", "2) other", "  a) lettered item", "  (iv) roman item", "> quoted", "> more", "---",
        "after rule"]


def test_code_blocks_and_tables_are_kept_verbatim():
    fenced = "Text before\n```\nx = 1\ny = 2\n\nz = 3\n```\nText after\njoined"
    assert reflow_text(fenced).split("\n") == ["Text before", "```", "x = 1", "y = 2", "", "z = 3", "```",
                                              "Text after joined"]
    indented = "Usage:\n    deepsynth render FILE\n    deepsynth ask\nOptions:\nmore"
    assert reflow_text(indented).split("\n") == ["Usage:", "    deepsynth render FILE", "    deepsynth ask",
                                                 "Options: more"]
    table = "| a | b |\n|---|---|\n| 1 | 2 |\nx | y | z\n+---+---+\nprose\nwrapped"
    assert reflow_text(table).split("\n") == ["| a | b |", "|---|---|", "| 1 | 2 |", "x | y | z", "+---+---+",
                                              "prose wrapped"]


def test_centred_titles_stay_and_a_first_line_indent_is_a_paragraph():
    text = "                     GNU GENERAL PUBLIC LICENSE\n                       Version 3\n\n" \
           "    Indented first line\nof a paragraph"
    assert reflow_text(text).split("\n") == ["                     GNU GENERAL PUBLIC LICENSE",
                                             "                       Version 3", "",
                                             "    Indented first line of a paragraph"]


def test_markdown_hard_breaks_are_kept_only_in_markdown():
    text = "line with hard break  \nnext\nback\\\nslash"
    assert reflow_text(text, markdown=True).split("\n") == ["line with hard break  ", "next back\\", "slash"]
    assert reflow_text(text) == "line with hard break next back\\ slash"


line = st.text(alphabet=st.sampled_from(list("ab1.-*#>|` \t()")), max_size=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, max_size=40))
def test_reflow_keeps_every_word_in_order_and_only_changes_line_breaks(lines):
    text = "\n".join(lines)
    out = reflow_text(text)
    assert out.split() == text.split()
    assert out.count("\n") <= text.count("\n")
    assert reflow_text(out) == out  # reflowing twice changes nothing more


def test_render_with_reflow_fills_lines_and_keeps_words():
    text = ("word " * 4 + "\n") * 60
    plain = render_text(text, RenderConfig.from_preset("base"))
    flowed = render_text(text, RenderConfig.from_preset("base", reflow=True))
    assert join_pages(flowed).split() == text.split()
    assert sum(len(p.text.split("\n")) for p in flowed) < sum(len(p.text.split("\n")) for p in plain) / 2
    md = render_text("- a\n  b\n- c", RenderConfig.from_preset("base", reflow=True, markdown=True))
    assert md[0].text.split("\n") == ["\u2022 a b", "\u2022 c"]


def test_reflow_travels_in_the_model_bundle_and_old_bundles_load():
    from deepsynth.models.bundle import ModelSpec

    spec = ModelSpec(backend="generic", render=asdict(RenderConfig.from_preset("ocr-base-dense")))
    again = ModelSpec.from_dict(spec.to_dict())
    assert again.render_config().reflow is True
    assert again.render_config() == RenderConfig.from_preset("ocr-base-dense")
    old = asdict(RenderConfig())
    del old["reflow"]  # a bundle written before the field existed
    assert ModelSpec.from_dict({"backend": "generic", "render": old}).render_config().reflow is False


def test_indented_list_items_take_their_continuation_lines():
    text = ("    a) Convey the object code in, or embodied in, a physical product\n"
            "    (including a physical distribution medium), accompanied by the\n"
            "    Corresponding Source.\n"
            "        code under the item\n"
            "    b) Next item")
    assert reflow_text(text).split("\n") == [
        "    a) Convey the object code in, or embodied in, a physical product (including a physical distribution "
        "medium), accompanied by the Corresponding Source.",
        "        code under the item", "    b) Next item"]


def test_the_generic_converter_of_plain_text_corpora_can_opt_in():
    from deepsynth.data.converters import check_options, convert_generic

    rows = [{"text": WRAPPED, "target": "a licence"}]
    kept, flowed = (convert_generic(rows, text_field="text", target_field="target", reflow=r) for r in (False, True))
    assert kept[0].text == WRAPPED
    assert flowed[0].text == reflow_text(WRAPPED) and flowed[0].text.count("\n") == 2
    check_options("generic", {"text_field": "text", "target_field": "target", "reflow": True})  # pipeline option
