"""``Gate``: what every request passes before any route sees it — the API key (on every
path but ``/health``: the routes, ``/openapi.json`` and unknown paths alike) and the size
of its body (``max_body_bytes``: refused with 413 from ``Content-Length``, or as soon as a
streamed body grows past it, before anything is parsed or buffered beyond the limit).

A pure ASGI middleware, so a refused request costs no parsing and no more memory than the
limit; its replies have OpenAI's error shape.
"""
from __future__ import annotations

import hmac

from max_jupyter.server.errors import APIError

OPEN_PATHS = frozenset({"/health"})
"""Paths served without the API key."""
DEFAULT_MAX_BODY_BYTES = 4 << 20
"""4 MiB: a long chat for a 128k-token context (about 512 KB of text, JSON-escaped) fits;
more is refused before parsing (docs/server.md)."""


class Gate:
    """Wraps the ASGI ``app``: checks the key (``api_key`` None: no key) and the body size."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        body, refusal = await self._read(receive)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        return await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope) -> APIError | None:
        """401 without the key (unless the path is open), 413 for a declared length over
        the limit."""
        headers = dict(scope["headers"])
        if self._expected is not None and scope["path"] not in OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self._expected):
                return APIError(401, "missing or wrong API key: send the header "
                                "'Authorization: Bearer <key>' with the key the server was started "
                                "with.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"")  # uvicorn refuses one that is not a number
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large(f"{int(declared)} bytes")
        return None

    async def _read(self, receive) -> tuple[bytes, APIError | None]:
        """The whole body, or a 413 once it passes the limit (the rest is never read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(400, "the client went away while sending the body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", self._too_large(f"more than {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body has {size}, over this server's limit of "
                        f"{self.max_body_bytes} bytes; send a shorter prompt (or start the server "
                        f"with a larger --max-body-bytes).", code="request_too_large",
                        headers={"Connection": "close"})


def _replay(body: bytes, receive):
    """A ``receive`` that yields the already-read ``body`` once, then defers to ``receive``
    (which reports the disconnect a streaming route waits for)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
