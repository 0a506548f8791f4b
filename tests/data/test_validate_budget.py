"""`validate` counts pages with a layout that stops at the page limit and wraps a long word in
linear work: the work is counted (characters measured, lines placed), never timed."""

from __future__ import annotations

import json

import pytest

from deepsynth.data import pipeline as P
from deepsynth.render import RenderConfig
from deepsynth.render import renderer as R
from deepsynth.render import wrap as W


@pytest.fixture()
def measured(monkeypatch):
    seen: list[str] = []
    original = W.measure
    monkeypatch.setattr(W, "measure", lambda text, style: seen.append(text) or original(text, style))
    return seen


@pytest.fixture()
def placed(monkeypatch):
    """Lines the layout placed on pages (it takes each placed line's metrics once)."""
    lines: list[str] = []
    original = R.line_metrics
    monkeypatch.setattr(R, "line_metrics", lambda text, style: lines.append(text) or original(text, style))
    return lines


def _one_record(tmp_path, text: str):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"id": "r", "text": text, "instruction": "?", "answer": "a"}) + "\n", encoding="utf-8")
    return path


def test_validate_of_a_40k_character_word_measures_linear_work(tmp_path, measured):
    n = 40_000
    report = P.validate_path(_one_record(tmp_path, "x" * n), preset="base")
    assert report["ok"] and report["pages_per_document"]["max"] >= 2
    # each character measured a bounded number of times; the old wrap measured ~n^2 / (2 * line length)
    assert sum(map(len, measured)) <= 20 * n


def test_validate_stops_laying_out_at_the_page_limit(tmp_path, placed):
    cfg = RenderConfig.from_preset("tiny")
    text = " ".join(f"w{i}" for i in range(6_000))  # far more than max_pages tiny pages
    report = P.validate_path(_one_record(tmp_path, text), preset="tiny")
    pages = report["pages_per_document"]
    assert pages["over_max_pages"] == 1 and pages["max"] == cfg.max_pages + 1
    in_validate = len(placed)
    placed.clear()
    per_page = len(R.layout(text, cfg, page_limit=1)[0])  # lines on one full page
    full = len([line for page in R.layout(text, cfg) for line in page])
    assert in_validate <= cfg.max_pages * per_page + 1  # the limit's pages and one line more...
    assert in_validate * 10 < full  # ...not the whole text
    assert "need more pages than max_pages" in P.format_report(report)
