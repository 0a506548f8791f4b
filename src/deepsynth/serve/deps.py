"""What every router shares: the `Server` (engine, limits, batcher, metrics) and its steps.

Routers get it with `Depends(get_server)`; the key check is `require_key` (the middleware has
already enforced it; as a dependency it also puts the bearer scheme in the OpenAPI document).
A request goes: prepare the document (`Server.prepare`) -> settings (`Server.settings`) and
schema (`Server.check_schema`) -> a `Job` for the micro-batcher -> `Server.wait` (one answer) or
`Server.events` (streamed pieces), both cancelling the job when the client leaves or the time
limit passes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from deepsynth.inference.documents import DocumentError, DocumentLimits
from deepsynth.inference.interface import Answer
from deepsynth.inference.prepare import PreparedDocument
from deepsynth.inference.interface import Engine
from deepsynth.models.generate import GenerationSettings
from deepsynth.models.structured import SchemaError
from deepsynth.serve.batcher import Job, MicroBatcher, QueueFull
from deepsynth.serve.config import ServeConfig
from deepsynth.serve.errors import APIError
from deepsynth.serve.metrics import Metrics
from deepsynth.serve.middleware import bearer_matches, redact

logger = logging.getLogger(__name__)

MIN_SAMPLING_TEMPERATURE = 0.01
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def decode_b64(value: str, field: str) -> bytes:
    """Bytes of plain base64 or a base64 data: URL; 422 naming `field` otherwise."""
    value = _DATA_URL.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(re.sub(r"\s+", "", value), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_base64", "not valid base64 (plain or a data: URL)", field=field) from None


def document_limits(config: ServeConfig) -> DocumentLimits:
    return DocumentLimits(max_text_chars=config.max_text_chars, max_pages=config.max_pages,
                          max_image_pixels=config.max_image_pixels, max_total_pixels=config.max_total_pixels,
                          min_image_side=config.min_image_side, max_aspect_ratio=config.max_aspect_ratio,
                          max_pdf_content_bytes=config.max_pdf_content_bytes, max_pdf_objects=config.max_pdf_objects)


@dataclass
class Server:
    """One served model and everything the routers need around it.

    engine:  the model (any `Engine`); fixed while the app runs.
    config:  limits, batching, key.
    batcher: the micro-batcher that owns the engine's generate calls.
    metrics: Prometheus metrics of this app.
    limits:  document limits derived from `config`.
    render:  the render config text documents are drawn with (reported in answers).
    """

    engine: Engine
    config: ServeConfig
    batcher: MicroBatcher
    metrics: Metrics
    limits: DocumentLimits
    render: dict

    async def prepare(self, document: Any, field: str) -> PreparedDocument:
        try:
            return await run_in_threadpool(self.engine.prepare, document, self.limits, field)
        except DocumentError as exc:
            raise APIError(422, "invalid_document", exc.message, field=exc.field, limit=exc.limit) from None

    def settings(self, max_new_tokens: int | None, temperature: float | None, top_p: float | None = None,
                 field: str = "max_new_tokens") -> GenerationSettings:
        """Generation settings of a request: temperature 0 (or below MIN_SAMPLING_TEMPERATURE) is
        greedy; None keeps the model's decoding default."""
        overrides: dict = {"max_new_tokens": max_new_tokens or self.config.default_new_tokens}
        if temperature is not None:
            sample = temperature >= MIN_SAMPLING_TEMPERATURE
            overrides.update(do_sample=sample, temperature=temperature if sample else 1.0)
            if sample and top_p is not None:
                overrides["top_p"] = top_p
        try:
            return self.engine.settings(**overrides)
        except ValueError as exc:
            raise APIError(422, "validation_error", str(exc), field=field) from None

    def check_schema(self, schema: dict | None, settings: GenerationSettings, field: str) -> dict | None:
        if schema is None:
            return None
        try:
            return self.engine.check_json_schema(schema, settings, field)
        except SchemaError as exc:
            raise APIError(422, "invalid_schema", exc.message, field=exc.field) from None

    def submit(self, job: Job) -> Job:
        try:
            return self.batcher.submit(job)
        except QueueFull as exc:
            self.metrics.rejected.inc()
            raise APIError(503, "queue_full", "the server is busy; retry later", limit=self.config.max_queue,
                           headers={"Retry-After": str(exc.retry_after)}) from None

    def count(self, answer: Answer) -> None:
        self.metrics.tokens.inc(answer.new_tokens)
        self.metrics.stopped.labels(stopped=answer.stopped).inc()

    def job_error(self, exc: BaseException, request: Request) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, DocumentError):
            return APIError(422, "invalid_document", exc.message, field=exc.field, limit=exc.limit)
        if isinstance(exc, SchemaError):
            return APIError(422, "invalid_schema", exc.message, field=exc.field)
        request_id = request.scope.get("state", {}).get("request_id", "-")
        logger.error("generation failed (request %s): %s: %s", request_id, type(exc).__name__,
                     redact(str(exc), self.config.api_key))
        return APIError(500, "internal_error", f"internal error (request id {request_id})")

    async def wait(self, request: Request, job: Job) -> Answer | None:
        """The job's answer; None when the client left first. 504 after the time limit (both cancel it)."""
        self.submit(job)
        result_future = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({result_future, gone}, timeout=self.config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        finally:
            gone.cancel()
        if result_future not in done:
            job.cancel.set()
            if gone in done:
                logger.info("client left; request %s cancelled", request.scope.get("state", {}).get("request_id"))
                return None
            raise APIError(504, "timeout", f"no answer within {self.config.request_timeout_s:g} s",
                           limit=self.config.request_timeout_s)
        try:
            answer = result_future.result()
        except Exception as exc:
            raise self.job_error(exc, request) from None
        self.count(answer)
        return answer

    def events(self, request: Request, job: Job) -> AsyncIterator[tuple[str, Any]]:
        """Queue a streaming job (503 raised here, before any response starts) and return its events:
        ("token", text)*, then ("done", Answer) or ("error", APIError). Leaving the iterator early
        (the client went away) cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.on_piece = lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("token", piece))
        job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("end", None)))
        self.submit(job)
        timeout = self.config.request_timeout_s

        async def run() -> AsyncIterator[tuple[str, Any]]:
            try:
                while True:
                    try:
                        kind, piece = await asyncio.wait_for(queue.get(), timeout)
                    except asyncio.TimeoutError:
                        job.cancel.set()
                        yield "error", APIError(504, "timeout", f"no answer within {timeout:g} s", limit=timeout)
                        return
                    if kind == "token":
                        yield "token", piece
                        continue
                    exc = job.future.exception()
                    if exc is not None:
                        yield "error", self.job_error(exc, request)
                    else:
                        answer = job.future.result()
                        self.count(answer)
                        yield "done", answer
                    return
            finally:
                job.cancel.set()  # client gone or stream finished: stop generating

        return run()


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]
_bearer = HTTPBearer(auto_error=False, description="The server's API key (DEEPSYNTH_API_KEY), when it has one.")


def require_key(server: ServerDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
    key = server.config.api_key
    if key is None:
        return
    value = f"{credentials.scheme} {credentials.credentials}".encode() if credentials else None
    if not bearer_matches(value, key.encode()):
        raise APIError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       field="Authorization", headers={"WWW-Authenticate": "Bearer"})

