"""The OpenAI-compatible API under /v1, so the openai client and tools built for it work.

    GET  /v1/models             the one served model
    POST /v1/chat/completions   an answer about a document, plain or streamed (SSE chunks, then
                                `data: [DONE]`)

The model reads (pages, instruction): the pages are the `image_url` parts of the user messages
(data: URLs only: the server fetches nothing), or a text / PDF document in the extension field
`document` (`extra_body={"document": {"text": ...}}` with the openai client), rendered with the
model bundle's render config; the instruction is the text of the last user message. System and
earlier assistant messages are accepted and not shown to the model, which answers one
instruction at a time. `response_format` of type `json_schema` (or `json_object`) gives
structured output. Limits, auth (`Authorization: Bearer`) and errors (OpenAI's shape, with the
limit) are the server's own.
"""

# No `from __future__ import annotations`: FastAPI reads the per-app request models at runtime.
import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from deepsynth.inference.documents import Markdown, Pdf, clean_text
from deepsynth.inference.interface import Answer
from deepsynth.serve.batcher import Job
from deepsynth.serve.config import ServeConfig
from deepsynth.serve.deps import Server, ServerDep, decode_b64, require_key
from deepsynth.serve.errors import APIError

FINISH = {"eos": "stop", "loop": "stop", "max_new_tokens": "length", "cancelled": "stop"}
#: The schema `response_format: {"type": "json_object"}` stands for.
ANY_OBJECT = {"type": "object"}
MAX_MESSAGES = 64


def build_models(config: ServeConfig) -> dict[str, type[BaseModel]]:
    """Request models of /v1 with this server's limits."""
    Instruction = Annotated[str, Field(max_length=config.max_instruction_chars)]
    B64 = Annotated[str, Field(max_length=config.max_body_bytes)]
    NewTokens = Annotated[int, Field(ge=1, le=config.max_new_tokens)]

    class ImageURL(BaseModel):
        url: B64 = Field(description="A data: URL (data:image/png;base64,...); remote URLs are refused.")
        detail: str | None = None

    class ContentPart(BaseModel):
        type: Literal["text", "image_url"]
        text: Instruction | None = None
        image_url: ImageURL | None = None

    class Message(BaseModel):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: Instruction | list[ContentPart] | None = None

    class DocumentExtension(BaseModel):
        """A document rendered to pages with the model's render config (exactly one of text / pdf)."""

        model_config = ConfigDict(extra="forbid")
        text: Annotated[str, Field(max_length=config.max_text_chars)] | None = None
        markdown: bool = False
        pdf: B64 | None = Field(None, description="A PDF, base64 or a data: URL.")

    class JsonSchemaFormat(BaseModel):
        model_config = ConfigDict(populate_by_name=True)
        name: str = "answer"
        description: str | None = None
        schema_: dict[str, Any] | None = Field(None, alias="schema")
        strict: bool | None = None

    class ResponseFormat(BaseModel):
        type: Literal["text", "json_object", "json_schema"]
        json_schema: JsonSchemaFormat | None = None

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class ChatRequest(BaseModel):
        """OpenAI's chat completion request; fields it has that this server does not use are ignored."""

        model_config = ConfigDict(extra="ignore")
        model: str
        messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
        max_tokens: NewTokens | None = None
        max_completion_tokens: NewTokens | None = None
        temperature: float | None = Field(None, ge=0.0, le=2.0, description=(
            "None = the model's decoding default (greedy unless its bundle says otherwise)."))
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        n: int = Field(1, ge=1, le=1, description="One answer per request.")
        stream: bool = False
        stream_options: StreamOptions | None = None
        response_format: ResponseFormat | None = None
        document: DocumentExtension | None = Field(None, description="Extension: a text or PDF document.")

    return {"ChatRequest": ChatRequest}


def _document(req) -> tuple[Any, str]:
    """Pages from the image parts of user messages, or the `document` extension (exactly one)."""
    images: list[bytes] = []
    for i, message in enumerate(req.messages):
        if message.role != "user" or not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type != "image_url":
                continue
            field = f"messages[{i}].content[{j}].image_url.url"
            if part.image_url is None:
                raise APIError(422, "invalid_input", "an image_url part needs image_url.url", field=field)
            url = part.image_url.url.strip()
            if not url.lower().startswith("data:"):
                raise APIError(400, "remote_url_refused", "only data: URLs are accepted (data:image/png;base64,...); "
                               "this server fetches nothing", field=field)
            images.append(decode_b64(url, field))
    doc = req.document
    if doc is not None and images:
        raise APIError(422, "invalid_input", "give the document either as image_url parts or in `document`, "
                       "not both", field="document")
    if images:
        return images, "messages"
    if doc is None or (doc.text is None) == (doc.pdf is None):
        raise APIError(422, "invalid_input", "give a document: image_url parts (data: URLs) in a user message, or "
                       "`document` with exactly one of text / pdf", field="document")
    if doc.pdf is not None:
        return Pdf(decode_b64(doc.pdf, "document.pdf")), "document.pdf"
    if not doc.text.strip():
        raise APIError(422, "invalid_input", "the text is empty", field="document.text")
    return (Markdown(doc.text) if doc.markdown else doc.text), "document.text"


def _instruction(req) -> str:
    last = max((i for i, m in enumerate(req.messages) if m.role == "user"), default=None)
    if last is None:
        raise APIError(422, "invalid_input", "no user message: the instruction is the last user message's text",
                       field="messages")
    content = req.messages[last].content
    parts = [content] if isinstance(content, str) else [p.text for p in content or [] if p.type == "text" and p.text]
    text = clean_text("\n".join(parts)).strip()
    if not text:
        raise APIError(422, "invalid_input", "the last user message has no text: it is the instruction",
                       field=f"messages[{last}].content")
    return text


def _schema(req) -> tuple[dict | None, str]:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None, "response_format"
    if fmt.type == "json_object":
        return ANY_OBJECT, "response_format"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(422, "invalid_input", "response_format of type json_schema needs json_schema.schema",
                       field="response_format.json_schema.schema")
    return fmt.json_schema.schema_, "response_format.json_schema.schema"


def _extension(answer: Answer, job: Job, start: float) -> dict:
    """What our API reports beside the answer, under the key `deepsynth`."""
    return {"stopped": answer.stopped, "pages": answer.pages, "visual_tokens": answer.visual_tokens,
            "text_tokens": answer.text_tokens, "compression": answer.compression, "cached": answer.cached,
            "batch_size": job.batch_size, "model_ms": answer.latency_ms,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2)}


def _usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens,
            "total_tokens": answer.prompt_tokens + answer.new_tokens}


def make_router(config: ServeConfig) -> APIRouter:
    ChatRequest = build_models(config)["ChatRequest"]
    router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_key)])

    @router.get("/models")
    async def models(server: ServerDep) -> dict:
        """The served model (the only one: the model is fixed when the server starts)."""
        return {"object": "list", "data": [{"id": server.engine.name, "object": "model", "created": 0,
                                            "owned_by": "deepsynth"}]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest, server: ServerDep):  # type: ignore[valid-type]
        """OpenAI's chat completion over one document (see the module's description)."""
        start = time.perf_counter()
        if req.model != server.engine.name:
            raise APIError(404, "model_not_found", f"this server serves {server.engine.name!r} only "
                           "(GET /v1/models)", field="model")
        instruction = _instruction(req)
        doc = await server.prepare(*_document(req))
        settings = server.settings(req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p,
                                   field="max_tokens")
        schema, field = _schema(req)
        schema = server.check_schema(schema, settings, field)
        job = Job(doc=doc, instruction=instruction, settings=settings, json_schema=schema)
        completion_id = "chatcmpl-" + request.scope.get("state", {}).get("request_id", "0")
        created = int(time.time())
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _stream(server, request, job, start, completion_id, created, usage)
        answer = await server.wait(request, job)
        if answer is None:
            return Response(status_code=499)  # the client left
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": server.engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                             "finish_reason": FINISH.get(answer.stopped, "stop"), "logprobs": None}],
                "usage": _usage(answer), "deepsynth": _extension(answer, job, start)}

    return router


def _stream(server: Server, request: Request, job: Job, start: float, completion_id: str, created: int,
            include_usage: bool) -> StreamingResponse:
    events = server.events(request, job)

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": server.engine.name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                          "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n".encode()

    async def body():
        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        async for kind, value in events:
            if kind == "token":
                sent += value
                yield chunk({"content": value})
            elif kind == "done":
                # The final answer is authoritative (a loop's repeats cut, a schema's JSON closed):
                # when it is not what was streamed, one last piece carries the difference or, if
                # the streamed text must be taken back, the whole answer under `deepsynth`.
                rest = value.answer[len(sent.strip()):] if value.answer.startswith(sent.strip()) else None
                if rest:
                    yield chunk({"content": rest})
                extension = _extension(value, job, start)
                if rest is None:
                    extension["answer"] = value.answer
                yield chunk({}, FINISH.get(value.stopped, "stop"), deepsynth=extension)
                if include_usage:
                    usage = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                             "model": server.engine.name, "choices": [], "usage": _usage(value)}
                    yield f"data: {json.dumps(usage)}\n\n".encode()
            else:
                yield f"data: {json.dumps(value.openai_body())}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
