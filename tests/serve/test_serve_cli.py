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
