"""Remote models and routes served as models: slm as a gateway in front of a provider or a cluster.

The request's messages go to the remote model (or route) as they are; its chunks come back in the
API's own format. The blocking remote stream runs in worker threads, one chunk at a time, so the event
loop never waits on the network. What answered is said in ``served_by`` (and, for a whole response, in
the ``x-slm-served-by`` header).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from slm.errors import InvalidParameter, SlmError
from slm.generation.stream import Chunk, Completion, collect
from slm.server.bridge import unless_disconnected
from slm.server.errors import ollama_body, openai_body

Events = Callable[[Chunk, bool], list[str]]
"""Formats one chunk (and whether it is the first) as the API's stream lines."""


async def _next(chunks: Iterator[Chunk]) -> Chunk | None:
    return await asyncio.to_thread(next, chunks, None)


async def answer(request: Request, start: Callable[[], Iterator[Chunk]], stream: bool, events: Events,
                 whole: Callable[[Completion], dict[str, Any]], error_line: Callable[[Exception], str],
                 end: str = "") -> Response:
    """Run a remote call; a stream (the first chunk awaited before the 200, so an immediate failure gets
    its status) or one JSON response."""
    chunks = await asyncio.to_thread(start)  # a parameter the provider refuses fails here: 400
    if not stream:
        try:
            completion = await unless_disconnected(request, asyncio.to_thread(collect, chunks))
        finally:
            _close(chunks)
        headers = {"x-slm-served-by": completion.served_by} if completion.served_by else None
        return JSONResponse(whole(completion), headers=headers)
    try:
        first = await unless_disconnected(request, _next(chunks))
    except BaseException:
        _close(chunks)
        raise
    return StreamingResponse(_lines(first, chunks, events, error_line, end), headers={"Cache-Control": "no-cache"},
                             media_type="text/event-stream" if end else "application/x-ndjson")


async def _lines(first: Chunk | None, chunks: Iterator[Chunk], events: Events, error_line: Callable[[Exception], str],
                 end: str) -> AsyncIterator[str]:
    chunk, opening = first, True
    try:
        while chunk is not None:
            for line in events(chunk, opening):
                yield line
            opening = False
            if chunk.finish_reason is not None:
                break
            chunk = await _next(chunks)
    except Exception as e:  # the status line is sent: the error goes in the stream
        yield error_line(e if isinstance(e, SlmError) else SlmError("the remote stream failed"))
    finally:
        _close(chunks)
    if end:
        yield end


def _close(chunks: Iterator[Chunk]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def only_one_choice(n: int) -> None:
    if n != 1:
        raise InvalidParameter("n", "a remote model or route answers one choice per request")


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def openai_error_line(error: Exception) -> str:
    return sse(openai_body(error))


def ollama_error_line(error: Exception) -> str:
    return json.dumps(ollama_body(error), ensure_ascii=False) + "\n"
