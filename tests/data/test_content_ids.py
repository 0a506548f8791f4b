"""Records without an `id` get a stable id derived from their content, in every reader, in
`validate` and in `prepare`, so such files can be trained on."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepsynth.data import DataValidationError, InstructionExample, read_examples
from deepsynth.data import pipeline as P
from deepsynth.data.instruction_dataset import open_examples
from deepsynth.data.schema import content_id

RECORDS = [
    {"text": "The sky is blue.", "instruction": "What colour is the sky?", "answer": "blue"},
    {"text": "The sky is blue.", "instruction": "What colour is the sky?", "answer": "Blue"},  # differs in answer
    {"text": "The sky is blue.", "instruction": "Which colour?", "answer": "blue"},
    {"text": "The sky is blue.", "instruction": "What colour is the sky?", "answer": "blue", "source": "web"},
    {"text": "The sky is blue.", "instruction": "What colour is the sky?", "answer": "blue", "meta": {"k": 1}},
    {"id": None, "text": "Grass is green.", "instruction": "", "answer": "green"},
]


def _write(tmp_path, suffix: str, records: list[dict]):
    path = tmp_path / f"records{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:  # Parquet as other tools write it: no id column, meta as a JSON string
        cols = {k: [r.get(k) for r in records] for k in ("text", "instruction", "answer", "source")}
        cols["meta"] = [json.dumps(r["meta"]) if "meta" in r else None for r in records]
        pq.write_table(pa.table(cols), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_reader_gives_stable_distinct_content_ids(tmp_path, suffix):
    path = _write(tmp_path, suffix, RECORDS)
    first = [ex.id for ex in read_examples(path)]
    again = [ex.id for ex in read_examples(path)]
    assert first == again  # same record -> same id on every read
    assert len(set(first)) == len(RECORDS)  # different records -> different ids
    assert all(i.startswith("auto-") for i in first)
    # the id depends on the content, not on the position or the format
    (tmp_path / "moved").mkdir()
    moved = _write(tmp_path / "moved", suffix, list(reversed(RECORDS)))
    assert [ex.id for ex in read_examples(moved)] == list(reversed(first))


def test_the_same_record_gets_the_same_id_in_every_format(tmp_path):
    ids = {s: [ex.id for ex in read_examples(_write(tmp_path, s, RECORDS))] for s in (".jsonl", ".json", ".parquet")}
    assert ids[".jsonl"] == ids[".json"] == ids[".parquet"]
    assert ids[".jsonl"][0] == content_id(RECORDS[0]) == content_id({**RECORDS[0], "source": "unknown", "meta": {}})


def test_given_ids_are_kept_and_empty_ids_still_refused(tmp_path):
    path = _write(tmp_path, ".jsonl", [{"id": "mine", **RECORDS[0]}, RECORDS[1]])
    assert [ex.id for ex in read_examples(path)][0] == "mine"
    bad = _write(tmp_path, ".jsonl", [{"id": "", **RECORDS[0]}])
    with pytest.raises(DataValidationError, match="'id' is empty"):
        read_examples(bad)


def test_identical_records_without_ids_are_reported_as_duplicates(tmp_path):
    path = _write(tmp_path, ".jsonl", [RECORDS[0], RECORDS[1], RECORDS[0]])
    with pytest.raises(DataValidationError, match=r"line 3: duplicate id 'auto-[0-9a-f]{16}' \(first seen at .*line 1\)"):
        read_examples(path)


def test_validate_prepare_and_training_input_accept_records_without_ids(tmp_path):
    path = _write(tmp_path, ".jsonl", RECORDS)
    expected = [ex.id for ex in read_examples(path)]
    report = P.validate_path(path, count_pages=False)
    assert report["ok"] and report["valid_records"] == len(RECORDS)
    res = P.prepare(str(path), tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)
    assert res.examples == len(RECORDS) and res.rejected == 0
    prepared = open_examples(tmp_path / "out")
    assert [ex.id for ex in prepared.examples] == expected
    # what `deepsynth train --train FILE` opens
    ds = open_examples(path)
    assert [ex.id for ex in ds.examples] == expected and isinstance(ds.examples[0], InstructionExample)
    parquet = _write(tmp_path, ".parquet", RECORDS)
    res = P.prepare(str(parquet), tmp_path / "out-pq", cache_dir=str(tmp_path / "cache"), progress=False)
    assert res.examples == len(RECORDS) and [ex.id for ex in open_examples(tmp_path / "out-pq").examples] == expected


def test_deepsynth_train_accepts_a_file_of_records_without_ids(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from deepsynth.cli import app

    recs = [{"text": f"Item {i} has code K{i}.", "instruction": f"Code of item {i}?", "answer": f"K{i}"}
            for i in range(4)]
    data = _write(tmp_path, ".jsonl", recs)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model_name": "tiny", "output_dir": str(tmp_path / "run"), "batch_size": 2,
                                      "max_steps": 1, "learning_rate": 1e-3, "render_preset": "tiny",
                                      "log_interval": 1, "eval_max_new_tokens": 4, "seed": 3}))
    res = CliRunner().invoke(app, ["train", str(recipe), "--train", str(data)])
    assert res.exit_code == 0, res.output
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert any("loss" in s for s in steps)
