"""HTTP API (ours and an OpenAI-compatible one) and web UI around one engine (FastAPI + uvicorn)."""

from deepsynth.serve.app import create_app
from deepsynth.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
