"""Micro-batching: batches form, settings never mix, a full queue answers 503 + Retry-After."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from deepsynth.inference.interface import Answer
from deepsynth.models.generate import GenerationSettings
from deepsynth.serve import ServeConfig, create_app
from deepsynth.serve.batcher import Job, MicroBatcher, QueueFull

from .conftest import SMALL, live_server


class FakeEngine:
    """Records the batches it is asked; blocks while `gate` is clear."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def ask_batch(self, docs, instructions, settings, cancel=None, json_schema=None):
        self.gate.wait(10)
        self.batches.append(list(instructions))
        return [Answer(answer=i.upper(), pages=1, visual_tokens=1, prompt_tokens=2, stopped="eos", latency_ms=1.0)
                for i in instructions]

    def ask(self, doc, instruction, settings):
        return self.ask_batch([doc], [instruction], settings)[0]

    def stream(self, doc, instruction, settings, cancel=None, json_schema=None):
        yield from instruction
        yield Answer(answer=instruction, pages=1, visual_tokens=1, prompt_tokens=2, stopped="eos", latency_ms=1.0)


def job(text: str, n: int = 8, stream=None) -> Job:
    return Job(doc=None, instruction=text, settings=GenerationSettings(max_new_tokens=n), on_piece=stream)


def test_batches_group_by_settings_and_respect_max_size():
    fake = FakeEngine()
    fake.gate.clear()
    b = MicroBatcher(fake, max_batch_size=3, max_wait_ms=50, max_queue=100)
    b.start()
    try:
        first = b.submit(job("blocker"))
        time.sleep(0.1)  # the worker holds "blocker"; the rest queue up behind it
        jobs = [b.submit(job(f"a{i}")) for i in range(4)] + [b.submit(job(f"b{i}", n=4)) for i in range(2)]
        fake.gate.set()
        results = [j.future.result(5).answer for j in [first, *jobs]]
    finally:
        b.stop()
    assert results == ["BLOCKER", "A0", "A1", "A2", "A3", "B0", "B1"]
    assert fake.batches[0] == ["blocker"]
    assert all(len(x) <= 3 for x in fake.batches)
    assert ["a0", "a1", "a2"] in fake.batches and ["b0", "b1"] in fake.batches
    assert all(not (any(i.startswith("a") for i in x) and any(i.startswith("b") for i in x)) for x in fake.batches)


def test_queue_full_and_streaming_jobs_run_alone():
    fake = FakeEngine()
    fake.gate.clear()
    b = MicroBatcher(fake, max_batch_size=4, max_wait_ms=0, max_queue=2)
    b.start()
    try:
        running = b.submit(job("running"))
        time.sleep(0.1)
        pieces: list[str] = []
        queued = [b.submit(job("streamed", stream=pieces.append)), b.submit(job("q2"))]
        with pytest.raises(QueueFull) as err:
            b.submit(job("one too many"))
        assert err.value.retry_after >= 1
        fake.gate.set()
        assert running.future.result(5).answer == "RUNNING"
        assert queued[0].future.result(5).answer == "streamed" and "".join(pieces) == "streamed"
        assert queued[0].batch_size == 1
        assert queued[1].future.result(5).answer == "Q2"
    finally:
        b.stop()


def test_cancelled_jobs_are_skipped_and_stop_fails_pending():
    fake = FakeEngine()
    fake.gate.clear()
    b = MicroBatcher(fake, max_batch_size=2, max_wait_ms=0, max_queue=10)
    b.start()
    b.submit(job("running"))
    time.sleep(0.1)
    gone = b.submit(job("gone"))
    gone.cancel.set()
    kept = b.submit(job("kept"))
    fake.gate.set()
    assert kept.future.result(5).answer == "KEPT"
    assert all("gone" not in x for x in fake.batches)
    fake.gate.clear()
    b.submit(job("busy"))
    time.sleep(0.1)
    pending = b.submit(job("pending"))
    fake.gate.set()
    b.stop()
    assert pending.future.done()


class SchedulingEngine(FakeEngine):
    """An engine that runs many calls at once (as vLLM does): counts the calls in flight."""

    concurrency = 4

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def ask_batch(self, docs, instructions, settings, cancel=None, json_schema=None):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return super().ask_batch(docs, instructions, settings, cancel, json_schema)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_engine_concurrency_runs_batches_and_streams_side_by_side():
    fake = SchedulingEngine()
    fake.gate.clear()
    b = MicroBatcher(fake, max_batch_size=2, max_wait_ms=0, max_queue=10)
    assert b.workers == 4
    b.start()
    try:
        running = [b.submit(job(f"r{i}", n=i + 1)) for i in range(3)]  # different settings: one batch each
        deadline = time.monotonic() + 10
        while fake.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.in_flight == 3 and b.busy  # three batches held by the engine at once
        pieces: list[str] = []
        streamed = b.submit(job("streamed", stream=pieces.append))
        # the stream is answered while every batch is still blocked in the engine
        assert streamed.future.result(5).answer == "streamed" and "".join(pieces) == "streamed"
        assert not any(j.future.done() for j in running)
        fake.gate.set()
        assert [j.future.result(5).answer for j in running] == ["R0", "R1", "R2"]
    finally:
        b.stop()
    assert fake.most_in_flight == 3 and not b.busy
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(fake, workers=-1)


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def test_live_server_batches_concurrent_requests_and_sheds_load(engine):
    config = ServeConfig(**{**SMALL, "max_batch_size": 4, "max_wait_ms": 150, "max_queue": 4})
    app = create_app(engine, config)
    with live_server(app) as base:
        bodies = [{"text": f"Document {i}: total {i * 7} dollars.", "instruction": "Total?", "max_new_tokens": 4}
                  for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda b: post(base + "/api/inference/instruct", b), bodies))
        assert all(status == 200 for status, _, _ in results), results
        assert max(body["batch_size"] for _, body, _ in results) >= 2
        # each answer is the one the document gets alone
        alone = [engine.ask(b["text"], "Total?", max_new_tokens=4).answer for b in bodies]
        assert [body["answer"] for _, body, _ in results] == alone

        # a blocked model: the queue fills, later requests get 503 + Retry-After, health still answers.
        # The model holds at most 4 and the queue 4 more, so of 9 requests at least one is refused.
        gate, busy = threading.Event(), threading.Event()
        real = engine.ask_batch

        def slow(*args, **kwargs):
            busy.set()
            gate.wait(20)
            return real(*args, **kwargs)

        engine.ask_batch = slow
        try:
            with ThreadPoolExecutor(9) as pool:
                waiting = [pool.submit(post, base + "/api/inference/instruct", b) for b in bodies * 2 + bodies[:1]]
                deadline = time.time() + 10
                while not (busy.is_set() and app.state.batcher.depth >= 4) and time.time() < deadline:
                    time.sleep(0.02)
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    health = json.loads(r.read())
                gate.set()
                done = [f.result(60) for f in waiting]
        finally:
            del engine.ask_batch
        refused = [(body, headers) for status, body, headers in done if status == 503]
        assert refused and all(body["error"] == "queue_full" and body["limit"] == 4 for body, _ in refused), done
        assert all(int(headers["Retry-After"]) >= 1 for _, headers in refused)
        assert health["status"] == "ok" and health["queue"] <= 4
        assert sum(s == 200 for s, _, _ in done) >= 4 and all(s in (200, 503) for s, _, _ in done)
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "deepsynth_rejected_total" in text and "deepsynth_rejected_total 0.0" not in text
