"""Our API: instructions, summaries, rendering and templates under /api; /health and /metrics.

    POST /api/inference/instruct   answer an instruction about text / page images / a PDF
    POST /api/inference/summarize  summary (general, financial, key points) of a document
    POST /api/render               page count, thumbnails and compression of a document
    GET  /api/templates            instruction templates (with the JSON schema a template offers)
    GET  /health                   liveness and queue depth (never waits for the model)
    GET  /metrics                  Prometheus metrics
"""

# No `from __future__ import annotations` here: FastAPI reads the request models, which are built
# per app from its limits, from the endpoints' annotations at runtime.
import base64
import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from deepsynth.inference.documents import Markdown, Pdf, clean_text
from deepsynth.inference.engine import encode_png
from deepsynth.inference.interface import Answer
from deepsynth.inference.templates import BY_ID, TEMPLATES
from deepsynth.serve.batcher import Job
from deepsynth.serve.config import ServeConfig
from deepsynth.serve.deps import MIN_SAMPLING_TEMPERATURE, Server, ServerDep, decode_b64, require_key
from deepsynth.serve.errors import ERRORS, APIError

SUMMARY_TEMPLATES = {"general": "summary", "financial": "financial_summary", "key_points": "key_points"}


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
        json_schema: dict[str, Any] | None = Field(
            None, description="Structured output: the answer is JSON that validates against this JSON schema "
                              "(keywords the decoder enforces only; others are refused by name).")

    class InstructRequest(DocumentFields, GenerationFields):
        """Exactly one of text / pages / pdf, and an instruction (or a template)."""

        instruction: Instruction | None = Field(None, description="The question or instruction.")
        template: Literal[tuple(BY_ID)] | None = Field(  # type: ignore[valid-type]
            None, description="Instruction template id (see GET /api/templates); used when no instruction.")
        input: Instruction | None = Field(None, description="The question / custom instruction a template needs.")
        structured: bool = Field(False, description="Answer as JSON valid against the template's `json_schema` "
                                                    "(templates that offer one, e.g. `extract`).")

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


def request_document(req) -> tuple[Any, str]:
    """The document a request gives (exactly one of text / pages / pdf) and its field name."""
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
        return Pdf(decode_b64(req.pdf, "pdf")), "pdf"
    return [decode_b64(p, f"pages[{i}]") for i, p in enumerate(req.pages)], "pages"


def request_instruction(req) -> str:
    instruction = clean_text(req.instruction).strip() if req.instruction is not None else ""
    if instruction:
        return instruction
    if req.template is not None:
        try:
            return BY_ID[req.template].fill(clean_text(req.input) if req.input is not None else None)
        except ValueError as exc:
            raise APIError(422, "invalid_input", str(exc), field="input") from None
    raise APIError(422, "invalid_input", "give an instruction, or a template (with its input)", field="instruction")


def request_schema(req) -> tuple[dict | None, str]:
    """The JSON schema a request asks its answer to follow, and the field it came from."""
    if req.json_schema is not None:
        return req.json_schema, "json_schema"
    if getattr(req, "structured", False):
        template = BY_ID.get(req.template) if req.template else None
        if template is None or template.json_schema is None:
            offering = [t.id for t in TEMPLATES if t.json_schema is not None]
            raise APIError(422, "invalid_input", "structured output needs a json_schema, or a template that offers "
                           f"one ({', '.join(offering)})", field="structured")
        return template.json_schema, "template"
    return None, "json_schema"


def answer_body(server: Server, answer: Answer, instruction: str, job: Job, start: float) -> dict:
    return AnswerResponse(
        answer=answer.answer, instruction=instruction, pages=answer.pages, visual_tokens=answer.visual_tokens,
        prompt_tokens=answer.prompt_tokens, text_tokens=answer.text_tokens, compression=answer.compression,
        stopped=answer.stopped, new_tokens=answer.new_tokens,
        latency_ms=round((time.perf_counter() - start) * 1000, 2), model_ms=answer.latency_ms,
        batch_size=job.batch_size, cached=answer.cached, model=server.engine.name, render=server.render,
    ).model_dump()


async def respond(server: Server, request: Request, req, instruction: str, start: float):
    """Prepare, queue and answer one request of ours (JSON, or SSE when it asks to stream)."""
    doc = await server.prepare(*request_document(req))
    settings = server.settings(req.max_new_tokens, req.temperature)
    schema, field = request_schema(req)
    schema = server.check_schema(schema, settings, field)
    job = Job(doc=doc, instruction=instruction, settings=settings, json_schema=schema)
    if req.stream:
        return stream(server, request, job, start)
    answer = await server.wait(request, job)
    if answer is None:
        return Response(status_code=499)  # the client left: nobody reads it; ends the request cleanly
    return answer_body(server, answer, instruction, job, start)


def stream(server: Server, request: Request, job: Job, start: float) -> StreamingResponse:
    events = server.events(request, job)

    def event(name: str, data: dict) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    async def body():
        yield event("start", {"queued": server.batcher.depth})
        async for kind, value in events:
            if kind == "token":
                yield event("token", {"text": value})
            elif kind == "done":
                yield event("done", answer_body(server, value, job.instruction, job, start))
            else:
                yield event("error", {"error": value.code, "field": value.field, "message": value.message,
                                      "limit": value.limit})

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def make_router(config: ServeConfig) -> APIRouter:
    """Our /api routes, with request models carrying `config`'s limits."""
    schemas = build_schemas(config)
    InstructRequest, SummarizeRequest, RenderRequest = (
        schemas["InstructRequest"], schemas["SummarizeRequest"], schemas["RenderRequest"])
    router = APIRouter(prefix="/api", dependencies=[Depends(require_key)], responses=ERRORS)

    @router.post("/inference/instruct", response_model=AnswerResponse, tags=["inference"])
    async def instruct(request: Request, req: InstructRequest, server: ServerDep):  # type: ignore[valid-type]
        """Answer an instruction (question, summary, extraction) about one document."""
        start = time.perf_counter()
        return await respond(server, request, req, request_instruction(req), start)

    @router.post("/inference/summarize", response_model=AnswerResponse, tags=["inference"])
    async def summarize(request: Request, req: SummarizeRequest, server: ServerDep):  # type: ignore[valid-type]
        """Summarize a document: in general, its financial aspects, or as key points."""
        start = time.perf_counter()
        return await respond(server, request, req, BY_ID[SUMMARY_TEMPLATES[req.focus]].instruction, start)

    @router.post("/render", response_model=RenderResponse, tags=["documents"])
    async def render(req: RenderRequest, server: ServerDep):  # type: ignore[valid-type]
        """The pages the model would read: thumbnails (PNG data URLs), token counts, compression."""
        doc = await server.prepare(*request_document(req))

        def work() -> dict:
            thumbs = ["data:image/png;base64," + base64.b64encode(encode_png(p, req.thumbnail_px)).decode()
                      for p in doc.pages]
            visual = server.engine.visual_token_count(doc)
            compression = round(doc.text_tokens / visual, 3) if doc.text_tokens is not None and visual else None
            return RenderResponse(kind=doc.kind, pages=len(doc.pages), thumbnails=thumbs,
                                  text_tokens=doc.text_tokens, visual_tokens=visual,
                                  compression=compression).model_dump()

        return await run_in_threadpool(work)

    @router.get("/templates", tags=["documents"])
    async def templates() -> dict:
        """Instruction templates: id, name, instruction text, whether the user must type an input, and
        the JSON schema of the structured output a template offers (`structured: true`)."""
        return {"templates": [t.to_dict() for t in TEMPLATES]}

    return router


def make_service_router() -> APIRouter:
    """Liveness (open) and metrics (behind the key)."""
    router = APIRouter(tags=["service"])

    @router.get("/health")
    async def health(server: ServerDep) -> dict:
        """Liveness; answers at once even while the model is busy."""
        config = server.config
        return {"status": "ok", "model": server.engine.name, "queue": server.batcher.depth,
                "max_queue": config.max_queue, "busy": server.batcher.busy, "auth_required": config.api_key is not None,
                "limits": {"max_text_chars": config.max_text_chars, "max_pages": config.max_pages,
                           "max_new_tokens": config.max_new_tokens, "max_body_bytes": config.max_body_bytes,
                           "max_image_pixels": config.max_image_pixels,
                           "max_instruction_chars": config.max_instruction_chars}}

    @router.get("/metrics", dependencies=[Depends(require_key)])
    async def prometheus_metrics(server: ServerDep) -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
