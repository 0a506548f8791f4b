"""HTTP API and web UI around one `InstructionEngine` (FastAPI + uvicorn)."""

from deepsynth.serve.app import create_app
from deepsynth.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
