"""Server settings: limits, micro-batching, API key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

API_KEY_ENV = "DEEPSYNTH_API_KEY"


@dataclass
class ServeConfig:
    """Everything the HTTP API enforces. Limits are reported by name in 4xx answers.

    max_body_bytes:        request body size (checked before the body is parsed).
    max_text_chars:        `text` characters (also a PDF's text layer).
    max_instruction_chars: `instruction` / template `input` characters.
    max_pages:             pages per document (`pages` images, PDF pages, rendered text pages).
    max_image_pixels:      width x height of one image, checked from its header before decoding.
    max_new_tokens:        largest `max_new_tokens` a request may ask for.
    default_new_tokens:    `max_new_tokens` when a request gives none.
    max_batch_size:        requests answered by one `generate` call.
    max_wait_ms:           how long the first request of a batch waits for companions.
    max_queue:             requests waiting for the model; one more gets 503 + Retry-After.
    request_timeout_s:     a request not answered by then gets 504 (and is cancelled).
    api_key:               when set, every /api route needs `Authorization: Bearer <api_key>`.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_text_chars: int = 100_000
    max_instruction_chars: int = 2_000
    max_pages: int = 16
    max_image_pixels: int = 16_000_000
    max_new_tokens: int = 512
    default_new_tokens: int = 128
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 300.0
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_text_chars", "max_instruction_chars", "max_pages", "max_image_pixels",
                     "max_new_tokens", "default_new_tokens", "max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_new_tokens ({self.default_new_tokens}) exceeds max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None

    @classmethod
    def from_env(cls, **overrides) -> "ServeConfig":
        """Config with `api_key` from the environment variable DEEPSYNTH_API_KEY (if set)."""
        overrides.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
        return cls(**overrides)
