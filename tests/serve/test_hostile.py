"""Issue 14's table, the server's rows: each answer is a 4xx (or a correct 200) and the expensive
step is not reached (counted with spies, never timed)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pypdfium2 as pdfium
import pytest
from PIL import ImageFile

from deepsynth.inference.interface import Answer
from deepsynth.models.generate import GenerationSettings
from deepsynth.render import renderer as R
from deepsynth.serve import ServeConfig, create_app
from deepsynth.serve.batcher import Job, MicroBatcher

from inference.helpers import glyph_stream, png_bytes, shared_stream_pdf
from .conftest import SMALL, live_server

DOC = "alpha: 12\nbravo: 34\ndelta: 56\necho: 78"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture()
def asked(engine, monkeypatch):
    """Every batch the model is asked to answer (lists of documents), through the real engine."""
    batches: list[list] = []
    real = engine.ask_batch

    def spy(docs, instructions, settings=None, cancel=None, **kw):
        batches.append(list(docs))
        return real(docs, instructions, settings, cancel=cancel, **kw)

    monkeypatch.setattr(engine, "ask_batch", spy)
    return batches


# --------------------------------------------------------------------------- isolation


class PoisonEngine:
    """Fails any batch holding the instruction "poison", with an exception the batcher has never seen."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def ask_batch(self, docs, instructions, settings, cancel=None, json_schema=None):
        self.calls.append(list(instructions))
        if "poison" in instructions:
            raise KeyError("a page the vision tower cannot read")
        return [Answer(answer=i.upper(), pages=1, visual_tokens=1, prompt_tokens=2, stopped="eos", latency_ms=1.0)
                for i in instructions]


def test_one_bad_job_in_a_micro_batch_fails_only_itself():
    fake = PoisonEngine()
    batcher = MicroBatcher(fake, max_batch_size=5, max_wait_ms=1_000, max_queue=10)
    jobs = [Job(doc=None, instruction=text, settings=GenerationSettings(max_new_tokens=4))
            for text in ("a", "b", "poison", "c", "d")]
    batcher.start()
    try:
        for job in jobs:
            batcher.submit(job)
        results = []
        for job in jobs:
            try:
                results.append(job.future.result(10).answer)
            except KeyError as exc:
                results.append(f"error: {exc}")
    finally:
        batcher.stop()
    assert results == ["A", "B", "error: 'a page the vision tower cannot read'", "C", "D"]
    assert fake.calls[0] == ["a", "b", "poison", "c", "d"]  # one batch, then each alone
    assert sorted(map(tuple, fake.calls[1:])) == [("a",), ("b",), ("c",), ("d",), ("poison",)]


def test_a_model_failure_in_a_live_batch_fails_only_its_request(engine, monkeypatch):
    real = engine.ask_batch

    def fragile(docs, instructions, settings=None, cancel=None, **kw):
        if any(d.text and "POISON" in d.text for d in docs):
            raise RuntimeError("the model cannot read this document")
        return real(docs, instructions, settings, cancel=cancel, **kw)

    monkeypatch.setattr(engine, "ask_batch", fragile)
    app = create_app(engine, ServeConfig(**{**SMALL, "max_batch_size": 5, "max_wait_ms": 500}))
    texts = [f"alpha: {10 + i}" for i in range(4)]
    texts.insert(2, "POISON page")
    with live_server(app) as base:
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda t: post(base + "/api/inference/instruct",
                                                   {"text": t, "instruction": "alpha?", "max_new_tokens": 3}), texts))
    statuses = [status for status, _ in results]
    assert statuses == [200, 200, 500, 200, 200], results
    assert max(body.get("batch_size", 0) for _, body in results) >= 2  # they were batched together


def test_a_one_pixel_wide_page_batched_with_good_ones_fails_alone_with_a_4xx(engine, asked):
    app = create_app(engine, ServeConfig(**{**SMALL, "max_batch_size": 5, "max_wait_ms": 300}))
    sliver = png_bytes(1, 16_000)
    assert len(sliver) < 200
    bodies = [{"pages": [b64(png_bytes(64, 64, (i * 40, 0, 0)))], "instruction": "Q", "max_new_tokens": 2}
              for i in range(4)]
    bodies.insert(1, {"pages": [b64(sliver)], "instruction": "Q", "max_new_tokens": 2})
    with live_server(app) as base:
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda b: post(base + "/api/inference/instruct", b), bodies))
    assert [status for status, _ in results] == [200, 422, 200, 200, 200], results
    error = results[1][1]
    assert error["field"] == "pages[0]" and "min_image_side" in error["message"] and error["limit"] == 8
    assert sum(len(batch) for batch in asked) == 4  # the sliver never reached the model


# --------------------------------------------------------------------------- cost budget per document


def test_a_sixteen_thousand_character_word_is_refused_at_the_page_limit(make_client, monkeypatch, asked):
    lines: list[str] = []
    original = R.line_metrics
    monkeypatch.setattr(R, "line_metrics", lambda text, style: lines.append(text) or original(text, style))
    client = make_client(max_text_chars=20_000)
    r = client.post("/api/inference/instruct", json={"text": "w" * 16_000, "instruction": "Q"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "text" and body["limit"] == 4 and "max_pages" in body["message"]
    assert len(lines) == 4 * 4 + 1  # four pages of four lines, and the line that opened page 5
    assert asked == []


@pytest.fixture(scope="module")
def glyph_bomb() -> bytes:
    return shared_stream_pdf(16, glyph_stream(10_000_000))


def test_a_pdf_sharing_a_ten_million_glyph_stream_is_refused_before_parsing(make_client, monkeypatch, glyph_bomb,
                                                                             asked):
    opened = []
    original = pdfium.PdfDocument.__init__
    monkeypatch.setattr(pdfium.PdfDocument, "__init__",
                        lambda self, *a, **k: opened.append(1) or original(self, *a, **k))
    client = make_client()
    r = client.post("/api/inference/instruct", json={"pdf": b64(glyph_bomb), "instruction": "Q"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "pdf" and body["limit"] == 2_000_000 and "max_pdf_content_bytes" in body["message"]
    assert opened == [] and asked == []


def test_huge_pages_are_cached_at_the_size_the_model_reads(make_client, engine):
    engine.cache.clear()
    client = make_client(max_pages=4, max_image_pixels=16_000_000)
    pages = [b64(png_bytes(4_000, 4_000, (i * 30, 0, 0))) for i in range(4)]
    r = client.post("/api/render", json={"pages": pages})
    assert r.status_code == 200, r.text
    assert r.json()["pages"] == 4
    # 4 full-size pages would hold 192 MB; what is kept is 4 pages of 256 x 256
    assert engine.cache.stats.bytes == 4 * 256 * 256 * 3


def test_many_huge_pages_in_one_request_are_refused_before_decoding(make_client, monkeypatch, asked):
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    client = make_client(max_pages=16, max_image_pixels=16_000_000, max_body_bytes=16_000_000)
    page = b64(png_bytes(4_000, 4_000))
    r = client.post("/api/inference/instruct", json={"pages": [page] * 5, "instruction": "Q"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "pages" and body["limit"] == 64_000_000 and "max_total_pixels" in body["message"]
    assert decoded == [] and asked == []


# --------------------------------------------------------------------------- cancellation


@pytest.fixture()
def gated(engine, monkeypatch):
    """The model waits until its request is cancelled, then generates: what it answered is recorded."""
    state = {"entered": threading.Event(), "answers": [], "cancel_seen": threading.Event()}
    real = engine.ask_batch

    def wait_for_cancel(docs, instructions, settings=None, cancel=None, **kw):
        state["entered"].set()
        if cancel is not None:
            for _ in range(400):
                if cancel.is_set():
                    state["cancel_seen"].set()
                    break
                threading.Event().wait(0.05)
        answers = real(docs, instructions, settings, cancel=cancel, **kw)
        state["answers"].extend(answers)
        return answers

    monkeypatch.setattr(engine, "ask_batch", wait_for_cancel)
    return state


def test_a_plain_request_whose_client_left_is_cancelled(engine, gated):
    app = create_app(engine, ServeConfig(**SMALL))
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"text": DOC, "instruction": "alpha?", "max_new_tokens": 16}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /api/inference/instruct HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert gated["entered"].wait(20)
        sock.close()  # the client leaves while the model works
        assert gated["cancel_seen"].wait(20)
        wait_for_answer(gated)
    (answer,) = gated["answers"]
    assert answer.stopped == "cancelled" and answer.new_tokens < 16  # it did not run on to max_new_tokens


def wait_for_answer(gated, tries: int = 200) -> None:
    """Waits (up to `tries` x 50 ms) for the gated engine to record its cancelled answer."""
    for _ in range(tries):
        if gated["answers"]:
            return
        threading.Event().wait(0.05)


def test_a_request_answered_504_is_cancelled(engine, gated):
    app = create_app(engine, ServeConfig(**{**SMALL, "request_timeout_s": 0.5}))
    with live_server(app) as base:
        status, body = post(base + "/api/inference/instruct", {"text": DOC, "instruction": "a?", "max_new_tokens": 16})
        assert status == 504 and body["error"] == "timeout" and body["limit"] == 0.5
        assert gated["cancel_seen"].wait(20)
        wait_for_answer(gated)
    (answer,) = gated["answers"]
    assert answer.stopped == "cancelled" and answer.new_tokens < 16


# --------------------------------------------------------------------------- key and Host


def test_with_a_key_every_route_but_health_and_the_ui_needs_it(make_client):
    client = make_client(api_key="s3cret-key")
    for path in ("/metrics", "/docs", "/openapi.json", "/redoc", "/api/templates", "/docs/oauth2-redirect"):
        r = client.get(path)
        assert r.status_code == 401, path
        assert r.json()["field"] == "Authorization" and "s3cret" not in r.text
    auth = {"Authorization": "Bearer s3cret-key"}
    for path in ("/metrics", "/docs", "/openapi.json", "/api/templates"):
        assert client.get(path, headers=auth).status_code == 200, path
    for path in ("/health", "/", "/static/app.js", "/static/favicon.svg"):
        assert client.get(path).status_code == 200, path


def test_host_header_is_checked_on_loopback(engine):
    app = create_app(engine, ServeConfig(**SMALL))
    with live_server(app) as base:
        port = base.rsplit(":", 1)[1]
        status, body = get(base + "/health", {"Host": "rebound.attacker.example"})
        assert status == 400 and body["error"] == "host_not_allowed" and body["field"] == "Host"
        assert "DEEPSYNTH_ALLOWED_HOSTS" in body["message"]
        status, body = post(base + "/api/inference/instruct", {"text": DOC, "instruction": "Q"},
                            {"Host": f"rebound.attacker.example:{port}"})
        assert status == 400
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
            assert get(base + "/health", {"Host": host})[0] == 200, host


def test_the_host_allow_list_is_configurable(make_client, monkeypatch):
    client = make_client(allowed_hosts=("api.example.com",))
    assert client.get("/health").status_code == 400  # TestClient sends Host: testserver
    assert client.get("/health", headers={"Host": "API.example.com:443"}).status_code == 200
    assert make_client(allowed_hosts=("*",)).get("/health").status_code == 200
    monkeypatch.setenv("DEEPSYNTH_ALLOWED_HOSTS", "docs.internal, testserver")
    assert ServeConfig.from_env().allowed_hosts == ("docs.internal", "testserver")
    with pytest.raises(ValueError, match="allowed_hosts is empty"):
        ServeConfig(allowed_hosts=(" ",))
