"""`deepsynth serve` as provided by deepsynth.serve.cli.register (uvicorn.run replaced by a recorder)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from deepsynth.serve.cli import register


@pytest.fixture()
def run(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.delenv("DEEPSYNTH_API_KEY", raising=False)
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)

    def invoke(*args, env=None):
        return CliRunner().invoke(app, ["serve", *args], env=env), calls

    return invoke


def test_serve_defaults_to_loopback(run):
    res, calls = run("--model", "tiny", "--max-batch-size", "4")
    assert res.exit_code == 0, res.output
    app, kw = calls[0]
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8000
    assert app.state.engine.name == "tiny" and app.state.config.max_batch_size == 4
    assert app.state.config.api_key is None
    assert "warning" not in res.output
    app.state.batcher.stop()


def test_serve_elsewhere_warns_without_key_and_reads_key_from_env(run):
    res, calls = run("--model", "tiny", "--host", "0.0.0.0", "--port", "9001")
    assert res.exit_code == 0 and "without an API key" in res.output
    calls[-1][0].state.batcher.stop()
    res, calls = run("--model", "tiny", "--host", "0.0.0.0", env={"DEEPSYNTH_API_KEY": "k3y"})
    assert res.exit_code == 0 and "without an API key" not in res.output and "k3y" not in res.output
    assert calls[-1][0].state.config.api_key == "k3y"
    calls[-1][0].state.batcher.stop()


def test_serve_bad_options(run, tmp_path):
    res, _ = run("--model", str(tmp_path))
    assert res.exit_code == 2 and "--model" in res.output
    res, _ = run("--model", "tiny", "--port", "70000")
    assert res.exit_code == 2


def test_serve_closes_the_engine_when_the_server_stops(run, monkeypatch):
    """An engine with processes of its own (vLLM) is closed when uvicorn returns, even by an error."""
    import uvicorn

    from deepsynth.inference.engine import InstructionEngine

    closed = []
    monkeypatch.setattr(InstructionEngine, "close", lambda self: closed.append(self.name), raising=False)
    res, calls = run("--model", "tiny")
    assert res.exit_code == 0 and closed == ["tiny"]
    calls[-1][0].state.batcher.stop()

    def crash(app, **kw):
        calls.append((app, kw))
        raise RuntimeError("bind failed")

    monkeypatch.setattr(uvicorn, "run", crash)
    res, calls = run("--model", "tiny")
    assert isinstance(res.exception, RuntimeError) and closed == ["tiny", "tiny"]
    calls[-1][0].state.batcher.stop()


def test_app_closes_only_an_engine_it_owns():
    """`deepsynth serve` builds its app with owns_engine=True: the app's shutdown (which runs before
    uvicorn re-raises SIGTERM) closes the engine; an app around a caller's engine leaves it open."""
    from fastapi.testclient import TestClient

    from deepsynth.inference.engine import InstructionEngine
    from deepsynth.serve import create_app

    class Closable(InstructionEngine):
        closed = 0

        def close(self) -> None:
            self.closed += 1

    engine = Closable("tiny")
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").status_code == 200
    assert engine.closed == 0
    with TestClient(create_app(engine, owns_engine=True)) as client:
        assert client.get("/health").status_code == 200
    assert engine.closed == 1


def test_serve_dtype(run):
    import torch

    res, calls = run("--model", "tiny", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    assert next(calls[-1][0].state.engine.model.parameters()).dtype == torch.bfloat16
    calls[-1][0].state.batcher.stop()
    res, _ = run("--model", "tiny", "--dtype", "float64")
    assert res.exit_code == 2 and "--dtype" in res.output
