"""`deepsynth ask` as provided by deepsynth.inference.cli.register (tiny model)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from deepsynth.inference.cli import register

from .helpers import png_bytes, text_pdf


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


@pytest.fixture()
def run(app):
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, ["ask", *args], input=input)

    return invoke


def test_ask_json_record(run, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The total is 42 dollars.\n")
    res = run(str(doc), "-i", "What is the total?", "-m", "tiny", "--max-new-tokens", "5", "--json")
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["pages"] == 1 and record["visual_tokens"] == 17
    assert record["stopped"] in {"eos", "max_new_tokens", "loop"}
    assert record["compression"] == round(record["text_tokens"] / record["visual_tokens"], 3)


def test_ask_stream_plain_and_json(run, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Invoice\n\n- total: 42\n")
    plain = run(str(doc), "-i", "Total?", "-m", "tiny", "--max-new-tokens", "6")
    streamed = run(str(doc), "-i", "Total?", "-m", "tiny", "--max-new-tokens", "6", "--stream")
    assert plain.exit_code == 0 and streamed.exit_code == 0, streamed.output
    assert streamed.stdout.strip() == plain.stdout.strip()
    both = run(str(doc), "-i", "Total?", "-m", "tiny", "--max-new-tokens", "6", "--stream", "--json")
    assert both.exit_code == 0
    assert json.loads(both.stdout)["answer"] == plain.stdout.strip()  # streamed text went to stderr


def test_ask_stdin_text_and_pdf(run, tmp_path):
    res = run("-", "-i", "Total?", "-m", "tiny", "--max-new-tokens", "3", "--json", input="Total: 42.")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["text_tokens"] == len("Total: 42.")
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(text_pdf(["Total: 42 dollars"]))
    res = run(str(pdf), "-i", "Total?", "-m", "tiny", "--max-new-tokens", "3", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["text_tokens"] == len("Total: 42 dollars")
    img = tmp_path / "page.png"
    img.write_bytes(png_bytes())
    res = run(str(img), "-i", "What?", "-m", "tiny", "--max-new-tokens", "3", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["compression"] is None


def test_ask_errors_name_the_input(run, tmp_path):
    res = run(str(tmp_path / "missing.txt"), "-i", "Q?", "-m", "tiny")
    assert res.exit_code == 2 and "no such file" in res.output and "DOCUMENT" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    res = run(str(empty), "-i", "Q?", "-m", "tiny")
    assert res.exit_code == 2 and "empty" in res.output
    res = run("-", "-i", "Q?", "-m", "tiny", "--max-new-tokens", "0", input="text")
    assert res.exit_code == 2 and "max-new-tokens" in res.output
    res = run("-", "-i", "Q?", "-m", str(tmp_path), input="text")
    assert res.exit_code == 2 and "--model" in res.output
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 not really")
    res = run(str(bad), "-i", "Q?", "-m", "tiny")
    assert res.exit_code == 2 and "PDF" in res.output
    assert "Traceback" not in res.output


def test_ask_engine_and_dtype(run, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The total is 42 dollars.\n")
    res = run(str(doc), "-i", "Total?", "-m", "tiny", "--max-new-tokens", "3", "--dtype", "bfloat16", "--json")
    assert res.exit_code == 0, res.output
    served = json.loads(res.stdout)["served_with"]
    assert (served["engine"], served["dtype"]) == ("hf", "bfloat16")
    res = run(str(doc), "-i", "Total?", "-m", "tiny", "--dtype", "float64")
    assert res.exit_code == 2 and "--dtype" in res.output
    try:
        import vllm  # noqa: F401
    except ImportError:  # this environment (the project's .venv) has no vLLM: the error says where it is
        res = run(str(doc), "-i", "Total?", "-m", "tiny", "--engine", "vllm")
        assert res.exit_code == 2 and "make vllm-env" in res.output
    res = run(str(doc), "-i", "Total?", "-m", "tiny", "--engine", "onnx")
    assert res.exit_code == 2 and "'hf', 'vllm'" in res.output
