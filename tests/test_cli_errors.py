"""Every failure of the `deepsynth` command is one readable line on stderr (what was wrong, which
input, what to do), never a traceback, unless --debug or DEEPSYNTH_DEBUG=1 asks for it.

Some invocations run the command as a user does, in a fresh process (`deepsynth`); the rest call the
same typer app in this process (`deepsynth_app`), which is quicker and goes through the same group."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepsynth.cli import app
from deepsynth.cli_errors import describe

READER = Path(__file__).parents[1] / "src" / "deepsynth" / "models" / "checkpoints" / "form-reader"


def deepsynth(*args, cwd, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "DEEPSYNTH_DEBUG"}
    environment.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "deepsynth.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def deepsynth_app(*args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), env={"DEEPSYNTH_DEBUG": None})
    finally:
        os.chdir(old)
    return Ran(result.exit_code, result.stdout, result.stderr)


def the_one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "doc.txt").write_text("alpha: 12\n")
    unknown = root / "unknown-model"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    newer = root / "newer-bundle"
    shutil.copytree(READER, newer)
    spec = json.loads((newer / "deepsynth.json").read_text())
    spec["version"] = 99
    (newer / "deepsynth.json").write_text(json.dumps(spec))
    return root


def test_missing_document_is_one_line(inputs):
    result = deepsynth_app("ask", "missing.txt", "-i", "alpha?", cwd=inputs)
    assert result.returncode == 2  # a bad argument: click's usage exit code
    line = the_one_line(result)
    assert "missing.txt" in line and "--help" in line


def test_missing_data_file_is_one_line(inputs):
    result = deepsynth_app("validate", "missing.jsonl", cwd=inputs)
    assert result.returncode == 1
    assert "missing.jsonl" in the_one_line(result)


def test_unknown_model_type_names_the_file_the_type_and_what_is_supported(inputs):
    result = deepsynth("ask", "doc.txt", "-i", "alpha?", "-m", "unknown-model", cwd=inputs)
    assert result.returncode != 0
    line = the_one_line(result)
    for fact in ("unknown-model/config.json", "'bert'", "deepseek-ocr-2", "deepseek_vl_v2", "image-text-to-text"):
        assert fact in line, fact
    assert len(line) < 800  # not transformers' list of every model type


def test_bad_option_value_is_one_line(inputs):
    result = deepsynth_app("ask", "doc.txt", "-i", "alpha?", "--dtype", "float8", cwd=inputs)
    assert result.returncode == 2
    line = the_one_line(result)
    assert "--dtype" in line and "float8" in line and "bfloat16" in line


def test_unknown_command_is_one_line(inputs):
    result = deepsynth_app("nosuch", cwd=inputs)
    assert result.returncode == 2
    assert "nosuch" in the_one_line(result)


def test_bundle_of_a_newer_version_says_to_upgrade(inputs):
    result = deepsynth("ask", "doc.txt", "-i", "alpha?", "-m", "newer-bundle", cwd=inputs)
    assert result.returncode != 0
    line = the_one_line(result)
    assert "version 99" in line and "upgrade deepsynth" in line and "newer-bundle" in line


def test_debug_shows_the_traceback(inputs):
    for args, env in ((("--debug", "ask", "doc.txt", "-i", "alpha?", "-m", "newer-bundle"), None),
                      (("validate", "missing.jsonl"), {"DEEPSYNTH_DEBUG": "1"})):
        result = deepsynth(*args, cwd=inputs, env=env)
        assert result.returncode != 0
        assert "Traceback (most recent call last)" in result.stderr, (args, result.stderr)
        assert ("BundleError" if "ask" in args else "PrepareError") in result.stderr


def test_the_app_itself_reports_commands_failures_in_one_line(inputs, monkeypatch):
    # The same handling for callers of the typer app (CliRunner here), not only the installed script.
    monkeypatch.chdir(inputs)
    monkeypatch.delenv("DEEPSYNTH_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["validate", "missing.jsonl"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    with_debug = CliRunner().invoke(app, ["--debug", "validate", "missing.jsonl"])
    assert with_debug.exit_code == 1 and with_debug.exception is not None  # raised, traceback and all


def test_messages_of_unexpected_errors_say_how_to_see_more():
    assert describe(FileNotFoundError(2, "No such file or directory", "x.jsonl")) == \
        "no such file or directory: x.jsonl"
    assert describe(ValueError("bad\n  value")) == "bad value"
    bug = describe(KeyError("layers"))
    assert bug.startswith("internal error (KeyError: layers)") and "--debug" in bug
    long = describe(ValueError("Unrecognized model in foo. Should have a `model_type` key in its config.json, "
                               "or contain one of the following strings in its name: " + ", ".join(["x"] * 400)))
    assert long.startswith("Unrecognized model in foo.") and "config.json" in long and len(long) < 300
