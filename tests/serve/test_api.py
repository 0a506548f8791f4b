"""HTTP API with the tiny model: endpoints, auth, limits, malformed input, errors without secrets."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from deepsynth.inference.templates import TEMPLATES
from inference.helpers import image_pdf, png_bomb, png_bytes, text_pdf

DOC = "Invoice 77. Total: 42 dollars, paid by Ada Lovelace on 3 March 2024."
ANSWER_KEYS = {"answer", "instruction", "pages", "visual_tokens", "prompt_tokens", "text_tokens", "compression",
               "stopped", "new_tokens", "latency_ms", "model_ms", "batch_size", "cached", "model", "render"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(resp, status: int, field: str | None = None, limit=None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "field", "message", "limit"}
    if field is not None:
        assert body["field"] == field, body
    if limit is not None:
        assert body["limit"] == limit, body
    if code is not None:
        assert body["error"] == code, body
    assert "Traceback" not in resp.text
    return body


def sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_instruct_text_answer_fields(client):
    r = client.post("/api/inference/instruct", json={"text": DOC, "instruction": "What is the total?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == ANSWER_KEYS
    assert body["model"] == "tiny" and body["instruction"] == "What is the total?"
    assert body["pages"] >= 1 and body["visual_tokens"] == 17 * body["pages"]
    assert body["compression"] == round(body["text_tokens"] / body["visual_tokens"], 3)
    assert body["new_tokens"] <= 6  # default_new_tokens of the test config
    again = client.post("/api/inference/instruct", json={"text": DOC, "instruction": "Who paid?"}).json()
    assert again["cached"] is True


def test_instruct_pages_pdf_markdown_and_templates(client):
    pages = [b64(png_bytes()), "data:image/png;base64," + b64(png_bytes(40, 40, (0, 0, 0)))]
    r = client.post("/api/inference/instruct", json={"pages": pages, "template": "summary"})
    assert r.status_code == 200, r.text
    assert r.json()["pages"] == 2 and r.json()["compression"] is None
    assert r.json()["instruction"] == "Summarize the document."
    r = client.post("/api/inference/instruct", json={"pdf": b64(text_pdf(["Total: 42"])), "template": "question",
                                                     "input": "What is the total?"})
    assert r.status_code == 200 and r.json()["instruction"] == "What is the total?"
    assert r.json()["text_tokens"] == len("Total: 42")
    r = client.post("/api/inference/instruct", json={"pdf": b64(image_pdf(2)), "instruction": "What?"})
    assert r.status_code == 200 and r.json()["pages"] == 2
    r = client.post("/api/inference/instruct", json={"text": "# Title\n\n- a\n- b", "markdown": True,
                                                     "template": "key_points", "temperature": 0.7})
    assert r.status_code == 200
    assert_error(client.post("/api/inference/instruct", json={"text": DOC, "template": "question"}), 422, "input")
    assert_error(client.post("/api/inference/instruct", json={"text": DOC, "template": "nope"}), 422, "template")


def test_summarize(client):
    for focus, words in (("general", "Summarize the document"), ("financial", "financial"),
                         ("key_points", "key points")):
        r = client.post("/api/inference/summarize", json={"text": DOC, "focus": focus, "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        assert words in r.json()["instruction"]
    assert_error(client.post("/api/inference/summarize", json={"text": DOC, "focus": "poetry"}), 422, "focus")


def test_render_previews(client):
    r = client.post("/api/render", json={"text": DOC, "thumbnail_px": 64})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "text" and body["pages"] == len(body["thumbnails"]) >= 1
    assert all(t.startswith("data:image/png;base64,") for t in body["thumbnails"])
    assert body["visual_tokens"] == 17 * body["pages"]
    assert body["compression"] == round(body["text_tokens"] / body["visual_tokens"], 3)
    from PIL import Image
    import io

    thumb = Image.open(io.BytesIO(base64.b64decode(body["thumbnails"][0].split(",", 1)[1])))
    assert max(thumb.size) == 64
    assert_error(client.post("/api/render", json={"text": DOC, "thumbnail_px": 5000}), 422, "thumbnail_px", 1024)


def test_stream_events(client):
    with client.stream("POST", "/api/inference/instruct",
                       json={"text": DOC, "instruction": "Total?", "stream": True, "max_new_tokens": 8}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = sse(text)
    assert events[0][0] == "start" and events[-1][0] == "done"
    tokens = "".join(d["text"] for name, d in events if name == "token")
    done = events[-1][1]
    assert set(done) == ANSWER_KEYS
    assert tokens.strip() == done["answer"] or done["stopped"] == "loop"
    plain = client.post("/api/inference/instruct", json={"text": DOC, "instruction": "Total?", "max_new_tokens": 8})
    assert plain.json()["answer"] == done["answer"]
    # errors before the stream starts are ordinary JSON errors
    assert_error(client.post("/api/inference/instruct", json={"text": "", "instruction": "Q", "stream": True}),
                 422, "text")


def test_templates_health_metrics_docs(client):
    t = client.get("/api/templates").json()["templates"]
    assert [x["id"] for x in t] == [x.id for x in TEMPLATES]
    assert {"question", "summary", "financial_summary", "key_points", "extract", "custom"} <= {x["id"] for x in t}
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and h["auth_required"] is False
    client.post("/api/inference/instruct", json={"text": DOC, "instruction": "Q?"})
    m = client.get("/metrics")
    assert m.status_code == 200 and "text/plain" in m.headers["content-type"]
    for name in ("deepsynth_requests_total", "deepsynth_request_seconds", "deepsynth_queue_depth",
                 "deepsynth_batch_size", "deepsynth_document_cache_hits", "deepsynth_generated_tokens_total"):
        assert name in m.text
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/api/inference/instruct", "/api/inference/summarize", "/api/render", "/api/templates", "/health",
            "/metrics"} <= paths
    # the spec carries the server's limits
    schema = json.dumps(spec["components"]["schemas"])
    assert '"maximum": 16' in schema and '"maxLength": 5000' in schema
    assert client.get("/docs").status_code == 200
    ui = client.get("/")
    assert ui.status_code == 200 and "Content-Security-Policy" in ui.headers and "<select id=\"template\"" in ui.text
    assert client.get("/static/app.js").status_code == 200


def test_api_key(make_client, monkeypatch):
    monkeypatch.setenv("DEEPSYNTH_API_KEY", "s3cret-key")
    from deepsynth.serve import ServeConfig, create_app
    from fastapi.testclient import TestClient

    config = ServeConfig.from_env(max_new_tokens=8, default_new_tokens=4)
    assert config.api_key == "s3cret-key" and "s3cret" not in repr(config)
    engine = make_client().app.state.engine
    with TestClient(create_app(engine, config)) as c:
        body = {"text": DOC, "instruction": "Q?"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}):
            r = c.post("/api/inference/instruct", json=body, headers=headers)
            assert_error(r, 401, "Authorization", code="unauthorized")
            assert r.headers["WWW-Authenticate"] == "Bearer" and "s3cret" not in r.text
        assert c.get("/api/templates").status_code == 401
        ok = {"Authorization": "Bearer s3cret-key"}
        assert c.post("/api/inference/instruct", json=body, headers=ok).status_code == 200
        assert c.get("/api/templates", headers=ok).status_code == 200
        assert c.get("/health").json()["auth_required"] is True  # health and UI stay open
        assert c.get("/").status_code == 200
        # auth is checked before the body is read: a huge unauthorised body is refused with 401
        r = c.post("/api/render", content=b"x" * 10, headers={"content-type": "application/json"})
        assert r.status_code == 401


def test_limits_name_field_and_limit(client):
    url = "/api/inference/instruct"
    assert_error(client.post(url, json={"text": "x" * 5001, "instruction": "Q"}), 422, "text", 5000)
    assert_error(client.post(url, json={"text": DOC, "instruction": "Q" * 301}), 422, "instruction", 300)
    assert_error(client.post(url, json={"text": DOC, "instruction": "Q", "max_new_tokens": 17}), 422,
                 "max_new_tokens", 16)
    assert_error(client.post(url, json={"text": DOC, "instruction": "Q", "max_new_tokens": 0}), 422,
                 "max_new_tokens", 1)
    assert_error(client.post(url, json={"text": DOC, "instruction": "Q", "temperature": 5}), 422, "temperature", 2.0)
    pages = [b64(png_bytes(8, 8))] * 5
    assert_error(client.post(url, json={"pages": pages, "instruction": "Q"}), 422, "pages", 4)
    # text that renders to more pages than allowed
    assert_error(client.post(url, json={"text": "word " * 900, "instruction": "Q"}), 422, "text", 4)
    assert_error(client.post(url, json={"pdf": b64(text_pdf(["a"] * 5)), "instruction": "Q"}), 422, "pdf", 4)
    # pixels: a large image, and a decompression bomb (refused from its header, never decoded)
    assert_error(client.post(url, json={"pages": [b64(png_bytes(1100, 1000))], "instruction": "Q"}), 422,
                 "pages[0]", 1_000_000)
    assert_error(client.post(url, json={"pages": [b64(png_bytes()), b64(png_bomb())], "instruction": "Q"}), 422,
                 "pages[1]", 1_000_000)
    # the model cannot be chosen by a request
    body = assert_error(client.post(url, json={"text": DOC, "instruction": "Q", "model": "other"}), 422, "model")
    assert "fixed" in body["message"]


def test_body_size_limit(client):
    big = json.dumps({"text": "x" * 2_100_000, "instruction": "Q"}).encode()
    assert_error(client.post("/api/inference/instruct", content=big, headers={"content-type": "application/json"}),
                 413, "body", 2_000_000, code="body_too_large")

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(30):
            yield b"x" * 100_000

    r = client.post("/api/render", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body", 2_000_000)


@pytest.mark.parametrize("raw,status,field", [
    (b"{bad json", 400, "body"),
    (b"", 422, "body"),
    (b"[1, 2]", 422, "body"),
    (b'"text"', 422, "body"),
    (b'{"text": 5, "instruction": "Q"}', 422, "text"),
    (b'{"text": "a", "instruction": ["Q"]}', 422, "instruction"),
    (b'{"text": "a", "instruction": "Q", "max_new_tokens": "many"}', 422, "max_new_tokens"),
    (b'{"text": "a", "instruction": "Q", "stream": {"a": 1}}', 422, "stream"),
    (b'{"pages": "not-a-list", "instruction": "Q"}', 422, "pages"),
    (b'{"pages": [], "instruction": "Q"}', 422, "pages"),
    (b'{"pages": ["@@@"], "instruction": "Q"}', 422, "pages[0]"),
    (b'{"pages": ["aGVsbG8="], "instruction": "Q"}', 422, "pages[0]"),
    (b'{"pdf": "aGVsbG8=", "instruction": "Q"}', 422, "pdf"),
    (b'{"pdf": "JVBERi0xLjQgYnJva2Vu", "instruction": "Q"}', 422, "pdf"),
    (b'{"text": "a", "pdf": "JVBERi0=", "instruction": "Q"}', 422, "pdf"),
    (b'{"instruction": "Q"}', 422, "text"),
    (b'{"text": "a"}', 422, "instruction"),
    (b'{"text": "   ", "instruction": "Q"}', 422, "text"),
])
def test_malformed_requests(client, raw, status, field):
    r = client.post("/api/inference/instruct", content=raw, headers={"content-type": "application/json"})
    assert_error(r, status, field)


def test_wrong_method_and_path(client):
    assert_error(client.get("/api/inference/instruct"), 405)
    assert_error(client.post("/api/nope", json={}), 404)


def test_internal_errors_hide_details(make_client, caplog, monkeypatch):
    """The answer names only a request id; the log line has that id and the exception's message,
    with the API key and bearer tokens redacted (issue 14: a 500 must be diagnosable)."""
    client = make_client(api_key="k3y-do-not-log")
    auth = {"Authorization": "Bearer k3y-do-not-log"}
    engine = client.app.state.engine

    def boom(*args, **kwargs):
        raise RuntimeError("secret-detail /home/user/key.txt k3y-do-not-log Bearer hf_abcdef123")

    monkeypatch.setattr(engine, "ask_batch", boom)
    monkeypatch.setattr(engine, "ask", boom)
    with caplog.at_level(logging.DEBUG):
        r = client.post("/api/inference/instruct", json={"text": DOC, "instruction": "Q?"}, headers=auth)
        body = assert_error(r, 500, code="internal_error")
        assert "secret" not in r.text and "RuntimeError" not in r.text
        monkeypatch.setattr(engine, "visual_token_count", boom)
        r = client.post("/api/render", json={"text": DOC}, headers=auth)
        render_body = assert_error(r, 500, code="internal_error")
        assert "secret" not in r.text
    logged = "\n".join(rec.getMessage() + (rec.exc_text or "") for rec in caplog.records)
    assert "RuntimeError: secret-detail /home/user/key.txt" in logged  # the message, for diagnosis
    assert "k3y-do-not-log" not in logged and "hf_abcdef123" not in logged and "[redacted]" in logged
    assert "Traceback" not in logged
    assert all(rec.exc_info is None for rec in caplog.records)
    for answer in (body, render_body):
        request_id = answer["message"].split("request id ")[1].rstrip(")")
        assert f"request {request_id}" in logged  # the id ties the answer to the log line
    assert r.headers["X-Request-ID"] == request_id
    assert client.get("/health").json()["status"] == "ok"


def test_structured_output_in_our_api(make_client):
    import jsonschema

    from deepsynth.inference.templates import EXTRACT_SCHEMA

    client = make_client(max_new_tokens=64)
    templates = {t["id"]: t for t in client.get("/api/templates").json()["templates"]}
    assert templates["extract"]["json_schema"] == EXTRACT_SCHEMA and templates["summary"]["json_schema"] is None
    r = client.post("/api/inference/instruct", json={"text": DOC, "template": "extract", "structured": True,
                                                     "max_new_tokens": 50})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["answer"]), EXTRACT_SCHEMA)
    schema = {"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}
    for stream in (False, True):
        r = client.post("/api/inference/instruct", json={"text": DOC, "instruction": "Total?", "json_schema": schema,
                                                         "max_new_tokens": 20, "stream": stream})
        answer = r.json()["answer"] if not stream else sse(r.text)[-1][1]["answer"]
        jsonschema.validate(json.loads(answer), schema)
    r = client.post("/api/inference/summarize", json={"text": DOC, "json_schema": schema, "max_new_tokens": 20})
    jsonschema.validate(json.loads(r.json()["answer"]), schema)
    # refused with the field and the reason: too small a budget, unenforced keywords, no schema to use
    body = assert_error(client.post("/api/inference/instruct", json={
        "text": DOC, "template": "extract", "structured": True, "max_new_tokens": 10}), 422, "template",
        code="invalid_schema")
    assert "max_new_tokens" in body["message"]
    assert_error(client.post("/api/inference/instruct", json={
        "text": DOC, "instruction": "Q?", "json_schema": {"type": "string", "format": "date"}}), 422,
        "json_schema.format", code="invalid_schema")
    assert_error(client.post("/api/inference/instruct", json={
        "text": DOC, "template": "summary", "structured": True}), 422, "structured")


def test_docs_assets_are_served_locally(make_client):
    client = make_client(api_key="k")
    auth = {"Authorization": "Bearer k"}
    page = client.get("/docs", headers=auth).text
    assert "/static-docs/swagger-ui-bundle.js" in page and "/static-docs/swagger-ui.css" in page
    assert "cdn" not in page.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = client.get(f"/static-docs/{asset}")  # public library files: open like the web page's
        assert r.status_code == 200 and len(r.content) > 10_000
    assert "cdn" not in client.get("/redoc", headers=auth).text.lower()
    spec = client.get("/openapi.json", headers=auth).json()
    assert {"/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
