"""Property test: random text keeps every word, in order, across pages."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsynth.render import RenderConfig, join_pages, render_text

# small pages so that random text spans several pages and long words get broken
CONFIG = RenderConfig(page_width=160, page_height=120, margin=6, font_size=12, max_pages=10_000)

word = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S"),
                                      exclude_characters="\u2028\u2029"), min_size=1, max_size=40)
sep = st.sampled_from([" ", "  ", "\t", "\n", "\n\n", " \n "])
document = st.lists(st.tuples(word, sep), min_size=1, max_size=120).map(
    lambda pairs: "".join(w + s for w, s in pairs))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document)
def test_random_text_round_trips_words(text):
    pages = render_text(text, CONFIG)
    assert join_pages(pages).split() == text.split()
    assert [p.index for p in pages] == list(range(len(pages)))
    for page in pages:
        assert page.image.size == (CONFIG.page_width, CONFIG.page_height)
        n_lines = len(page.text.split("\n"))
        assert all(0 <= i < n_lines for i in page.broken_lines)
    # words that were not broken appear on exactly one page
    broken_anywhere = any(p.broken_lines for p in pages)
    if not broken_anywhere:
        assert [w for p in pages for w in p.text.split()] == text.split()
