"""From a request's engine streams (one per prompt) to an HTTP answer: SSE events, or one body.

Each ``RequestStream`` holds only its newest cumulative output, so a slow reader skips the ones
between and memory per request stays one output per prompt.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deltaserve.server.engine_loop import RequestFailedError, RequestStream
from deltaserve.server.responses import ResponseBuilder, sse
from deltaserve.server.serving import RequestError

Transform = Callable[[Any], Any]


class EngineStreamResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (done, client gone, cancelled)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """``(prompt index, newest output or exception)`` from all streams as they arrive, until each
    has finished or failed."""
    pending = {asyncio.ensure_future(s.next()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                item = future.result()
                if isinstance(item, BaseException) or item.finished:
                    streams[index].finished = True
                else:
                    pending[asyncio.ensure_future(streams[index].next())] = index
                yield index, item
    finally:
        for future in pending:
            future.cancel()


def _error_of(item: BaseException) -> RequestError:
    if isinstance(item, RequestFailedError):
        return RequestError(str(item), status=500, type="server_error", code="request_failed")
    return RequestError(str(item), status=503, type="server_error", code="engine_stopped")


async def stream_events(streams: list[RequestStream], builder: ResponseBuilder, include_usage: bool,
                        transform: Transform) -> AsyncIterator[str]:
    for event in builder.first_chunks(builder.n):
        yield event
    finals: dict[int, Any] = {}
    async for index, item in merged(streams):
        if isinstance(item, BaseException):
            yield sse(_error_of(item).body())
            yield sse("[DONE]")
            return
        item = transform(item)
        for event in builder.chunks(item, index):
            yield event
        if item.finished:
            finals[index] = item
    if include_usage:
        yield builder.usage_chunk([finals[i] for i in range(len(streams))])
    yield sse("[DONE]")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, streams: list[RequestStream], builder: ResponseBuilder,
                  transform: Transform) -> Response:
    """Wait for every prompt's final output; a client that leaves first gets 499 (the caller aborts)."""
    finals: dict[int, Any] = {}

    async def gather() -> None:
        async for index, item in merged(streams):
            if isinstance(item, BaseException):
                raise _error_of(item)
            if item.finished:
                finals[index] = transform(item)

    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    work = asyncio.ensure_future(gather())
    try:
        done, _ = await asyncio.wait({work, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            return Response(status_code=499)  # nobody reads it
        work.result()
        return JSONResponse(builder.response([finals[i] for i in range(len(streams))]))
    finally:
        work.cancel()
        disconnected.cancel()
