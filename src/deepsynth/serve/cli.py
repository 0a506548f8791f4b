"""``deepsynth serve``: the HTTP API and web UI for one model.

    deepsynth serve --model DIR [--host 127.0.0.1] [--port 8000]

Binds 127.0.0.1 unless told otherwise. Set DEEPSYNTH_API_KEY to require
`Authorization: Bearer <key>` on every route but /health and the web page (strongly advised before
binding elsewhere). On loopback only loopback Host names are answered (DNS rebinding); set
DEEPSYNTH_ALLOWED_HOSTS (comma-separated) to allow others. The model, its render config and its
decoding defaults come from the model's bundle.
"""

from __future__ import annotations

import logging
from typing import Optional

import typer

from deepsynth.inference.engines import check_dtype

logger = logging.getLogger(__name__)


def serve_command(
    model: str = typer.Option("tiny-reader", "--model", "-m", help="Model directory, preset or hub id (fixed for "
                                                                  "the server's lifetime)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 127.0.0.1 keeps the server local."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    preset: Optional[str] = typer.Option(None, help="Render preset override (default: the pages the model was "
                                                    "trained on, from its bundle)."),
    adapter: str = typer.Option(None, help="Optional LoRA adapter directory merged into the model."),
    max_batch_size: int = typer.Option(8, min=1, max=64, help="Requests answered by one generate call."),
    max_wait_ms: float = typer.Option(10.0, min=0, max=1000, help="How long a batch waits for companions."),
    max_queue: int = typer.Option(64, min=1, help="Waiting requests before 503 + Retry-After."),
    max_new_tokens: int = typer.Option(512, min=1, max=8192, help="Largest max_new_tokens a request may ask."),
    max_pages: int = typer.Option(16, min=1, max=256, help="Pages per document."),
    cache_pages: int = typer.Option(256, min=0, help="Pages the document cache keeps (0 = off)."),
    threads: int = typer.Option(0, min=0, help="torch intra-op threads (0 = torch's default); 1 is often "
                                               "fastest for small models on a busy CPU."),
    engine: str = typer.Option("hf", help="Generation engine: 'hf' (transformers) or 'vllm' (needs the vLLM "
                                          "environment of `make vllm-env`; adapters stay unmerged LoRA modules)."),
    dtype: str = typer.Option("auto", callback=check_dtype,
                              help="Weights' dtype: auto (the checkpoint's; vLLM makes float32 16-bit), float32 "
                                   "(vLLM then answers as the HF engine does), bfloat16, float16."),
) -> None:
    """Serve the HTTP API (/api, the OpenAI-compatible /v1, /docs, /metrics, /health) and the web UI (/)."""
    import torch
    import uvicorn

    from deepsynth.serve.app import is_loopback
    from deepsynth.serve.config import API_KEY_ENV

    if threads:
        torch.set_num_threads(threads)
    app = build_app(model, preset=preset, adapter=adapter, cache_pages=cache_pages, engine=engine, dtype=dtype,
                    max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                    max_new_tokens=max_new_tokens, max_pages=max_pages)
    if not is_loopback(host) and app.state.config.api_key is None:
        typer.echo(f"warning: serving on {host} without an API key; set {API_KEY_ENV} to require one", err=True)
    typer.echo(f"DeepSynth serving {model} on http://{host}:{port}/  (API docs: /docs)", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
    finally:
        # The app's shutdown closes the engine (uvicorn runs it on SIGTERM, then re-raises the
        # signal, so code after `run` may never execute); this covers `run` failing before the
        # app's startup ever ran. Closing twice is harmless.
        close = getattr(app.state.engine, "close", None)
        if close is not None:
            close()


def build_app(model: str, preset: str | None = None, adapter: str | None = None, cache_pages: int = 256,
              engine: str = "hf", dtype: str = "auto", **limits):
    """The app `deepsynth serve` runs: the model loaded from its bundle, limits from the options and
    the environment (ServeConfig.from_env)."""
    from deepsynth.inference.engines import make_engine
    from deepsynth.serve.app import create_app
    from deepsynth.serve.config import ServeConfig

    try:
        engine = make_engine(model, engine, dtype=dtype, render_preset=preset, adapter=adapter,
                             cache_pages=cache_pages)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="'--model'") from None
    cap = limits.get("max_new_tokens", engine.generation.max_new_tokens)
    try:
        # A request without max_new_tokens gets the model's own decoding default, within the server's cap.
        config = ServeConfig.from_env(**limits, default_new_tokens=min(engine.generation.max_new_tokens, cap))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return create_app(engine, config, owns_engine=True)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to a typer app."""
    app.command("serve")(serve_command)
