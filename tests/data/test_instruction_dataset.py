"""`open_examples`: examples files are rendered with the asked config; prepared folders (and their
shards) give their stored pages as they are and report the config those pages were drawn with."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from deepsynth.data import InstructionExample, write_jsonl
from deepsynth.data import pipeline as P
from deepsynth.data.instruction_dataset import InstructionDataset, open_examples
from deepsynth.render import RenderConfig, render_text
from prepare_helpers import squad_rows, stored_pages

TINY = RenderConfig.from_preset("tiny")
SMALL = RenderConfig.from_preset("small")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "squad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in squad_rows(5)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, squad_file, cache) -> Path:
    """A folder prepared with --render at the small preset (not the tiny one the tests ask for)."""
    out = tmp_path_factory.mktemp("prep") / "rendered"
    P.prepare(str(squad_file), out, cache_dir=cache, render=True, preset="small", shard_size=3, progress=False)
    return out


@pytest.fixture(scope="module")
def unrendered(tmp_path_factory, squad_file, cache) -> Path:
    out = tmp_path_factory.mktemp("prep") / "plain"
    P.prepare(str(squad_file), out, cache_dir=cache, progress=False)
    return out


def test_prepared_folder_pages_are_used_as_they_are_and_its_config_reported(rendered, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="deepsynth.data.instruction_dataset"):
        ds = open_examples(rendered, render_config=TINY, default_instruction="Answer.", cache_dir=cache)
    assert ds.pre_rendered and len(ds) == 5 and ds.source == str(rendered)
    assert ds.render_config == SMALL  # the folder's, not the asked tiny one
    # the mismatch is logged, naming both configs' differing fields
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'small'" in warning and "page_width 512 vs 256" in warning
    stored = stored_pages(rendered)
    for i in range(len(ds)):
        item = ds[i]
        assert [p.tobytes() for p in item["pages"]] == stored[item["id"]]
        assert item["pages"][0].size == (512, 512)
        assert item["instruction"] == f"Code of item {i}?"


def test_matching_config_logs_nothing_and_one_shard_opens_alone(rendered, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="deepsynth.data.instruction_dataset"):
        ds = open_examples(rendered, render_config=SMALL, cache_dir=cache)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    shard = sorted((rendered / "data").glob("*.parquet"))[1]
    part = open_examples(shard, render_config=TINY, cache_dir=cache)
    assert part.pre_rendered and part.render_config == SMALL  # found through the folder's manifest
    assert [part[i]["id"] for i in range(len(part))] == ["q3", "q4"]
    assert [p.tobytes() for p in part[0]["pages"]] == [p.tobytes() for p in ds[3]["pages"]]


def test_unrendered_folder_is_rendered_with_the_asked_config(unrendered, cache):
    ds = open_examples(unrendered, render_config=TINY, cache_dir=cache)
    assert not ds.pre_rendered and ds.render_config == TINY
    item = ds[2]
    assert [p.tobytes() for p in item["pages"]] == [p.image.tobytes() for p in render_text(ds.examples[2].text, TINY)]


def test_examples_file_is_rendered_with_the_asked_config(tmp_path):
    path = tmp_path / "ex.jsonl"
    write_jsonl([InstructionExample(id="a", text="The total is 42.", instruction="", answer="42")], path)
    ds = open_examples(path, render_config=TINY, default_instruction="What is the total?")
    assert isinstance(ds, InstructionDataset) and not ds.pre_rendered and ds.render_config == TINY
    assert ds.source == str(path)
    item = ds[0]
    assert item["instruction"] == "What is the total?"
    assert [p.tobytes() for p in item["pages"]] == [p.image.tobytes() for p in render_text("The total is 42.", TINY)]


def test_a_shard_copied_out_of_its_folder_still_gives_its_pages(rendered, tmp_path, cache, caplog):
    shard = sorted((rendered / "data").glob("*.parquet"))[0]
    loose = tmp_path / "loose.parquet"
    shutil.copy(shard, loose)
    with caplog.at_level(logging.WARNING, logger="deepsynth.data.instruction_dataset"):
        ds = open_examples(loose, render_config=TINY, cache_dir=cache)
    assert ds.pre_rendered and ds[0]["pages"][0].size == (512, 512)
    # without its manifest nobody knows how the pages were drawn: said, and the asked config recorded
    assert ds.render_config == TINY and any("without a manifest.json" in r.getMessage() for r in caplog.records)


def test_from_prepared_reports_the_folders_config_over_the_asked_one(rendered, cache):
    ds = InstructionDataset.from_prepared(rendered, render_config=TINY, cache_dir=cache)
    assert ds.render_config == SMALL and ds.pre_rendered


def test_clear_errors(tmp_path, rendered, cache):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_examples(tmp_path / "missing")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"not a folder written by `deepsynth prepare` \(no manifest.json\)"):
        open_examples(plain)
    with pytest.raises(ValueError, match="the file holds no examples"):
        open_examples(plain / "x.jsonl")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "notes.txt").write_text("hello")
        open_examples(tmp_path / "notes.txt")

    # a prepare run that kept nothing
    src = tmp_path / "none.jsonl"
    src.write_text(json.dumps({"id": "u", "title": "T", "context": "No answer here.", "question": "?",
                               "answers": {"text": [], "answer_start": []}}) + "\n")
    empty = tmp_path / "empty"
    P.prepare(str(src), empty, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="holds no examples .*skipped.jsonl"):
        open_examples(empty)

    # an interrupted prepare run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(rendered, unfinished)
    m = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(ValueError, match="has not finished.*run the same prepare command again"):
        open_examples(unfinished)

    # a shard listed in the manifest but gone
    (unfinished / "manifest.json").write_text(json.dumps(m))
    sorted((unfinished / "data").glob("*.parquet"))[0].unlink()
    with pytest.raises(P.PrepareError, match="missing"):
        open_examples(unfinished)

