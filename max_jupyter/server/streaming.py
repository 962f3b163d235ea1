"""From a GenerationHandle (worker thread) to the event loop: step events, the result, the
SSE body of a streamed reply, and the response that frees the request's slot however it ends.

A client that disconnects mid-stream cancels the response's task at once (Starlette listens
for ``http.disconnect`` while streaming); the response's ``finally`` then stops the
generation, which ends within one step. A non-streamed request watches for the disconnect
the same way while it waits.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from max_jupyter.orchestrator.trace import StepEvent
from max_jupyter.server.admission import Ticket
from max_jupyter.server.errors import generation_failed
from max_jupyter.server.replies import Reply, sse
from max_jupyter.server.summary import trace_summary


@dataclass(frozen=True)
class Finished:
    """The last item of ``follow``: the handle's result."""

    result: Any


@dataclass(frozen=True)
class _Failed:
    error: BaseException


async def follow(handle) -> AsyncIterator[StepEvent | Finished]:
    """Yield the handle's ``StepEvent``s in order, then ``Finished``; the worker's exception
    is raised here. A listener of the handle's event pump feeds the loop; it is
    unsubscribed when this generator ends, however it ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            handle.stop()

    def end(ended) -> None:
        try:
            put(Finished(ended.result(0)))
        except BaseException as error:  # noqa: BLE001 - delivered to the request's task
            put(_Failed(error))

    listener = handle.subscribe(put, end)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item
            if isinstance(item, Finished):
                return
    finally:
        handle.unsubscribe(listener)


async def sse_body(handle, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    """The body of a streamed reply: a chunk per step with new text, the chunk with the
    finish reason and trace summary, the usage chunk if asked, ``[DONE]``; an error on the
    worker ends the stream with an ``{"error": ...}`` event (the ``openai`` client raises it)."""
    if reply.chat:
        yield sse(reply.chunk("", first=True))
    try:
        async for item in follow(handle):
            if isinstance(item, StepEvent):
                if item.text:
                    yield sse(reply.chunk(item.text))
                continue
            result = item.result
            yield sse(reply.last_chunk(result, trace_summary(result), include_usage))
            if include_usage:
                yield sse(reply.usage_chunk(result))
    except Exception as error:  # noqa: BLE001 - the stream's 200 is sent: report in-band
        yield sse(generation_failed(error).body())
        return
    yield sse("[DONE]")


class GenerationStream(StreamingResponse):
    """A streamed reply that releases its ticket (stopping the generation) when the
    response ends for any reason: finished, client gone, server shutting down."""

    def __init__(self, body: AsyncIterator[bytes], ticket: Ticket):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


class ClientGone(Exception):
    """The client disconnected before its non-streamed reply was ready."""


async def wait_result(handle, request: Request) -> Any:
    """The handle's result, awaited without blocking the loop; raises ``ClientGone`` if the
    client disconnects first (the caller's ticket release then stops the generation), and
    ``APIError(500)`` if the generation failed on the worker."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def result() -> Any:
        return await handle

    done_task, gone_task = asyncio.ensure_future(result()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_task.cancel()
    if not done_task.done():
        done_task.cancel()
        raise ClientGone()
    try:
        return done_task.result()
    except Exception as error:
        raise generation_failed(error) from error
