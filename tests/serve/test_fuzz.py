"""Property-based fuzzing of the request schema: every answer is a 2xx or a JSON 4xx naming a field;
never a 500, never a stack trace, and the server stays healthy throughout."""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from inference.helpers import png_bytes, text_pdf

FIELDS = ["text", "markdown", "pages", "pdf", "instruction", "template", "input", "max_new_tokens", "temperature",
          "stream", "focus", "thumbnail_px", "model"]
ROUTES = ["/api/inference/instruct", "/api/inference/summarize", "/api/render"]
PNG = base64.b64encode(png_bytes(16, 16)).decode()
PDF = base64.b64encode(text_pdf(["Total: 42"])).decode()

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False),
                    st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=8)
# Values that are often close to valid, so that the fuzzer gets past the first check.
plausible = {
    "text": st.one_of(st.text(max_size=200), st.just("Total: 42 dollars.")),
    "markdown": st.booleans(),
    "pages": st.one_of(st.lists(st.sampled_from([PNG, "data:image/png;base64," + PNG, "!!", "", "aGk="]),
                                max_size=6), json_values),
    "pdf": st.one_of(st.sampled_from([PDF, "JVBERi0xLjQ=", "", "%%%"]), json_values),
    "instruction": st.one_of(st.text(max_size=60), st.just("What is the total?")),
    "template": st.one_of(st.sampled_from(["question", "summary", "custom", "extract", "bogus"]), json_values),
    "input": st.text(max_size=30),
    "max_new_tokens": st.one_of(st.integers(-5, 40), json_values),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "focus": st.sampled_from(["general", "financial", "key_points", "other"]),
    "thumbnail_px": st.integers(0, 2000),
    "model": st.text(max_size=10),
}
random_bodies = st.fixed_dictionaries({}, optional={k: st.one_of(v, json_values) for k, v in plausible.items()})
# A valid document, with options of the route (plausible, not always valid) on top.
documents = st.sampled_from([{"text": "Total: 42 dollars."}, {"pages": [PNG]}, {"pdf": PDF},
                             {"text": "# Invoice\n\n- total: 42", "markdown": True}])
OPTIONS = {
    "max_new_tokens": st.integers(-2, 20), "temperature": st.floats(-0.5, 2.5, allow_nan=False),
    "stream": st.booleans(), "template": st.sampled_from(["question", "summary", "bogus"]),
    "input": st.text(max_size=20), "focus": st.sampled_from(["general", "financial", "other"]),
    "thumbnail_px": st.integers(0, 2000), "instruction": st.text(max_size=30),
}
ROUTE_OPTIONS = {
    "/api/inference/instruct": ("max_new_tokens", "temperature", "stream", "template", "input", "instruction"),
    "/api/inference/summarize": ("max_new_tokens", "temperature", "stream", "focus"),
    "/api/render": ("thumbnail_px",),
}


@st.composite
def requests(draw):
    route = draw(st.sampled_from(ROUTES))
    if draw(st.booleans()):
        return route, draw(random_bodies), draw(extra)
    body = {**draw(documents), **({"instruction": "Total?"} if route.endswith("instruct") else {})}
    body.update(draw(st.fixed_dictionaries({}, optional={k: OPTIONS[k] for k in ROUTE_OPTIONS[route]})))
    return route, body, {}


extra = st.one_of(st.just({}), st.dictionaries(st.text(max_size=10).filter(lambda k: k not in FIELDS), json_values,
                                               min_size=1, max_size=2))


def check(resp) -> None:
    event(f"HTTP {resp.status_code}")
    assert resp.status_code in (200, 400, 401, 413, 422), (resp.status_code, resp.text[:300])
    assert "Traceback" not in resp.text
    if resp.status_code != 200:
        body = resp.json()
        assert set(body) == {"error", "field", "message", "limit"} and body["field"], body
    elif resp.headers["content-type"].startswith("application/json"):
        assert isinstance(resp.json(), dict)
    else:
        assert "event: done" in resp.text or "event: error" in resp.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_fuzz_json_bodies(client, request):
    route, body, more = request
    payload = {**body, **more}
    resp = client.post(route, content=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    check(resp)
    if resp.status_code == 422 and "model" in payload:
        assert resp.json()["field"] in FIELDS or resp.json()["field"].split("[")[0].split(".")[0] in FIELDS + list(more)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), raw=st.one_of(st.binary(max_size=200), json_values.map(
    lambda v: json.dumps(v).encode())), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzz_raw_bodies(client, route, raw, content_type):
    check(client.post(route, content=raw, headers={"content-type": content_type} if content_type else {}))


def test_server_healthy_after_fuzzing(client):
    for _ in range(3):
        assert client.get("/health").json()["status"] == "ok"
    r = client.post("/api/inference/instruct", json={"text": "Total: 42.", "instruction": "Total?"})
    assert r.status_code == 200
