"""The HTTP API and web UI: `create_app(engine, config)`.

Routes (one router per API, `deepsynth.serve.routers`, over the shared `deps.Server`)
    POST /api/inference/instruct   answer an instruction about text / page images / a PDF
    POST /api/inference/summarize  summary (general, financial, key points) of a document
    POST /api/render               page count, thumbnails and compression of a document
    GET  /api/templates            instruction templates
    POST /v1/chat/completions      OpenAI-compatible chat completion (plain or streamed)
    GET  /v1/models                the served model, OpenAI's way
    GET  /health                   liveness and queue depth (never waits for the model)
    GET  /metrics                  Prometheus metrics
    GET  /docs, /redoc, /openapi.json  API documentation (Swagger UI and ReDoc served from the
                                   fastapi-offline package under /static-docs: no CDN)
    GET  /                         the web UI (static files under /static)

Every error is JSON: {"error": code, "field": name or null, "message": text, "limit": number or
null}, and OpenAI's shape under /v1. The model is fixed when the app is created; no request can
name another one.

With an API key set, every route but /health and the web UI (/ and /static, and the docs page's
static files) needs it. Every response carries an X-Request-ID; error logs name it with the
exception's message (the key and bearer tokens redacted), and a 500 answer names it too.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from deepsynth.inference.interface import Engine
from deepsynth.serve.batcher import MicroBatcher
from deepsynth.serve.config import ServeConfig
from deepsynth.serve.deps import MIN_SAMPLING_TEMPERATURE, Server, decode_b64, document_limits
from deepsynth.serve.errors import APIError, error_response, install_handlers
from deepsynth.serve.metrics import Metrics
from deepsynth.serve.middleware import GuardMiddleware, is_loopback, redact
from deepsynth.serve.routers import api, openai, ui
from deepsynth.serve.routers.api import AnswerResponse, RenderResponse, build_schemas
from deepsynth.serve.routers.ui import STATIC, UI_CSP

logger = logging.getLogger(__name__)

__all__ = ["APIError", "AnswerResponse", "MIN_SAMPLING_TEMPERATURE", "RenderResponse", "STATIC", "UI_CSP",
           "build_schemas", "create_app", "decode_b64", "error_response", "is_loopback", "redact"]

DOCS_STATIC = "/static-docs"


def create_app(engine: Engine, config: ServeConfig | None = None, owns_engine: bool = False) -> FastAPI:
    """The API + UI around one loaded engine (the model never changes while the app runs).

    owns_engine: close the engine (its `close`, where it has one) when the app shuts down; for an
    engine made for this app alone (`deepsynth serve`), since vLLM's engine processes otherwise
    outlive the server.
    """
    config = config or ServeConfig.from_env()
    if config.cache_bytes is not None:
        engine.cache.max_bytes = config.cache_bytes
    metrics_box: list[Metrics] = []
    batcher = MicroBatcher(engine, config.max_batch_size, config.max_wait_ms, config.max_queue,
                           on_batch=lambda size, seconds: metrics_box[0].on_batch(size, seconds))
    metrics = Metrics(engine, batcher)
    metrics_box.append(metrics)
    server = Server(engine=engine, config=config, batcher=batcher, metrics=metrics, limits=document_limits(config),
                    render=engine.describe()["render"])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        logger.info("serving model %s (API key %s)", engine.name, "required" if config.api_key else "not required")
        yield
        batcher.stop()
        close = getattr(engine, "close", None) if owns_engine else None
        if close is not None:
            close()

    app = FastAPIOffline(title="DeepSynth", version="0.1.0", lifespan=lifespan, static_url=DOCS_STATIC,
                         description="Instructions (questions, summaries, extraction) about documents read as page "
                                     "images, in our API (/api) and OpenAI's (/v1). The model is fixed at start-up.")
    app.state.server = server
    app.state.engine, app.state.batcher, app.state.config, app.state.metrics = engine, batcher, config, metrics
    batcher.start()
    app.add_middleware(GuardMiddleware, config=config, metrics=metrics)
    install_handlers(app)
    app.include_router(api.make_router(config))
    app.include_router(openai.make_router(config))
    app.include_router(api.make_service_router())
    app.include_router(ui.make_router())
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
