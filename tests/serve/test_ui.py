"""The web UI in a real browser: Playwright (Python) driving Debian's chromium.

Loads the page, chooses a template, submits a document, reads the streamed answer, its latency and
compression, checks thumbnails and plain errors, and keeps a screenshot under test-artifacts/.
Skipped only when no `chromium` executable is on PATH (.ci/run installs it).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from deepsynth.serve import ServeConfig, create_app
from inference.helpers import text_pdf

from .conftest import SMALL, live_server

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DOC = "Invoice 77. Total: 42 dollars, paid by Ada Lovelace on 3 March 2024."


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found on PATH: install it with `apt-get install -y chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def api_answer(base: str, body: dict) -> dict:
    req = urllib.request.Request(base + "/api/inference/instruct", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_instruct_page_end_to_end(browser, engine, tmp_path):
    from playwright.sync_api import expect

    app = create_app(engine, ServeConfig(**{**SMALL, "max_new_tokens": 64}))  # room for the extraction JSON
    with live_server(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        script_errors: list[str] = []
        page.on("pageerror", lambda exc: script_errors.append(str(exc)))
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=15_000)
        assert page.locator("#model").inner_text() == "model: tiny"
        assert page.locator("#key-row").is_hidden() and page.locator("#stats").is_hidden()
        options = page.locator("#template option").all_inner_texts()
        assert "Summary of financial aspects" in options and "Custom instruction" in options

        # template + pasted text -> thumbnails, streamed answer, latency and compression
        page.select_option("#template", "summary")
        assert page.locator("#input-row").is_hidden()
        page.fill("#text", DOC)
        page.wait_for_selector("#thumbs img", timeout=15_000)
        assert "compression" in page.locator("#render-stats").inner_text()
        page.fill("#max-tokens", "8")
        page.click("#submit")
        page.wait_for_selector("#stats:not([hidden])", timeout=30_000)
        answer = page.locator("#answer").inner_text()
        expected = api_answer(base, {"text": DOC, "template": "summary", "max_new_tokens": 8})
        assert answer.strip() == expected["answer"]
        assert page.locator("#latency").inner_text().endswith(" ms")
        assert page.locator("#compression").inner_text().startswith(f"{expected['compression']:.2f}×")
        assert page.locator("#error").is_hidden()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-ui.png"), full_page=True)

        # the extraction template answers as JSON with its schema's fields
        page.select_option("#template", "extract")
        assert "Answered as JSON (dates, names, amounts)" in page.locator("#template-text").inner_text()
        page.fill("#max-tokens", "60")
        page.click("#submit")
        page.wait_for_selector("#stats:not([hidden])", timeout=30_000)
        assert set(json.loads(page.locator("#answer").inner_text())) == {"dates", "names", "amounts"}

        # a template that needs input: a missing question is reported plainly, without a request
        page.select_option("#template", "question")
        assert page.locator("#input-row").is_visible()
        page.click("#submit")
        assert "Question" in page.locator("#error").inner_text()

        # server-side limits come back as a plain message naming the field and the limit
        page.fill("#input", "What is the total?")
        page.fill("#text", "x" * (SMALL["max_text_chars"] + 1))
        page.click("#submit")
        page.wait_for_selector("#error:not([hidden])")
        error = page.locator("#error").inner_text()
        assert error.startswith("text:") and str(SMALL["max_text_chars"]) in error

        # upload a PDF: its pages are previewed and it is answered
        pdf = tmp_path / "invoice.pdf"
        pdf.write_bytes(text_pdf(["Invoice 77", "Total: 42 dollars"]))
        page.set_input_files("#file", str(pdf))
        # a locator assertion, not wait_for_function: the page's CSP forbids evaluating strings
        expect(page.locator("#render-stats")).to_contain_text("page", timeout=15_000)
        page.click("#submit")
        page.wait_for_selector("#stats:not([hidden])", timeout=30_000)
        assert page.locator("#error").is_hidden()
        assert page.locator("#pages").inner_text() == str(len(engine.prepare(pdf.read_bytes()).pages))
        assert "invoice.pdf" in page.locator("#file-info").inner_text()
        page.click("#clear-file")  # back to the text box
        assert page.locator("#file-row").is_hidden()
        page.close()
        assert not script_errors


def test_api_docs_render_offline(browser, engine):
    """/docs renders Swagger UI from the server's own files: every other host is unreachable."""
    app = create_app(engine, ServeConfig(**SMALL))
    with live_server(app) as base:
        page = browser.new_page()
        outside: list[str] = []

        def only_local(route):
            if route.request.url.startswith(base + "/"):
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()

        page.route("**/*", only_local)
        page.goto(base + "/docs")
        page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
        assert "DeepSynth" in page.locator(".swagger-ui .info .title").inner_text()
        page.wait_for_selector(".opblock-summary-path", timeout=20_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert "/api/inference/instruct" in paths and "/v1/chat/completions" in paths
        assert not outside, outside
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-docs.png"))
        page.close()
