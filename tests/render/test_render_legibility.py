"""Legibility check: word recall of pages read back by an OCR (real one skipped without the extra)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deepsynth.render import RenderConfig, render_text
from deepsynth.render.legibility import check_pages, ocr_unavailable, word_recall

OCR_MISSING = ocr_unavailable()


def test_word_recall_counts_each_read_word_once_and_ignores_edge_punctuation():
    r = word_recall("The licence, the “Software” and the licence.", "the licence \"Software\" The and")
    assert (r["words"], r["found"]) == (7, 5)
    assert r["missed"] == ["the", "licence"]
    assert word_recall("— …", "")["recall"] == 1.0  # punctuation only: nothing to read
    assert word_recall("two words", "twowords")["recall"] == 0.0  # run together: missed


def test_check_pages_scores_every_page_with_an_injected_reader():
    pages = render_text("alpha beta gamma\n" * 40, RenderConfig.from_preset("tiny", max_pages=200))
    report = check_pages(pages, reader=lambda image: "alpha beta")
    assert len(report["pages"]) == len(pages)
    assert all(p["recall"] == pytest.approx(2 / 3) for p in report["pages"] if p["words"] == 3)
    assert report["recall"] == pytest.approx(report["found"] / report["words"])


@pytest.mark.skipif(OCR_MISSING is not None, reason=f"OCR check skipped: {OCR_MISSING}")
def test_a_rendered_page_is_read_back_by_the_ocr(tmp_path):
    from deepsynth.cli import app

    src = tmp_path / "doc.txt"
    src.write_text("The quick brown fox jumps over the lazy dog.\nPermission is hereby granted, free of\n"
                   "charge, to any person obtaining a copy of this software.\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["render", str(src), "--out", str(tmp_path / "out"), "--preset",
                                      "ocr-tiny-dense", "--check", "--workers", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())["documents"][0]
    page = doc["check"]["pages"][0]
    assert page["words"] == 25 and page["recall"] >= 0.9
    assert "OCR word recall" in result.output and "text tokens per vision token" in result.output
    assert doc["stats"]["mode"] == "tiny" and doc["stats"]["visual_tokens_per_page"] == 64


def test_check_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    from deepsynth.cli import app
    from deepsynth.render import cli as render_cli

    monkeypatch.setattr(render_cli, "ocr_unavailable", lambda: "the OCR extra is not installed: cannot import rapidocr")
    src = tmp_path / "doc.txt"
    src.write_text("hello", encoding="utf-8")
    result = CliRunner().invoke(app, ["render", str(src), "--out", str(tmp_path / "out"), "--check"])
    assert result.exit_code != 0
    assert "OCR extra is not installed" in result.output and not (tmp_path / "out").exists()
