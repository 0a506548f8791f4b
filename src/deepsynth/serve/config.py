"""Server settings: limits, micro-batching, API key, allowed Host names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

API_KEY_ENV = "DEEPSYNTH_API_KEY"
ALLOWED_HOSTS_ENV = "DEEPSYNTH_ALLOWED_HOSTS"
#: Host names a server bound to a loopback address answers to by default.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeConfig:
    """Everything the HTTP API enforces. Limits are reported by name in 4xx answers.

    max_body_bytes:        request body size (checked before the body is parsed).
    max_text_chars:        `text` characters (also a PDF's text layer).
    max_instruction_chars: `instruction` / template `input` characters.
    max_pages:             pages per document (`pages` images, PDF pages, rendered text pages).
    max_image_pixels:      width x height of one image, checked from its header before decoding.
    max_total_pixels:      width x height summed over a request's page images, checked from
                           every header before any page is decoded.
    max_new_tokens:        largest `max_new_tokens` a request may ask for.
    default_new_tokens:    `max_new_tokens` when a request gives none.
    max_batch_size:        requests answered by one `generate` call.
    max_wait_ms:           how long the first request of a batch waits for companions.
    max_queue:             requests waiting for the model; one more gets 503 + Retry-After.
    request_timeout_s:     a request not answered by then gets 504 (and is cancelled).
    api_key:               when set, every route except /health and the web UI (/ and /static)
                           needs `Authorization: Bearer <api_key>`: /api, /metrics, /docs, /openapi.json.
    allowed_hosts:         Host header names (no port) the server answers to; others get 400. None
                           = LOOPBACK_HOSTS while the server is bound to a loopback address (a web
                           page cannot reach it through DNS rebinding) and any name otherwise;
                           "*" allows any name. From DEEPSYNTH_ALLOWED_HOSTS (comma-separated).
    max_pdf_content_bytes: decoded bytes of a PDF's page-description streams, measured before
                           any page is parsed (see DocumentLimits).
    max_pdf_objects:       drawing objects PDFium may find in a PDF's pages, summed, checked
                           before each page's text is extracted.
    min_image_side:        shortest side of a page image (pixels) or image PDF page (points).
    max_aspect_ratio:      longest / shortest side of a page image or image PDF page.
    cache_bytes:           byte bound of the engine's document cache (None = the engine's own,
                           256 MiB by default); pages are cached at the size the model reads.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_text_chars: int = 100_000
    max_instruction_chars: int = 2_000
    max_pages: int = 16
    max_image_pixels: int = 16_000_000
    max_total_pixels: int = 64_000_000
    max_new_tokens: int = 512
    default_new_tokens: int = 128
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 300.0
    api_key: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] | None = None
    max_pdf_content_bytes: int = 2_000_000
    max_pdf_objects: int = 200_000
    min_image_side: int = 8
    max_aspect_ratio: float = 20.0
    cache_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_text_chars", "max_instruction_chars", "max_pages", "max_image_pixels",
                     "max_new_tokens", "default_new_tokens", "max_batch_size", "max_queue", "max_pdf_content_bytes",
                     "max_pdf_objects", "min_image_side", "max_total_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_new_tokens ({self.default_new_tokens}) exceeds max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None
        if self.allowed_hosts is not None:
            hosts = tuple(h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip())
            if not hosts:
                raise ValueError("allowed_hosts is empty: give host names, or '*' to allow any")
            self.allowed_hosts = hosts

    @classmethod
    def from_env(cls, **overrides) -> "ServeConfig":
        """Config with `api_key` from DEEPSYNTH_API_KEY and `allowed_hosts` from DEEPSYNTH_ALLOWED_HOSTS."""
        overrides.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
        hosts = os.environ.get(ALLOWED_HOSTS_ENV, "").strip()
        overrides.setdefault("allowed_hosts", tuple(hosts.split(",")) if hosts else None)
        return cls(**overrides)
