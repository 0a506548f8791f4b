"""The outermost layer: request ids, Host allow-list, API key, body size, no traceback leaving.

Authentication happens here, before the body is read: a caller without the key learns nothing
about the request models and cannot make the server buffer a body. The routers also declare the
key as a dependency (`deps.require_key`) so that the OpenAPI document shows it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from deepsynth.serve.config import LOOPBACK_HOSTS, ServeConfig
from deepsynth.serve.errors import error_response, is_openai_path

if TYPE_CHECKING:
    from deepsynth.serve.metrics import Metrics

logger = logging.getLogger(__name__)

_BEARER = re.compile(r"(?i)(bearer\s+|hf_)[\w.~+/=-]+")
# Routes open without the API key: liveness and the web page (which asks for the key itself).
OPEN_PATHS = ("/health", "/", "/favicon.ico")
# Static files open without the key: the web page's, and the API docs page's (Swagger UI, public).
OPEN_PREFIXES = ("/static/", "/static-docs/")


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


def bearer_matches(value: bytes | None, key: bytes) -> bool:
    """Whether an Authorization header value is `Bearer <key>` (constant-time comparison)."""
    if not value:
        return False
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class GuardMiddleware:
    """Request ids, Host allow-list, API key, body size, and no stack trace ever leaving the app."""

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
        path = scope.get("path", "")
        openai = is_openai_path(path)

        async def send_wrapper(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status_box["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        async def respond(status: int, code: str, message: str, **kw) -> None:
            await error_response(status, code, message, openai=openai, **kw)(scope, receive, send_wrapper)

        try:
            host_error = self._host_error(scope)
            if host_error is not None:
                await respond(400, "host_not_allowed", host_error, field="Host")
                return
            if self._key is not None and self._needs_key(path) and not self._authorized(scope):
                await respond(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              field="Authorization", headers={"WWW-Authenticate": "Bearer"})
                return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    await respond(413, "body_too_large", f"the request body exceeds {self.config.max_body_bytes} "
                                  "bytes", field="body", limit=self.config.max_body_bytes)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # the one place errors become a 500; no traceback is sent
            logger.error("internal error on %s %s (request %s): %s: %s", scope.get("method"), path, request_id,
                         type(exc).__name__, redact(str(exc), self.config.api_key))
            if not started:
                await respond(500, "internal_error", f"internal error (request id {request_id})")
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("static" if path.startswith(OPEN_PREFIXES) else "other")
            self.metrics.requests.labels(route=label, status=str(status_box["status"])).inc()
            self.metrics.latency.labels(route=label).observe(time.perf_counter() - start)

    @staticmethod
    def _needs_key(path: str) -> bool:
        return not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))

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
        value = next((v for name, v in scope.get("headers", []) if name == b"authorization"), None)
        return bearer_matches(value, self._key)

    async def _read_body(self, scope, receive) -> bytes | None:
        limit = self.config.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass  # not a number: the body is counted as it arrives instead
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
