"""The OpenAI-compatible API (/v1) through the official openai client against a live uvicorn server:
plain, streamed and JSON-schema requests, image parts and the document extension, the same answers
as our API, and errors in OpenAI's shape naming the field and limit."""

from __future__ import annotations

import base64
import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from deepsynth.inference.templates import EXTRACT_SCHEMA
from deepsynth.serve import ServeConfig, create_app
from inference.helpers import png_bytes, text_pdf

from .conftest import SMALL, live_server

DOC = "Invoice 77. Total: 42 dollars, paid by Ada Lovelace on 3 March 2024."
KEY = "s3cret-key"
LIMITS = {**SMALL, "max_new_tokens": 64}


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, ServeConfig(**LIMITS, api_key=KEY))
    with live_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def ours(base: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(base + "/api/inference/instruct", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_plain_completion_equals_our_api(client, server):
    r = client.chat.completions.create(model="tiny", max_tokens=8, messages=[
        {"role": "system", "content": "You read invoices."},
        {"role": "user", "content": "What is the total?"}], extra_body={"document": {"text": DOC}})
    ref = ours(server, {"text": DOC, "instruction": "What is the total?", "max_new_tokens": 8})
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref["answer"]
    assert choice.finish_reason == ("length" if ref["stopped"] == "max_new_tokens" else "stop")
    assert r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.usage.completion_tokens == ref["new_tokens"] and r.usage.prompt_tokens == ref["prompt_tokens"]
    assert r.model_extra["deepsynth"]["pages"] == ref["pages"]


def test_image_parts_and_pdf_document(client, server):
    page = png_bytes(60, 80)
    r = client.chat.completions.create(model="tiny", max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(page)}},
        {"type": "text", "text": "What does the page say?"}]}])
    ref = ours(server, {"pages": [data_url(page)], "instruction": "What does the page say?", "max_new_tokens": 6})
    assert r.choices[0].message.content == ref["answer"] and r.model_extra["deepsynth"]["pages"] == 1
    pdf = base64.b64encode(text_pdf(["Total: 42"])).decode()
    r = client.chat.completions.create(model="tiny", max_tokens=6, messages=[{"role": "user", "content": "Total?"}],
                                       extra_body={"document": {"pdf": pdf}})
    assert r.choices[0].message.content == ours(server, {"pdf": pdf, "instruction": "Total?",
                                                         "max_new_tokens": 6})["answer"]


def test_streamed_completion(client, server):
    stream = client.chat.completions.create(model="tiny", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Who paid?"}],
                                            extra_body={"document": {"text": DOC}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    ref = ours(server, {"text": DOC, "instruction": "Who paid?", "max_new_tokens": 10})
    assert text.strip() == ref["answer"]
    assert len(finishes) == 1 and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == ref["new_tokens"]


def test_json_schema_answers_validate(client):
    for stream in (False, True):
        kwargs = dict(model="tiny", max_tokens=60, messages=[{"role": "user", "content": "Extract them."}],
                      response_format={"type": "json_schema", "json_schema": {"name": "extract",
                                                                              "schema": EXTRACT_SCHEMA}},
                      extra_body={"document": {"text": DOC}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True,
                                                                                                    **kwargs)
                           if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), EXTRACT_SCHEMA)
    r = client.chat.completions.create(model="tiny", max_tokens=20, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "As JSON."}],
                                       extra_body={"document": {"text": DOC}})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_errors_name_the_field_and_limit(client, server):
    def error(**kwargs) -> openai.APIStatusError:
        kwargs.setdefault("model", "tiny")
        kwargs.setdefault("messages", [{"role": "user", "content": "Q?"}])
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(**kwargs)
        return err.value

    e = error(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/page.png"}},
        {"type": "text", "text": "Q?"}]}])
    assert e.status_code == 400 and e.body["code"] == "remote_url_refused"
    assert e.body["param"] == "messages[0].content[0].image_url.url" and "data:" in e.body["message"]
    e = error(model="gpt-4o", extra_body={"document": {"text": DOC}})
    assert e.status_code == 404 and e.body["param"] == "model" and "tiny" in e.body["message"]
    e = error(max_tokens=LIMITS["max_new_tokens"] + 1, extra_body={"document": {"text": DOC}})
    assert e.status_code == 422 and e.body["param"] == "max_tokens" and e.body["limit"] == LIMITS["max_new_tokens"]
    e = error()
    assert e.status_code == 422 and e.body["param"] == "document"
    e = error(extra_body={"document": {"text": "x" * (LIMITS["max_text_chars"] + 1)}})
    assert e.status_code == 422 and e.body["param"] == "document.text" and e.body["limit"] == LIMITS["max_text_chars"]
    e = error(n=2, extra_body={"document": {"text": DOC}})
    assert e.status_code == 422 and e.body["param"] == "n"
    e = error(max_tokens=8, extra_body={"document": {"text": DOC}},
              response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": EXTRACT_SCHEMA}})
    assert e.status_code == 422 and e.body["code"] == "invalid_schema" and "max_new_tokens" in e.body["message"]
    e = error(extra_body={"document": {"text": DOC}}, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}}})
    assert e.status_code == 422 and e.body["param"] == "response_format.json_schema.schema.properties.n.maximum"
    unauthorized = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        unauthorized.models.list()
    assert err.value.body["param"] == "Authorization" and KEY not in str(err.value.body)


def test_v1_body_limit_and_shape_without_a_live_server(engine):
    with TestClient(create_app(engine, ServeConfig(**SMALL))) as c:
        r = c.post("/v1/chat/completions", content=b"x" * (SMALL["max_body_bytes"] + 1),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        assert r.json()["error"]["limit"] == SMALL["max_body_bytes"]
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
