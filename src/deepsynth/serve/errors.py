"""Errors as JSON, in the shape each API speaks.

Our API: {"error": code, "field": name or null, "message": text, "limit": number or null}.
The OpenAI-compatible API (/v1): {"error": {"message", "type", "param", "code", "limit"}}, which
the openai client reads; `param` is our `field`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI_PREFIX = "/v1/"


class APIError(Exception):
    """An error answered as JSON with `status`; `field` and `limit` name what was wrong."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 limit: int | float | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.limit = status, code, message, field, limit
        self.headers = headers or {}

    def response(self, openai: bool = False) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.field, self.limit, self.headers, openai)

    def openai_body(self) -> dict:
        return openai_error(self.status, self.code, self.message, self.field, self.limit)


def openai_error(status: int, code: str, message: str, field: str | None, limit) -> dict:
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": field, "code": code, "limit": limit}}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   limit: int | float | None = None, headers: dict | None = None,
                   openai: bool = False) -> JSONResponse:
    body = (openai_error(status, code, message, field, limit) if openai
            else {"error": code, "field": field, "message": message, "limit": limit})
    return JSONResponse(body, status_code=status, headers=headers)


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


class ErrorResponse(BaseModel):
    error: str
    field: str | None
    message: str
    limit: int | float | None


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 503, 504)}


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request that does not fit its model, naming the field and limit."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "malformed_json", "the body is not valid JSON", field="body")
    loc = list(first.get("loc", ()))
    loc = loc[1:] if loc and loc[0] in ("body", "query", "path") else loc
    # pydantic names the union member it tried (e.g. "str", "list[ContentPart]"); the client did not
    loc = [p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("str", "list", "function-after"))]
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
    return APIError(422, "validation_error", message, field=field, limit=limit)


def install_handlers(app: FastAPI) -> None:
    """Every error the app raises becomes JSON in the shape of the API that was called."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response(is_openai_path(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return validation_error(exc).response(is_openai_path(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code, field, message = {
            400: ("malformed_json", "body", "the body is not valid JSON (UTF-8 expected)"),
            404: ("not_found", "path", "no such route"),
            405: ("method_not_allowed", "method", f"{request.method} is not allowed here"),
        }.get(exc.status_code, ("http_error", None, str(exc.detail)))
        return error_response(exc.status_code, code, message, field=field, headers=getattr(exc, "headers", None),
                              openai=is_openai_path(request.url.path))
