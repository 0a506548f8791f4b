"""Fixtures: one tiny engine for the whole package, apps with small limits, a live uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from deepsynth.inference import InstructionEngine
from deepsynth.serve import ServeConfig, create_app

SMALL = dict(max_new_tokens=16, default_new_tokens=6, max_text_chars=5_000, max_pages=4,
             max_image_pixels=1_000_000, max_body_bytes=2_000_000, max_instruction_chars=300)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model runs best on one intra-op thread (see tests/inference/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def engine():
    return InstructionEngine("tiny", render_preset="tiny", cache_pages=64)


@pytest.fixture()
def make_client(engine, monkeypatch):
    """make_client(**config) -> TestClient (lifespan started; closed at the end of the test)."""
    monkeypatch.delenv("DEEPSYNTH_API_KEY", raising=False)
    clients = []

    def make(**overrides):
        config = ServeConfig(**{**SMALL, **overrides})
        client = TestClient(create_app(engine, config), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture()
def client(make_client):
    return make_client()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Run `app` with uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
