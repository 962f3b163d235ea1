"""``create_app(session)``: the OpenAI-compatible FastAPI app over a Session.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as SSE or not),
``GET /v1/models``, ``GET /v1/vectors`` (what ``steering`` and ``judges`` may name),
``GET /openapi.json`` and ``GET /health`` (the only route open without the API key: the
``Gate`` checks the key and the body size before any route). Generations go through
``session.start``: the Session's worker runs them one at a time, sharing the notebook's
live mix; this app bounds how many wait (``Admission``) and stops a generation whose
client went away.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from max_jupyter.errors import BadArgumentError
from max_jupyter.server.admission import Admission, Ticket
from max_jupyter.server.errors import APIError, install_handlers
from max_jupyter.server.gate import DEFAULT_MAX_BODY_BYTES, Gate
from max_jupyter.server.options import generation_options
from max_jupyter.server.protocol import ChatRequest, CompletionRequest
from max_jupyter.server.replies import Reply, model_list
from max_jupyter.server.streaming import ClientGone, GenerationStream, sse_body, wait_result
from max_jupyter.server.summary import trace_summary
from max_jupyter.steering.concepts import is_concept
from max_jupyter.validation import check_int

DEFAULT_MODEL_NAME = "max-jupyter"


def create_app(session, *, api_key: str | None = None, max_queue: int = 8,
               model_name: str = DEFAULT_MODEL_NAME,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An app serving ``session`` as the model ``model_name``. ``api_key``: when set, every
    route but ``/health`` needs ``Authorization: Bearer <api_key>``; ``max_queue``: requests
    that may wait behind the running one before more are refused with 429;
    ``max_body_bytes``: larger request bodies are refused with 413 before parsing."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise BadArgumentError(f"api_key={api_key!r} must be a non-empty str, or None for no key.")
    max_body_bytes = check_int("max_body_bytes", max_body_bytes, low=1024,
                               fix="use at least 1024 bytes (the default is 4 MiB)")
    app = FastAPI(title="MAX Engine", description="OpenAI-compatible API over a max_jupyter Session",
                  docs_url=None, redoc_url=None)
    app.state.session, app.state.admission = session, Admission(max_queue)
    install_handlers(app)
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_api_route("/health", lambda: _health(app), methods=["GET"])
    router = APIRouter(prefix="/v1")
    _add_routes(router, app, model_name)
    app.include_router(router)
    return app


def _health(app: FastAPI) -> JSONResponse:
    session = app.state.session
    status = "closed" if session.closed else "ok"
    return JSONResponse({"status": status, "busy": session.busy,
                         "requests": app.state.admission.admitted},
                        status_code=503 if session.closed else 200)


def _add_routes(router: APIRouter, app: FastAPI, model_name: str) -> None:
    session, admission = app.state.session, app.state.admission
    created = int(time.time())

    @router.get("/models")
    def models() -> dict:
        return model_list(model_name, created)

    @router.get("/vectors")
    def vectors() -> dict:
        """The names ``steering`` and ``judges`` accept (the library's vectors, and the
        concepts, each trained on first use), and the live mix now."""
        mix = {name: entry.coef for name, entry in session.mix.entries.items()}
        return {"object": "list",
                "data": [{"id": name, "object": "vector", "in_live_mix": name in mix,
                          "concept": is_concept(name)}
                         for name in session.vectors_and_concepts],
                "judges": sorted(session.judges), "mix": mix}

    @router.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await _generate(session, admission, Reply(model_name, chat=True), body, request)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _generate(session, admission, Reply(model_name, chat=False), body, request)


async def _generate(session, admission: Admission, reply: Reply,
                    body: ChatRequest | CompletionRequest, request: Request) -> Response:
    """Check, admit, start; then stream the reply or wait for it. Every error before the
    generation starts is an HTTP error (400, 404, 429, 503), never a 200."""
    if body.model != reply.model:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                       f"{reply.model!r} (GET /v1/models).", param="model", code="model_not_found")
    ticket = admission.admit()
    try:
        await run_in_threadpool(_start, session, body, ticket)
    except BaseException:
        ticket.release()
        raise
    if body.stream:
        return GenerationStream(sse_body(ticket.handle, reply, body.include_usage), ticket)
    try:
        result = await wait_result(ticket.handle, request)
    except ClientGone:
        return Response(status_code=499)
    finally:
        ticket.release()
    return JSONResponse(reply.whole(result, trace_summary(result)))


def _start(session, body: ChatRequest | CompletionRequest, ticket: Ticket) -> None:
    """Validate ``body`` against the session and queue its generation on the worker."""
    prompt, options = generation_options(session, body)
    ticket.attach(session.start(prompt, options))
