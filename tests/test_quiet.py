"""The happy path of every command prints no warning: `prepare`, `train` (LoRA, gradient
checkpointing and a text-encoder instruction channel: the paths where libraries warned), `evaluate`,
`predict`, `ask` (the shipped reader and a soft-prompt model) and, in the slow tier, `prepare
--engine ray` and `serve`. Each runs as its own process with every warning turned into an error
(PYTHONWARNINGS=error reaches warnings raised while modules import, too); the few library warnings
about paths we take on purpose are ignored by name in `deepsynth.quiet_known_warnings`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prepare_helpers import squad_rows

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`deepsynth ARGS` in a fresh process with warnings as errors; asserts it succeeded and its
    stderr names no warning."""
    proc = subprocess.run([sys.executable, "-m", "deepsynth.cli", *args], capture_output=True, text=True,
                          env=quiet_env(), timeout=timeout)
    assert proc.returncode == 0, f"deepsynth {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    # transformers prints its logged warnings as "[transformers] ..." (its own handler), and as
    # "WARNING transformers...." where its records reach the root logger as well.
    for mark in ("Warning", "WARNING", "[transformers]"):
        assert mark not in proc.stderr, proc.stderr[-3000:]
    return proc


def quiet_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("quiet")
    src = tmp / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in squad_rows(4)), encoding="utf-8")
    cli("prepare", str(src), "-o", str(tmp / "prepared"), "--render", "--preset", "tiny",
        "--cache-dir", str(tmp / "hf-cache"))
    assert (tmp / "prepared" / "manifest.json").is_file()
    return tmp / "prepared"


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """Two steps of LoRA with gradient checkpointing and a frozen text encoder, validated on the
    folder (generation from inputs_embeds during training)."""
    tmp = tmp_path_factory.mktemp("quiet-run")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name": "form-reader", "output_dir": str(tmp / "run"), "batch_size": 2, "max_steps": 2,
        "learning_rate": 1e-3, "render_preset": "tiny", "log_interval": 1, "eval_max_new_tokens": 4, "seed": 3,
        "max_length": 1024, "use_lora": True, "gradient_checkpointing": True, "use_text_encoder": True,
        "text_encoder_model": MINILM}))
    out = cli("train", str(recipe), "--train", str(prepared), "--eval", str(prepared))
    metrics = json.loads(out.stdout[out.stdout.index("{"):])["metrics"]
    assert metrics["train_steps"] == 2
    assert (Path(metrics["final_model"]) / "text_projection.safetensors").is_file()
    return Path(metrics["final_model"])


def test_prepare_and_train_are_quiet(trained):
    assert (trained / "deepsynth.json").is_file()


def test_evaluate_and_predict_are_quiet(prepared, trained, tmp_path):
    cli("evaluate", str(prepared), "-m", str(trained), "-o", str(tmp_path / "eval.json"), "--no-record")
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["n"] == 4
    cli("predict", str(prepared), "-m", "form-reader", "-o", str(tmp_path / "pred.jsonl"))
    assert len((tmp_path / "pred.jsonl").read_text(encoding="utf-8").splitlines()) == 4


def test_ask_is_quiet_with_the_shipped_reader_and_a_soft_prompt_model(trained, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Invoice 42. Total: 17 EUR. Paid by Alice.", encoding="utf-8")
    for model in ([], ["-m", str(trained)]):
        out = cli("ask", str(doc), "-i", "Who paid?", *model)
        assert out.stdout.strip()


@pytest.mark.slow
def test_prepare_with_the_ray_engine_is_quiet(tmp_path):
    pytest.importorskip("ray")
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in squad_rows(4)), encoding="utf-8")
    # A Ray instance of its own: without an address ray.init joins one already running on the machine.
    cli("prepare", str(src), "-o", str(tmp_path / "prepared"), "--render", "--preset", "tiny",
        "--cache-dir", str(tmp_path / "hf-cache"), "--engine", "ray", "--address", "local", timeout=600)
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())


@pytest.mark.slow
def test_serve_answers_one_request_quietly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "deepsynth.cli", "serve", "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=stderr, env=quiet_env())
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, err.read_text()
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the server did not start in 120 s"
                    time.sleep(0.5)
            body = json.dumps({"model": "tiny-reader", "messages": [{"role": "user", "content": "Who paid?"}],
                               "document": {"text": "Invoice 42 paid by Alice."}, "max_tokens": 8}).encode()
            request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
            assert answer["choices"][0]["message"]["content"] is not None
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    text = err.read_text()
    assert "Warning" not in text and "WARNING" not in text and "Traceback" not in text, text[-3000:]
