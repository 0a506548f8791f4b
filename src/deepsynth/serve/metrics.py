"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from deepsynth.inference.interface import Engine
from deepsynth.serve.batcher import MicroBatcher


class Metrics:
    def __init__(self, engine: Engine, batcher: MicroBatcher) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("deepsynth_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=registry)
        self.latency = Histogram("deepsynth_request_seconds", "HTTP request time", ["route"], registry=registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_size = Histogram("deepsynth_batch_size", "Requests per generate call", registry=registry,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.batch_seconds = Histogram("deepsynth_batch_seconds", "Time of one generate call", registry=registry,
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.rejected = Counter("deepsynth_rejected", "Requests refused because the queue was full",
                                registry=registry)
        self.tokens = Counter("deepsynth_generated_tokens", "Tokens generated", registry=registry)
        self.stopped = Counter("deepsynth_answers", "Answers by why generation stopped", ["stopped"],
                               registry=registry)
        Gauge("deepsynth_queue_depth", "Requests waiting for the model", registry=registry).set_function(
            lambda: batcher.depth)
        for name in ("hits", "misses", "encoded_pages", "evictions", "entries", "pages", "bytes"):
            Gauge(f"deepsynth_document_cache_{name}", f"Document cache: {name}", registry=registry).set_function(
                lambda name=name: getattr(engine.cache.stats, name, 0))

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
