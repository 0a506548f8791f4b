"""Malformed files (JSON nested 100k deep, bytes that are not UTF-8, integers past Python's digit
limit, Parquet with a damaged or cut footer) give an error naming the file and the line/row, from
the readers, `validate` and `prepare`, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from deepsynth.data import DataValidationError, read_examples
from deepsynth.data import pipeline as P
from deepsynth.data.cli import register

GOOD = {"id": "a", "text": "The answer is 42.", "instruction": "What is the answer?", "answer": "42"}
SQUAD = {"id": "q1", "title": "T", "context": "The code is K7.", "question": "Code?",
         "answers": {"text": ["K7"], "answer_start": [12]}}
DEEP = "[" * 100_000 + "]" * 100_000


def _parquet_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({k: [v] for k, v in GOOD.items()}), sink)
    return sink.getvalue().to_pybytes()


def _make(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(file, where the error must point)."""
    good = json.dumps(GOOD)
    if kind == "deep_line":
        path = tmp_path / "deep.jsonl"
        path.write_text(good + "\n\n" + DEEP + "\n", encoding="utf-8")
        return path, "deep.jsonl line 3: JSON nested too deeply"
    if kind == "deep_first_line":
        path = tmp_path / "deep1.jsonl"
        path.write_text(DEEP + "\n" + good + "\n", encoding="utf-8")
        return path, "deep1.jsonl line 1: JSON nested too deeply"
    if kind == "deep_meta":
        path = tmp_path / "meta.jsonl"
        meta = '{"a":' * 100_000 + "1" + "}" * 100_000
        path.write_text(good + "\n" + good[:-1].replace('"a"', '"b"', 1) + ', "meta": ' + meta + "}\n", encoding="utf-8")
        return path, "meta.jsonl line 2: JSON nested too deeply"
    if kind == "deep_json_array":
        path = tmp_path / "deep.json"
        path.write_text("[" + good + ", " + DEEP + "]", encoding="utf-8")
        return path, "deep.json: JSON nested too deeply"
    if kind == "not_utf8":
        path = tmp_path / "bytes.jsonl"
        path.write_bytes(good.encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
        return path, "bytes.jsonl line 2: not UTF-8 text"
    if kind == "huge_int":
        path = tmp_path / "int.jsonl"
        path.write_text(good + "\n" + '{"id": ' + "9" * 5000 + "}\n", encoding="utf-8")
        return path, "int.jsonl line 2: JSON value cannot be read"
    data = _parquet_bytes()
    if kind == "parquet_footer":
        path = tmp_path / "footer.parquet"
        path.write_bytes(data[:-12] + b"\x00" * 8 + data[-4:])  # footer metadata zeroed, magic kept
        return path, "footer.parquet: not a readable Parquet file"
    if kind == "parquet_cut":
        path = tmp_path / "cut.parquet"
        path.write_bytes(data[: len(data) // 2])
        return path, "cut.parquet: not a readable Parquet file"
    raise AssertionError(kind)


KINDS = ["deep_line", "deep_first_line", "deep_meta", "deep_json_array", "not_utf8", "huge_int",
         "parquet_footer", "parquet_cut"]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    from deepsynth.cli_errors import ErrorReportingGroup

    app = typer.Typer(cls=ErrorReportingGroup)  # as the `deepsynth` app: failures in one line

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


@pytest.mark.parametrize("kind", KINDS)
def test_readers_name_file_and_line(tmp_path, kind):
    path, where = _make(tmp_path, kind)
    with pytest.raises(DataValidationError) as err:
        read_examples(path)
    assert where in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_validate_reports_instead_of_raising(app, tmp_path, kind):
    path, where = _make(tmp_path, kind)
    report = P.validate_path(path, count_pages=False)
    assert not report["ok"] and report["errors"]["by_field"].get("(unreadable)") == 1
    assert any(where in s["message"] for s in report["errors"]["samples"])
    if kind in ("deep_line", "deep_first_line", "not_utf8", "huge_int"):  # the readable record still counts
        assert report["valid_records"] == 1
    res = CliRunner().invoke(app, ["validate", str(path), "--no-pages"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert where in " ".join(res.output.split()) and "Traceback" not in res.output


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_names_file_and_line(app, tmp_path, kind):
    path, where = _make(tmp_path, kind)
    res = CliRunner().invoke(app, ["prepare", str(path), "--out", str(tmp_path / "out"),
                                   "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"error: {tmp_path}/{where}" in " ".join(res.output.split())


@pytest.mark.parametrize("body, where", [
    (json.dumps(SQUAD) + "\n" + '{"id": "q2", "context": ' + DEEP + "}\n", "line 2: JSON nested too deeply"),
    (json.dumps(SQUAD).encode() + b"\n" + b'{"id": "\xff\xfe", "context": "x"}\n', "line 2: not UTF-8 text"),
])
def test_prepare_of_a_source_dataset_file_names_the_line(tmp_path, body, where):
    """Files that are not instruction records go through the datasets loader, which accepts some
    damage silently (bytes that are not UTF-8) and fails later without naming the line."""
    path = tmp_path / "squad.jsonl"
    path.write_bytes(body.encode() if isinstance(body, str) else body)
    with pytest.raises(P.PrepareError, match=f"squad.jsonl {where}"):
        P.prepare(str(path), tmp_path / "out", cache_dir=str(tmp_path / "cache"), progress=False)


def test_prepare_of_a_csv_with_bad_bytes_names_the_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"text,answer\nhello,world\n\xff\xfe,x\n")
    with pytest.raises(P.PrepareError, match="pairs.csv line 3: not UTF-8 text"):
        P.prepare(str(path), tmp_path / "out", mapping="text=text,answer=answer", cache_dir=str(tmp_path / "c"),
                  progress=False)
