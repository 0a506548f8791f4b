"""prepare / validate / upload: fixtures through load_dataset on local files, known names,
--render into an Image column, --num-proc 2, resume after an interruption, the CLI, the hub
upload with only the network calls mocked."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from deepsynth.data import InstructionExample, write_jsonl
from deepsynth.data import pipeline as P
from deepsynth.data import prepare as prepare_module
from deepsynth.data import sources
from deepsynth.data.cli import register
from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.render import RenderConfig, render_text

FIX = Path(__file__).parent / "fixtures"
TINY = RenderConfig.from_preset("tiny")


@pytest.fixture()
def cache(tmp_path) -> str:
    return str(tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


def table(out: Path):
    files = sorted((out / "data").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------ every source through load_dataset


@pytest.mark.parametrize("source, converter, n, skipped, rejected", [
    ("squad_v2.jsonl", "squad", 3, {"unanswerable": 1}, 1),
    ("natural_questions.jsonl", "natural_questions", 4, {"no_answer": 1}, 0),
    ("nq_simplified.jsonl", "natural_questions", 1, {}, 0),
    ("ms_marco.jsonl", "ms_marco", 3, {"no_answer": 1}, 0),
    ("fiqa", "fiqa", 3, {}, 0),
    ("cnn_dailymail.jsonl", "cnn_dailymail", 1, {}, 1),
    ("xsum.jsonl", "xsum", 2, {}, 0),
])
def test_prepare_every_source(tmp_path, cache, source, converter, n, skipped, rejected):
    out = tmp_path / "out"
    res = P.prepare(str(FIX / source), out, cache_dir=cache, progress=False)
    assert (res.examples, res.skipped, res.rejected) == (n, skipped, rejected)
    m = manifest(out)
    assert m["complete"] and m["plan"]["converter"] == converter
    assert m["counts"]["examples"] == n and m["counts"]["input_rows"] == res.input_rows
    assert len(jsonl(out / "rejected.jsonl")) == rejected and len(jsonl(out / "skipped.jsonl")) == sum(skipped.values())
    assert res.input_rows == n + sum(skipped.values()) + rejected  # every record accounted for
    rows = table(out)
    assert len(rows) == n and set(rows[0]) == {"id", "text", "instruction", "answer", "source", "meta"}
    for row in rows:
        InstructionExample.from_dict(dict(row, meta=json.loads(row["meta"]))).validate()
    assert P.validate_path(out, count_pages=False)["ok"]


def test_generic_csv_with_mapping_and_variants(tmp_path, cache):
    out = tmp_path / "out"
    res = P.prepare(str(FIX / "generic.csv"), out, cache_dir=cache, mapping=["text=body", "answer=tldr,id=uid"],
                    options={"instruction_variants": ["Short version?", "Gist?"]}, progress=False)
    assert res.examples == 2 and res.rejected == 1
    rows = table(out)
    assert [r["id"] for r in rows] == ["a1", "a2"] and {r["instruction"] for r in rows} <= {"Short version?", "Gist?"}
    assert jsonl(out / "rejected.jsonl")[0]["id"] == "a3"
    with pytest.raises(P.PrepareError, match=r"column\(s\) \['summary'\]"):
        P.prepare(str(FIX / "generic.csv"), tmp_path / "o2", cache_dir=cache, mapping="text=body,answer=summary")
    with pytest.raises(ValueError, match="mapping key 'body'"):
        P.prepare(str(FIX / "generic.csv"), tmp_path / "o3", cache_dir=cache, mapping="body=text")
    with pytest.raises(P.PrepareError, match="cannot tell which converter"):
        P.prepare(str(FIX / "generic.csv"), tmp_path / "o4", cache_dir=cache)


def test_instruction_jsonl_round_trip_keeps_meta(tmp_path, cache):
    src = tmp_path / "mine.jsonl"
    exs = [InstructionExample(id="x1", text="Doc one", instruction="Q?", answer="A", meta={"a": 1}),
           InstructionExample(id="x2", text="Doc two", instruction="", answer="B", meta={"b": [1, 2]})]
    write_jsonl(exs, src)
    P.prepare(str(src), tmp_path / "out", cache_dir=cache, progress=False)
    rows = table(tmp_path / "out")
    assert [json.loads(r["meta"]) for r in rows] == [{"a": 1}, {"b": [1, 2]}]  # no null keys added


def test_known_name_goes_through_load_dataset(tmp_path, cache, monkeypatch):
    """`prepare squad_v2` asks datasets.load_dataset for rajpurkar/squad_v2; offline, the hub
    is stood in for by a script-free local dataset folder."""
    hub_dir = tmp_path / "hub" / "squad_v2"
    hub_dir.mkdir(parents=True)
    shutil.copy(FIX / "squad_v2.jsonl", hub_dir / "validation.jsonl")
    calls = []
    real = sources._load_dataset

    def fake(path, name=None, **kw):
        calls.append((path, name, kw.get("split")))
        assert path == "rajpurkar/squad_v2"
        return real(str(hub_dir), name, **kw)

    monkeypatch.setattr(sources, "_load_dataset", fake)
    res = P.prepare("squad_v2", tmp_path / "out", split="validation", limit=4, cache_dir=cache,
                    options={"no_answer": "unanswerable"}, progress=False)
    assert calls == [("rajpurkar/squad_v2", None, "validation")]
    assert res.examples == 4 and res.skipped == {}
    m = manifest(tmp_path / "out")
    assert m["license"] == "cc-by-sa-4.0" and m["plan"]["name"] == "rajpurkar/squad_v2"
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["validation-00000-of-00001.parquet"]


def test_local_dataset_folder_and_load_back(tmp_path, cache):
    folder = tmp_path / "natural_questions"
    (folder / "data").mkdir(parents=True)
    shutil.copy(FIX / "natural_questions.jsonl", folder / "data" / "train.jsonl")
    out = tmp_path / "out"
    res = P.prepare(str(folder), out, cache_dir=cache, progress=False)
    assert res.examples == 4
    back = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    assert len(back) == 4 and back[0]["id"] == "797803103760793766"


def test_unreachable_hub_name_is_a_clear_error(tmp_path, cache):
    with pytest.raises(P.PrepareError, match=r"cannot load 'no-such-user/no-such-dataset'"):
        P.prepare("no-such-user/no-such-dataset", tmp_path / "out", cache_dir=cache)


# ------------------------------------------------------------------ render, num_proc, resume


def _squad_rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        ctx = f"Document {i}. The secret code of item {i} is K{i * 7 % 97}. Ünïcødé ✓ — 日本語 " + "filler words " * (i % 5)
        out.append({"id": f"q{i:03d}", "title": "T", "context": ctx, "question": f"What is the code of item {i}?",
                    "answers": {"text": [f"K{i * 7 % 97}"], "answer_start": [ctx.index(f"K{i * 7 % 97}")]}})
    return out


@pytest.fixture()
def squad_file(tmp_path) -> Path:
    path = tmp_path / "squad_many.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _squad_rows(12)), encoding="utf-8")
    return path


def test_render_num_proc_2_stores_png_pages(tmp_path, cache, squad_file):
    out = tmp_path / "out"
    res = P.prepare(str(squad_file), out, cache_dir=cache, render=True, preset="tiny", num_proc=2, shard_size=5,
                    progress=False)
    assert (res.examples, res.shards, res.shards_written) == (12, 3, 3)
    assert list(Path(cache).rglob("*_00001_of_00002.arrow"))  # conversion really ran in 2 workers
    names = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert names == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    m = manifest(out)
    assert m["render"]["preset"] == "tiny" and m["render"]["config"]["page_width"] == 256
    rows = table(out)
    assert [r["id"] for r in rows] == [f"q{i:03d}" for i in range(12)]  # order kept across workers
    for row in rows[:4]:
        expected = render_text(row["text"], TINY)
        assert row["num_pages"] == len(row["Image"]) == len(expected)
        for stored, page in zip(row["Image"], expected):
            assert stored["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
            img = Image.open(io.BytesIO(stored["bytes"]))
            assert img.convert("RGB").tobytes() == page.image.tobytes()  # lossless
    ds = InstructionDataset.from_prepared(out, cache_dir=cache)
    assert len(ds) == 12 and ds.render_config.page_width == 256
    item = ds[3]
    assert item["answer"] == "K21" and [p.tobytes() for p in item["pages"]] == \
        [p.image.tobytes() for p in render_text(rows[3]["text"], TINY)]
    rep = P.validate_path(out)
    assert rep["ok"] and rep["pages_per_document"]["from"] == "rendered"
    assert rep["extractive"]["share"] == 1.0


def test_default_preset_is_base_and_render_failures_are_rejected(tmp_path, cache):
    src = tmp_path / "docs.jsonl"
    write_jsonl([InstructionExample(id="short", text="A short page.", instruction="?", answer="x"),
                 InstructionExample(id="long", text="many words here " * 3000, instruction="?", answer="y")], src)
    out = tmp_path / "out"
    res = P.prepare(str(src), out, cache_dir=cache, render=True, render_overrides={"max_pages": 2}, progress=False)
    assert res.examples == 1 and res.rejected == 1
    (rej,) = jsonl(out / "rejected.jsonl")
    assert rej["id"] == "long" and "max_pages=2" in rej["reason"]
    assert manifest(out)["render"]["config"]["page_width"] == 640  # preset "base"


def test_resume_after_interruption(tmp_path, cache, squad_file, monkeypatch):
    ref = tmp_path / "ref"
    P.prepare(str(squad_file), ref, cache_dir=cache, render=True, preset="tiny", shard_size=4, progress=False)
    out = tmp_path / "out"
    real = prepare_module.write_atomic
    calls = {"n": 0}

    def interrupted(path, write):
        if Path(path).suffix == ".parquet":
            calls["n"] += 1
            if calls["n"] == 2:
                tmp = Path(path).with_name(f".{Path(path).name}.k1ll3d.tmp")
                tmp.write_bytes(b"half a file")  # what a kill mid-write leaves behind
                raise KeyboardInterrupt
        return real(path, write)

    monkeypatch.setattr(prepare_module, "write_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(str(squad_file), out, cache_dir=cache, render=True, preset="tiny", num_proc=2, shard_size=4,
                  progress=False)
    assert not manifest(out)["complete"] and len(list((out / "data").glob("*.parquet"))) == 1
    monkeypatch.setattr(prepare_module, "write_atomic", real)
    res = P.prepare(str(squad_file), out, cache_dir=cache, render=True, preset="tiny", num_proc=2, shard_size=4,
                    progress=False)
    assert (res.shards, res.shards_reused, res.shards_written) == (3, 1, 2)
    assert manifest(out)["complete"] and not list((out / "data").glob(".*.tmp"))
    assert table(out) == table(ref)  # same records as an uninterrupted run (num_proc 1)
    # a damaged shard (marker present, file cut) is redone; the others are reused
    shard = sorted((out / "data").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    res = P.prepare(str(squad_file), out, cache_dir=cache, render=True, preset="tiny", shard_size=4, num_proc=2,
                    progress=False)
    assert (res.shards_reused, res.shards_written) == (2, 1) and table(out) == table(ref)


def test_a_different_run_in_the_same_folder_is_refused(tmp_path, cache, squad_file):
    out = tmp_path / "out"
    P.prepare(str(squad_file), out, cache_dir=cache, progress=False)
    with pytest.raises(P.PrepareError, match=r"differs in: .*options"):
        P.prepare(str(squad_file), out, cache_dir=cache, options={"no_answer": "none"}, progress=False)
    res = P.prepare(str(squad_file), out, cache_dir=cache, limit=5, overwrite=True, progress=False)
    assert res.examples == 5 and len(table(out)) == 5


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("foreign", [
    '{"name": "my project", "version": 3}',            # someone else's manifest
    '{"config": {}, "documents": [], "errors": []}',   # a `deepsynth render` folder
    '{"plan": {"format_version": 1}, "plan_hash": "x", "tool": "other"}',
    '{"truncated": ',                                   # unreadable
    '[1, 2, 3]',
])
def test_overwrite_refuses_a_folder_it_did_not_write_and_deletes_nothing(tmp_path, cache, squad_file, foreign):
    out = tmp_path / "project"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train-00000-of-00001.parquet").write_bytes(b"their data")
    (out / "data" / "notes.txt").write_text("keep me", encoding="utf-8")
    (out / "README.md").write_text("their readme", encoding="utf-8")
    (out / "rejected.jsonl").write_text("their log\n", encoding="utf-8")
    (out / "manifest.json").write_text(foreign, encoding="utf-8")
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(P.PrepareError, match="nothing was deleted"):
            P.prepare(str(squad_file), out, cache_dir=cache, overwrite=overwrite, progress=False)
        assert _tree(out) == before


def test_overwrite_deletes_only_the_files_its_own_manifest_lists(app, tmp_path, cache, squad_file):
    out = tmp_path / "out"
    P.prepare(str(squad_file), out, cache_dir=cache, shard_size=5, progress=False)
    m = manifest(out)
    assert m["tool"] == "deepsynth prepare"
    assert sorted(m["files"]) == sorted([f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
                                        + [f".prepare/shard-0000{i}.done" for i in range(3)]
                                        + ["rejected.jsonl", "skipped.jsonl"])
    # files the user put there afterwards, some with names prepare could have written
    (out / "data" / "extra.parquet").write_bytes(b"mine")
    (out / "notes.md").write_text("mine", encoding="utf-8")
    (out / ".prepare" / "mine.txt").write_text("mine", encoding="utf-8")
    (out / "README.md").write_text("mine", encoding="utf-8")  # upload never ran, so this is not prepare's
    res = P.prepare(str(squad_file), out, cache_dir=cache, limit=4, overwrite=True, progress=False)
    assert res.examples == 4 and len(table_of_manifest(out)) == 4
    assert (out / "data" / "extra.parquet").read_bytes() == b"mine"
    assert (out / "notes.md").read_text() == "mine" and (out / "README.md").read_text() == "mine"
    assert (out / ".prepare" / "mine.txt").read_text() == "mine"
    assert not (out / "data" / "train-00002-of-00003.parquet").exists()  # the old run's own shards are gone
    assert P.validate_path(out)["records"] == 4  # the manifest's shards, not whatever lies in data/
    # a manifest that lists a path outside the folder is refused before anything is deleted
    m = manifest(out)
    m["plan_hash"] = "changed"
    victim = tmp_path / "victim.txt"
    victim.write_text("outside", encoding="utf-8")
    for bad in ("../victim.txt", str(victim), "data/../../victim.txt", "data"):
        (out / "manifest.json").write_text(json.dumps(dict(m, files=m["files"] + [bad])), encoding="utf-8")
        before = _tree(out)
        with pytest.raises(P.PrepareError, match="not a file of this folder; nothing was deleted"):
            P.prepare(str(squad_file), out, cache_dir=cache, overwrite=True, progress=False)
        assert _tree(out) == before and victim.read_text() == "outside"


def test_overwrite_of_a_manifest_written_before_files_were_listed(tmp_path, cache, squad_file):
    out = tmp_path / "out"
    P.prepare(str(squad_file), out, cache_dir=cache, shard_size=5, progress=False)
    m = manifest(out)
    del m["files"], m["tool"]  # as the earlier format wrote it: only its shards are recorded
    m["plan_hash"] = "earlier"
    (out / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    (out / "data" / "mine.parquet").write_bytes(b"mine")
    res = P.prepare(str(squad_file), out, cache_dir=cache, limit=3, overwrite=True, progress=False)
    assert res.examples == 3 and (out / "data" / "mine.parquet").read_bytes() == b"mine"
    assert sorted(p.name for p in (out / "data").iterdir()) == ["mine.parquet", "train-00000-of-00001.parquet"]


def test_stale_temporary_files_of_a_killed_run_are_removed_at_start(tmp_path, cache, squad_file):
    out = tmp_path / "out"
    P.prepare(str(squad_file), out, cache_dir=cache, shard_size=5, progress=False)
    left = [out / "data" / ".train-00001-of-00003.parquet.a1b2.tmp", out / ".prepare" / ".shard-00001.done.x.tmp",
            out / ".manifest.json.q9.tmp", out / ".rejected.jsonl.z.tmp"]
    for f in left:
        f.write_bytes(b"half")
    other = out / ".someone-elses.tmp"  # not a name prepare writes
    other.write_bytes(b"keep")
    res = P.prepare(str(squad_file), out, cache_dir=cache, shard_size=5, progress=False)
    assert res.shards_reused == 3
    assert not any(f.exists() for f in left) and other.read_bytes() == b"keep"


def test_validate_reads_a_foreign_folder_as_plain_files(tmp_path):
    out = tmp_path / "theirs"
    (out / "data").mkdir(parents=True)
    (out / "manifest.json").write_text('{"name": "their project"}', encoding="utf-8")
    write_jsonl([InstructionExample(id="a", text="Some text.", instruction="?", answer="x")], out / "data" / "a.jsonl")
    rep = P.validate_path(out, count_pages=False)
    assert rep["ok"] and rep["records"] == 1


def table_of_manifest(out: Path):
    return [row for s in manifest(out)["shards"] for row in pq.read_table(out / s["file"]).to_pylist()]


# ------------------------------------------------------------------ validate


def _write_bad_jsonl(path: Path) -> None:
    good = {"id": "a", "text": "The answer is 42.", "instruction": "?", "answer": "42", "meta": {"extractive": True}}
    lines = [json.dumps(good),
             json.dumps(dict(good, answer="43")),  # duplicate id, answer not in text
             json.dumps(dict(good, id="", answer="x")),
             json.dumps(dict(good, id="c", text="")),
             "{not json",
             json.dumps(dict(good, id="d", extra=1)),
             json.dumps(dict(good, id="e", text="long text " * 400))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_validate_reports_every_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_bad_jsonl(path)
    rep = P.validate_path(path, preset="tiny")
    assert not rep["ok"] and rep["records"] == 7
    assert rep["empty_ids"] == 1
    assert rep["duplicate_ids"]["count"] == 1 and rep["duplicate_ids"]["samples"][0]["first"].endswith("line 1")
    by_field = rep["errors"]["by_field"]
    assert by_field["text"] == 1 and by_field["(unreadable)"] == 1 and by_field["extra"] == 1
    msgs = " | ".join(s["message"] for s in rep["errors"]["samples"])
    assert "bad.jsonl line 5: invalid JSON" in msgs and "line 4" in msgs
    # statistics cover the records that pass validation (duplicates included): a, a again, e
    assert rep["extractive"]["records"] == 3 and rep["extractive"]["answer_found_verbatim"] == 1
    pages = rep["pages_per_document"]
    assert pages["from"] == "layout with preset 'tiny'" and pages["max"] > 1
    assert sum(b["count"] for b in rep["text_chars"]["histogram"]) == 3
    text = P.format_report(rep)
    assert "ERRORS" in text and "duplicate ids: 1" in text and "pages per document" in text


def test_cli_prepare_validate(app, tmp_path, cache):
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", str(FIX / "squad_v2.jsonl"), "--out", str(out), "--num-proc", "2",
                              "--no-answer", "unanswerable", "--render", "--preset", "tiny", "--cache-dir", cache])
    assert res.exit_code == 0, res.output
    assert "4 example(s) from 5 record(s)" in res.output and "rejected: 1" in res.output
    res = runner.invoke(app, ["prepare", str(FIX / "squad_v2.jsonl"), "--out", str(out), "--num-proc", "2",
                              "--no-answer", "unanswerable", "--render", "--preset", "tiny", "--cache-dir", cache,
                              "--strict"])
    assert res.exit_code == 1 and "1 reused" in res.output
    res = runner.invoke(app, ["validate", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["ok"] and rep["records"] == 4 and rep["pages_per_document"]["from"] == "rendered"
    bad = tmp_path / "bad.jsonl"
    _write_bad_jsonl(bad)
    res = runner.invoke(app, ["validate", str(bad), "--no-pages"])
    assert res.exit_code == 1 and "ERRORS" in res.output
    res = runner.invoke(app, ["prepare", str(FIX / "xsum.jsonl"), "--out", str(tmp_path / "x"), "--no-answer", "skip",
                              "--cache-dir", cache])
    assert res.exit_code == 1 and "has no option(s) ['no_answer']" in res.output
    res = runner.invoke(app, ["prepare", str(FIX / "xsum.jsonl"), "--out", str(tmp_path / "x"), "--cache-dir", cache,
                              "--instruction-variant", "One line?", "--instruction-variant", "Gist?",
                              "--option", "seed=3"])
    assert res.exit_code == 0, res.output
    assert {r["instruction"] for r in table(tmp_path / "x")} <= {"One line?", "Gist?"}


# ------------------------------------------------------------------ upload (network calls mocked)


def test_upload_writes_card_and_pushes_without_leaking_the_token(app, tmp_path, cache, monkeypatch, caplog):
    import huggingface_hub

    out = tmp_path / "out"
    P.prepare(str(FIX / "squad_v2.jsonl"), out, cache_dir=cache, render=True, preset="tiny", shard_size=2,
              progress=False)
    secret = "hf_SeCrEtToKeN1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    seen: dict = {}

    def create_repo(self, repo_id, **kw):
        seen["repo"] = (repo_id, kw)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def create_commit(self, repo_id, operations, **kw):
        seen["commit"] = (repo_id, [op.path_in_repo for op in operations], kw)
        seen["card"] = next(Path(op.path_or_fileobj).read_text(encoding="utf-8") for op in operations
                            if op.path_in_repo == "README.md")
        seen["published"] = {op.path_in_repo: (op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                                               else Path(op.path_or_fileobj).read_bytes()) for op in operations}

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    caplog.set_level("DEBUG")
    assert manifest(out)["license"] == "unknown"  # a local file: licence not known...
    res = CliRunner().invoke(app, ["upload", str(out), "--repo", "me/squad-pages", "--private",
                                   "--license", "cc-by-sa-4.0"])  # ...so the user states it
    assert res.exit_code == 0, res.output
    repo_id, kw = seen["repo"]
    assert repo_id == "me/squad-pages" and kw["private"] is True and kw["repo_type"] == "dataset"
    assert kw["token"] == secret  # used, from the environment...
    assert secret not in res.output and secret not in caplog.text  # ...never shown
    _, paths, ckw = seen["commit"]
    assert ckw["repo_type"] == "dataset"
    assert sorted(paths) == ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                             "manifest.json"]
    card = seen["card"]
    assert card.startswith("---\n") and "license: cc-by-sa-4.0" in card
    assert "path: data/train-*.parquet" in card and "**Examples:** 3" in card and '"page_width": 256' in card
    assert "`squad_v2.jsonl`" in card and str(FIX) not in card  # no local paths in a public card
    assert (out / "README.md").read_text(encoding="utf-8") == card
    assert "README.md" in manifest(out)["files"]  # recorded, so a later --overwrite may replace it
    # the published manifest names the source file, never where it lies on this machine
    local = manifest(out)
    assert local["plan"]["source"] == str(FIX / "squad_v2.jsonl")
    published = json.loads(seen["published"]["manifest.json"])
    for blob in seen["published"].values():
        for secret_path in (str(FIX), str(tmp_path), str(Path.home())):
            assert secret_path.encode() not in blob
    assert published["plan"]["source"] == published["plan"]["name"] == "squad_v2.jsonl"
    assert published["plan_hash"] == local["plan_hash"] and published["shards"] == local["shards"]

    def failing(self, repo_id, **kw):
        raise RuntimeError(f"401 Unauthorized for token {kw['token']}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", failing)
    res = CliRunner().invoke(app, ["upload", str(out), "--repo", "me/squad-pages"])
    assert res.exit_code == 1 and "401 Unauthorized" in res.output and secret not in res.output


def test_upload_needs_a_token_and_a_complete_folder(tmp_path, cache, monkeypatch):
    import huggingface_hub

    out = tmp_path / "out"
    P.prepare(str(FIX / "xsum.jsonl"), out, cache_dir=cache, progress=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(P.PrepareError, match="no Hugging Face token"):
        P.upload(out, "me/x")
    m = manifest(out)
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(P.PrepareError, match="not complete"):
        P.upload(out, "me/x")
    with pytest.raises(P.PrepareError, match="not a prepared folder"):
        P.upload(tmp_path, "me/x")


def test_public_manifest_drops_every_local_path(tmp_path):
    src = tmp_path / "private" / "corpus.jsonl"
    m = {"plan": {"kind": "file", "source": str(src), "name": str(src),
                  "options": {"vocab": str(tmp_path / "private" / "vocab.txt"), "home": "~/notes.txt",
                              "note": f"built from {src.parent} on this machine", "seed": 3}},
         "files": ["data/train-00000-of-00001.parquet"], "complete": True}
    pub = P.public_manifest(m)
    text = json.dumps(pub)
    assert str(tmp_path) not in text and str(Path.home()) not in text
    assert pub["plan"]["source"] == pub["plan"]["name"] == "corpus.jsonl"
    assert pub["plan"]["options"] == {"vocab": "vocab.txt", "home": "notes.txt",
                                      "note": "built from private on this machine", "seed": 3}
    assert pub["files"] == m["files"] and m["plan"]["source"] == str(src)  # the local copy is untouched
    hub = {"plan": {"kind": "hub", "source": "rajpurkar/squad", "name": "rajpurkar/squad"}}
    assert P.public_manifest(hub) == hub
