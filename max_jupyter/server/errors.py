"""Errors in OpenAI's wire shape: ``{"error": {"message", "type", "param", "code"}}``.

``APIError`` is raised anywhere in the server and rendered by the handlers that
``install_handlers`` adds to the app; request-validation errors, bad input refused by the
Session (``MaxJupyterError``) and unknown routes come out in the same shape, so the
official ``openai`` client raises its usual types (``BadRequestError``,
``AuthenticationError``, ``NotFoundError``, ``RateLimitError``, ...).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from max_jupyter.errors import MaxJupyterError, SessionClosedError, one_line

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error",
               429: "server_overloaded", 503: "server_unavailable"}


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body (its message on one line); ``headers`` go
    on the response."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        message = one_line(message)  # a quoted exception's text may hold line breaks
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI sends with an error."""
        return {"error": {"message": self.message,
                          "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_session_error(error: MaxJupyterError) -> APIError:
    """A Session error raised before generation started, as the HTTP error it means."""
    if isinstance(error, SessionClosedError):
        return APIError(503, f"{error} (the server's session is closed).", code="session_closed")
    return APIError(400, str(error), code=type(error).__name__)


def generation_failed(error: BaseException) -> APIError:
    """A generation that started and then failed on the worker (a judge raised, ...)."""
    return APIError(500, f"the generation failed: {type(error).__name__}: {error}",
                    code="generation_failed")


def describe_validation(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One readable message (and the first offending parameter) for pydantic's errors."""
    parts, first = [], None
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        name = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown parameter {name!r}; leave it out (see docs/server.md for "
                         "the parameters this server accepts)")
        elif e.get("type") == "value_error":
            parts.append(str(e.get("ctx", {}).get("error", e.get("msg"))))
        else:
            shown = repr(e["input"]) if "input" in e and not isinstance(e["input"], dict) else ""
            parts.append(f"{name}: {e.get('msg')}" + (f" (got {shown[:80]})" if shown else ""))
    return "; ".join(parts) or "invalid request body", first


def install_handlers(app: FastAPI) -> None:
    """Render every error the app can raise in OpenAI's shape (validation errors as 400)."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc.errors())
        return APIError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(MaxJupyterError)
    async def _session(request: Request, exc: MaxJupyterError) -> JSONResponse:
        return from_session_error(exc).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, headers=exc.headers).response()
