"""The HTTP API and web UI: `create_app(engine, config)`.

Routes
    POST /api/inference/instruct   answer an instruction about text / page images / a PDF
    POST /api/inference/summarize  summary (general, financial, key points) of a document
    POST /api/render               page count, thumbnails and compression of a document
    GET  /api/templates            instruction templates
    GET  /health                   liveness and queue depth (never waits for the model)
    GET  /metrics                  Prometheus metrics
    GET  /docs, /openapi.json      OpenAPI documentation
    GET  /                         the web UI (static files under /static)

Every error is JSON: {"error": code, "field": name or null, "message": text, "limit": number or
null}. The model is fixed when the app is created; no request can name another one.

With an API key set, every route but /health and the web UI (/ and /static) needs it. Every
response carries an X-Request-ID; error logs name it with the exception's message (the key and
bearer tokens redacted), and a 500 answer names it too.
"""

# No `from __future__ import annotations` here: FastAPI reads the request models, which are built
# per app inside create_app, from the endpoints' annotations at runtime.
import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepsynth.inference.documents import DocumentError, DocumentLimits, Markdown, Pdf, clean_text
from deepsynth.inference.engine import Answer, InstructionEngine, encode_png
from deepsynth.inference.templates import BY_ID, TEMPLATES
from deepsynth.serve.batcher import Job, MicroBatcher, QueueFull
from deepsynth.serve.config import LOOPBACK_HOSTS, ServeConfig

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
MIN_SAMPLING_TEMPERATURE = 0.01
SUMMARY_TEMPLATES = {"general": "summary", "financial": "financial_summary", "key_points": "key_points"}
UI_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
          "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'")


class APIError(Exception):
    """An error answered as JSON with `status`; `field` and `limit` name what was wrong."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 limit: int | float | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.limit = status, code, message, field, limit
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.field, self.limit, self.headers)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   limit: int | float | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "field": field, "message": message, "limit": limit},
                        status_code=status, headers=headers)


# ---------------------------------------------------------------------- request / response schemas


def build_schemas(config: ServeConfig) -> dict[str, type[BaseModel]]:
    """Pydantic models whose constraints are this server's limits (so /docs shows them)."""
    Text = Annotated[str, Field(max_length=config.max_text_chars)]
    B64 = Annotated[str, Field(max_length=config.max_body_bytes)]
    Instruction = Annotated[str, Field(max_length=config.max_instruction_chars)]
    NewTokens = Annotated[int, Field(ge=1, le=config.max_new_tokens)]
    Pages = Annotated[list[B64], Field(min_length=1, max_length=config.max_pages)]

    class DocumentFields(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: Text | None = Field(None, description=f"Plain text or Markdown (at most {config.max_text_chars} "
                                                    "characters); rendered to pages.")
        markdown: bool = Field(False, description="Lay `text` out as Markdown.")
        pages: Pages | None = Field(None, description=f"Page images, base64 or data: URLs (at most "
                                                      f"{config.max_pages}, each at most "
                                                      f"{config.max_image_pixels} pixels).")
        pdf: B64 | None = Field(None, description="A PDF, base64 or a data: URL. Its text layer is re-rendered; "
                                                  "a PDF without text is read as page images.")

    class GenerationFields(BaseModel):
        max_new_tokens: NewTokens = Field(config.default_new_tokens, description="Most tokens in the answer.")
        temperature: float = Field(0.0, ge=0.0, le=2.0, description=f"0 = greedy decoding; from "
                                   f"{MIN_SAMPLING_TEMPERATURE} up, samples at that temperature (smaller values "
                                   "are greedy: dividing logits by them overflows).")
        stream: bool = Field(False, description="Answer as Server-Sent Events: `token` events with "
                                                "{\"text\"}, then one `done` event with the full answer.")

    class InstructRequest(DocumentFields, GenerationFields):
        """Exactly one of text / pages / pdf, and an instruction (or a template)."""

        instruction: Instruction | None = Field(None, description="The question or instruction.")
        template: Literal[tuple(BY_ID)] | None = Field(  # type: ignore[valid-type]
            None, description="Instruction template id (see GET /api/templates); used when no instruction.")
        input: Instruction | None = Field(None, description="The question / custom instruction a template needs.")

    class SummarizeRequest(DocumentFields, GenerationFields):
        focus: Literal["general", "financial", "key_points"] = "general"

    class RenderRequest(DocumentFields):
        thumbnail_px: int = Field(192, ge=32, le=1024, description="Longest side of each thumbnail.")

    return {"InstructRequest": InstructRequest, "SummarizeRequest": SummarizeRequest, "RenderRequest": RenderRequest}


class AnswerResponse(BaseModel):
    answer: str
    instruction: str
    pages: int
    visual_tokens: int
    prompt_tokens: int
    text_tokens: int | None
    compression: float | None = Field(description="text tokens / visual tokens (None for images)")
    stopped: str = Field(description="eos | max_new_tokens | loop | cancelled")
    new_tokens: int
    latency_ms: float = Field(description="server time from request to answer, queueing included")
    model_ms: float = Field(description="time of the batch that produced the answer")
    batch_size: int
    cached: bool = Field(description="the document's pages were already rendered and encoded")
    model: str
    render: dict = Field(description="how text documents were drawn (the model bundle's render config)")


class RenderResponse(BaseModel):
    kind: str
    pages: int
    thumbnails: list[str]
    text_tokens: int | None
    visual_tokens: int | None
    compression: float | None


class ErrorResponse(BaseModel):
    error: str
    field: str | None
    message: str
    limit: int | float | None


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 503, 504)}
_BEARER = re.compile(r"(?i)(bearer\s+|hf_)[\w.~+/=-]+")
# Routes open without the API key: liveness and the web page (which asks for the key itself).
_OPEN_PATHS = ("/health", "/", "/favicon.ico")


def redact(text: str, secret: str | None = None) -> str:
    """`text` safe to log: the API key and anything that looks like a token replaced, at most 500 characters."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _BEARER.sub(lambda m: m.group(1) + "[redacted]", text)[:500]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(value: bytes) -> str:
    """The name in a Host header, without its port (IPv6 literals lose their brackets)."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---------------------------------------------------------------------- middleware


class GuardMiddleware:
    """Outermost layer: request ids, API key, body size, and no stack trace ever leaving the app."""

    def __init__(self, app, config: ServeConfig, metrics: "Metrics") -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        started = False
        status_box = {"status": 500}
        request_id = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_wrapper(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status_box["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        async def respond(err: JSONResponse) -> None:
            await err(scope, receive, send_wrapper)

        path = scope.get("path", "")
        try:
            host_error = self._host_error(scope)
            if host_error is not None:
                await respond(error_response(400, "host_not_allowed", host_error, field="Host"))
                return
            if self._key is not None and self._needs_key(path) and not self._authorized(scope):
                await respond(error_response(401, "unauthorized", "missing or wrong API key: send "
                                             "'Authorization: Bearer <key>'", field="Authorization",
                                             headers={"WWW-Authenticate": "Bearer"}))
                return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    await respond(error_response(413, "body_too_large", f"the request body exceeds "
                                                 f"{self.config.max_body_bytes} bytes", field="body",
                                                 limit=self.config.max_body_bytes))
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # the one place errors become a 500; no traceback is sent
            logger.error("internal error on %s %s (request %s): %s: %s", scope.get("method"), path, request_id,
                         type(exc).__name__, redact(str(exc), self.config.api_key))
            if not started:
                await respond(error_response(500, "internal_error", f"internal error (request id {request_id})"))
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("static" if path.startswith("/static/") else "other")
            self.metrics.requests.labels(route=label, status=str(status_box["status"])).inc()
            self.metrics.latency.labels(route=label).observe(time.perf_counter() - start)

    @staticmethod
    def _needs_key(path: str) -> bool:
        return not (path in _OPEN_PATHS or path.startswith("/static/"))

    def _host_error(self, scope) -> str | None:
        """Why the Host header is refused (None when it is allowed).

        A server bound to loopback answers only to loopback names unless configured otherwise: a
        web page whose DNS name is re-pointed at 127.0.0.1 sends its own name as the Host.
        """
        allowed = self.config.allowed_hosts
        if allowed is None:
            server = scope.get("server") or ("", None)
            if not is_loopback(str(server[0])):
                return None
            allowed = LOOPBACK_HOSTS
        if "*" in allowed:
            return None
        value = next((v for name, v in scope.get("headers", []) if name == b"host"), b"")
        host = _host_name(value)
        if host in allowed:
            return None
        return (f"Host {host[:100]!r} is not allowed: this server answers to {', '.join(allowed)} "
                "(set DEEPSYNTH_ALLOWED_HOSTS to allow others)")

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def _read_body(self, scope, receive) -> bytes | None:
        limit = self.config.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would report it

    return replay


class Metrics:
    def __init__(self, engine: InstructionEngine, batcher: MicroBatcher) -> None:
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


# ---------------------------------------------------------------------- helpers


def _decode_b64(value: str, field: str) -> bytes:
    value = _DATA_URL.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(re.sub(r"\s+", "", value), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_base64", "not valid base64 (plain or a data: URL)", field=field) from None


def _document(req) -> tuple[Any, str]:
    given = [name for name in ("text", "pages", "pdf") if getattr(req, name) is not None]
    if len(given) != 1:
        field = given[1] if len(given) > 1 else "text"
        raise APIError(422, "invalid_input", "give exactly one document: text, pages or pdf"
                       + (f" (got {', '.join(given)})" if given else ""), field=field)
    if req.text is not None:
        if not req.text.strip():
            raise APIError(422, "invalid_input", "the text is empty", field="text")
        return (Markdown(req.text) if req.markdown else req.text), "text"
    if req.pdf is not None:
        return Pdf(_decode_b64(req.pdf, "pdf")), "pdf"
    return [_decode_b64(p, f"pages[{i}]") for i, p in enumerate(req.pages)], "pages"


def _instruction(req) -> str:
    instruction = clean_text(req.instruction).strip() if req.instruction is not None else ""
    if instruction:
        return instruction
    if req.template is not None:
        try:
            return BY_ID[req.template].fill(clean_text(req.input) if req.input is not None else None)
        except ValueError as exc:
            raise APIError(422, "invalid_input", str(exc), field="input") from None
    raise APIError(422, "invalid_input", "give an instruction, or a template (with its input)", field="instruction")


# ---------------------------------------------------------------------- the app


def create_app(engine: InstructionEngine, config: ServeConfig | None = None) -> FastAPI:
    """The API + UI around one loaded engine (the model never changes while the app runs)."""
    config = config or ServeConfig.from_env()
    schemas = build_schemas(config)
    InstructRequest, SummarizeRequest, RenderRequest = (
        schemas["InstructRequest"], schemas["SummarizeRequest"], schemas["RenderRequest"])
    limits = DocumentLimits(max_text_chars=config.max_text_chars, max_pages=config.max_pages,
                            max_image_pixels=config.max_image_pixels, max_total_pixels=config.max_total_pixels,
                            min_image_side=config.min_image_side,
                            max_aspect_ratio=config.max_aspect_ratio,
                            max_pdf_content_bytes=config.max_pdf_content_bytes,
                            max_pdf_objects=config.max_pdf_objects)
    metrics_box: dict = {}

    def on_batch(size: int, seconds: float) -> None:
        metrics_box["m"].batch_size.observe(size)
        metrics_box["m"].batch_seconds.observe(seconds)

    if config.cache_bytes is not None:
        engine.cache.max_bytes = config.cache_bytes
    batcher = MicroBatcher(engine, config.max_batch_size, config.max_wait_ms, config.max_queue, on_batch=on_batch)
    metrics = metrics_box["m"] = Metrics(engine, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        logger.info("serving model %s (API key %s)", engine.name, "required" if config.api_key else "not required")
        yield
        batcher.stop()

    app = FastAPI(title="DeepSynth", version="0.1.0", lifespan=lifespan,
                  description="Instructions (questions, summaries, extraction) about documents read as page "
                              "images. The model is fixed at start-up.")
    app.state.engine, app.state.batcher, app.state.config, app.state.metrics = engine, batcher, config, metrics
    batcher.start()
    app.add_middleware(GuardMiddleware, config=config, metrics=metrics)

    # -------------------------------------------------------------- error handlers

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
        kind = first.get("type", "")
        if kind == "json_invalid":
            return error_response(400, "malformed_json", "the body is not valid JSON", field="body")
        loc = list(first.get("loc", ()))
        loc = loc[1:] if loc and loc[0] in ("body", "query", "path") else loc
        field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        field = field or "body"
        ctx = first.get("ctx") or {}
        limit = next((ctx[k] for k in ("max_length", "le", "ge", "min_length", "lt", "gt") if k in ctx), None)
        limit = limit if isinstance(limit, (int, float)) else None
        message = str(first.get("msg", "invalid value"))
        if kind == "extra_forbidden":
            message = ("the model is fixed when the server starts; a request cannot choose it" if field == "model"
                       else "unknown field")
        elif kind == "missing" and field == "body":
            message = "a JSON object body is required"
        elif kind == "model_attributes_type" and field == "body":
            message = "the body must be a JSON object"
        return error_response(422, "validation_error", message, field=field, limit=limit)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code, field, message = {
            400: ("malformed_json", "body", "the body is not valid JSON (UTF-8 expected)"),
            404: ("not_found", "path", "no such route"),
            405: ("method_not_allowed", "method", f"{request.method} is not allowed here"),
        }.get(exc.status_code, ("http_error", None, str(exc.detail)))
        return error_response(exc.status_code, code, message, field=field, headers=getattr(exc, "headers", None))

    # -------------------------------------------------------------- shared steps

    async def prepare(req):
        document, field = _document(req)
        try:
            return await run_in_threadpool(engine.prepare, document, limits, field)
        except DocumentError as exc:
            raise APIError(422, "invalid_document", exc.message, field=exc.field, limit=exc.limit) from None

    def settings_for(req):
        try:
            sample = req.temperature >= MIN_SAMPLING_TEMPERATURE
            return engine.settings(max_new_tokens=req.max_new_tokens, do_sample=sample,
                                   temperature=req.temperature if sample else 1.0)
        except ValueError as exc:
            raise APIError(422, "validation_error", str(exc), field="max_new_tokens") from None

    def submit(job: Job) -> Job:
        try:
            return batcher.submit(job)
        except QueueFull as exc:
            metrics.rejected.inc()
            raise APIError(503, "queue_full", "the server is busy; retry later", limit=config.max_queue,
                           headers={"Retry-After": str(exc.retry_after)}) from None

    render_config = engine.describe()["render"]

    def answer_body(answer: Answer, instruction: str, job: Job, start: float) -> dict:
        metrics.tokens.inc(answer.new_tokens)
        metrics.stopped.labels(stopped=answer.stopped).inc()
        return AnswerResponse(
            answer=answer.answer, instruction=instruction, pages=answer.pages, visual_tokens=answer.visual_tokens,
            prompt_tokens=answer.prompt_tokens, text_tokens=answer.text_tokens, compression=answer.compression,
            stopped=answer.stopped, new_tokens=answer.new_tokens,
            latency_ms=round((time.perf_counter() - start) * 1000, 2), model_ms=answer.latency_ms,
            batch_size=job.batch_size, cached=answer.cached, model=engine.name, render=render_config,
        ).model_dump()

    def job_error(exc: BaseException, request: Request) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, DocumentError):
            return APIError(422, "invalid_document", exc.message, field=exc.field, limit=exc.limit)
        request_id = request.scope.get("state", {}).get("request_id", "-")
        logger.error("generation failed (request %s): %s: %s", request_id, type(exc).__name__,
                     redact(str(exc), config.api_key))
        return APIError(500, "internal_error", f"internal error (request id {request_id})")

    async def client_gone(request: Request) -> None:
        """Returns when the client disconnects (the body has been read: only the disconnect is left)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def answer(request: Request, req, instruction: str, start: float):
        doc = await prepare(req)
        settings = settings_for(req)
        if req.stream:
            return stream_answer(request, doc, instruction, settings, start)
        job = submit(Job(doc=doc, instruction=instruction, settings=settings))
        result_future = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            # whichever comes first: the answer, the client leaving, or the timeout (both cancel the job)
            done, _ = await asyncio.wait({result_future, gone}, timeout=config.request_timeout_s,
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
                return Response(status_code=499)  # nobody reads it; ends the request cleanly
            raise APIError(504, "timeout", f"no answer within {config.request_timeout_s:g} s",
                           limit=config.request_timeout_s)
        try:
            result = result_future.result()
        except Exception as exc:
            raise job_error(exc, request) from None
        return answer_body(result, instruction, job, start)

    def stream_answer(request: Request, doc, instruction: str, settings, start: float) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(doc=doc, instruction=instruction, settings=settings,
                  on_piece=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("token", piece)))
        job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("end", None)))
        submit(job)

        def event(name: str, data: dict) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        async def events():
            try:
                yield event("start", {"queued": batcher.depth})
                while True:
                    try:
                        kind, piece = await asyncio.wait_for(queue.get(), config.request_timeout_s)
                    except asyncio.TimeoutError:
                        job.cancel.set()
                        yield event("error", {"error": "timeout", "field": None, "limit": config.request_timeout_s,
                                              "message": f"no answer within {config.request_timeout_s:g} s"})
                        return
                    if kind == "token":
                        yield event("token", {"text": piece})
                        continue
                    exc = job.future.exception()
                    if exc is not None:
                        err = job_error(exc, request)
                        yield event("error", {"error": err.code, "field": err.field, "message": err.message,
                                              "limit": err.limit})
                    else:
                        yield event("done", answer_body(job.future.result(), instruction, job, start))
                    return
            finally:
                job.cancel.set()  # client gone or stream finished: stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- routes

    @app.post("/api/inference/instruct", response_model=AnswerResponse, responses=ERRORS, tags=["inference"])
    async def instruct(request: Request, req: InstructRequest):  # type: ignore[valid-type]
        """Answer an instruction (question, summary, extraction) about one document."""
        start = time.perf_counter()
        return await answer(request, req, _instruction(req), start)

    @app.post("/api/inference/summarize", response_model=AnswerResponse, responses=ERRORS, tags=["inference"])
    async def summarize(request: Request, req: SummarizeRequest):  # type: ignore[valid-type]
        """Summarize a document: in general, its financial aspects, or as key points."""
        start = time.perf_counter()
        return await answer(request, req, BY_ID[SUMMARY_TEMPLATES[req.focus]].instruction, start)

    @app.post("/api/render", response_model=RenderResponse, responses=ERRORS, tags=["documents"])
    async def render(req: RenderRequest):  # type: ignore[valid-type]
        """The pages the model would read: thumbnails (PNG data URLs), token counts, compression."""
        doc = await prepare(req)

        def work() -> dict:
            thumbs = ["data:image/png;base64," + base64.b64encode(encode_png(p, req.thumbnail_px)).decode()
                      for p in doc.pages]
            visual = engine.visual_token_count(doc)
            compression = round(doc.text_tokens / visual, 3) if doc.text_tokens is not None and visual else None
            return RenderResponse(kind=doc.kind, pages=len(doc.pages), thumbnails=thumbs,
                                  text_tokens=doc.text_tokens, visual_tokens=visual,
                                  compression=compression).model_dump()

        return await run_in_threadpool(work)

    @app.get("/api/templates", tags=["documents"])
    async def templates() -> dict:
        """Instruction templates: id, name, instruction text, and whether the user must type an input."""
        return {"templates": [t.to_dict() for t in TEMPLATES]}

    @app.get("/health", tags=["service"])
    async def health() -> dict:
        """Liveness; answers at once even while the model is busy."""
        return {"status": "ok", "model": engine.name, "queue": batcher.depth, "max_queue": config.max_queue,
                "busy": batcher.busy, "auth_required": config.api_key is not None,
                "limits": {"max_text_chars": config.max_text_chars, "max_pages": config.max_pages,
                           "max_new_tokens": config.max_new_tokens, "max_body_bytes": config.max_body_bytes,
                           "max_image_pixels": config.max_image_pixels,
                           "max_instruction_chars": config.max_instruction_chars}}

    @app.get("/metrics", tags=["service"])
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": UI_CSP,
                                                            "X-Content-Type-Options": "nosniff",
                                                            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
