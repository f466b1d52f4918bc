"""Remote models and routes served as models: slm as a gateway in front of a provider or a cluster.

The request's messages go to the remote model (or route) as they are; its chunks come back in the
API's own format. The blocking remote stream runs on worker threads of the gateway's own, one chunk
at a time, so the event loop never waits on the network. What answered is said in ``served_by``
(and, for a whole response, in the ``x-slm-served-by`` header).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from slm.errors import InvalidParameter, SlmError
from slm.generation.stream import Chunk, Completion, collect
from slm.server.bridge import unless_disconnected
from slm.server.errors import ollama_body, openai_body

Events = Callable[[Chunk, bool], list[str]]
"""Formats one chunk (and whether it is the first) as the API's stream lines."""

_EXECUTOR = ThreadPoolExecutor(max_workers=64, thread_name_prefix="slm-remote")
"""Threads that wait on remote streams: their own, so stalled upstreams cannot take the threads local
models need (asyncio's default pool has a handful)."""


class _Stopped(Exception):
    """The client went away: stop reading the remote answer."""


class _Pull:
    """A remote stream read one chunk at a time on a worker thread. It is closed only when no thread is
    inside it (a generator cannot be closed while it runs), so a client that leaves mid-answer ends the
    upstream call at its next chunk."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self.chunks = chunks
        self.pending: concurrent.futures.Future[Chunk | None] | None = None
        self.closed = False

    async def next(self) -> Chunk | None:
        self.pending = _EXECUTOR.submit(next, self.chunks, None)
        return await asyncio.wrap_future(self.pending)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        pending = self.pending
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: _close(self.chunks))
        else:
            _EXECUTOR.submit(_close, self.chunks)


async def answer(request: Request, start: Callable[[], Iterator[Chunk]], stream: bool, events: Events,
                 whole: Callable[[Completion], dict[str, Any]], error_line: Callable[[Exception], str],
                 end: str = "") -> Response:
    """Run a remote call; a stream (the first chunk awaited before the 200, so an immediate failure gets
    its status) or one JSON response."""
    loop = asyncio.get_running_loop()
    chunks = await loop.run_in_executor(_EXECUTOR, start)  # a parameter the provider refuses fails here: 400
    if not stream:
        stop = threading.Event()

        def read_all() -> Completion:
            def check(_: Chunk) -> None:
                if stop.is_set():
                    raise _Stopped()
            try:
                return collect(chunks, on_chunk=check)
            finally:
                _close(chunks)

        try:
            completion = await unless_disconnected(request, loop.run_in_executor(_EXECUTOR, read_all))
        except BaseException:
            stop.set()
            raise
        headers = {"x-slm-served-by": completion.served_by} if completion.served_by else None
        return JSONResponse(whole(completion), headers=headers)
    pull = _Pull(chunks)
    try:
        first = await unless_disconnected(request, pull.next())
    except BaseException:
        pull.close()
        raise
    return StreamingResponse(_lines(first, pull, events, error_line, end), headers={"Cache-Control": "no-cache"},
                             media_type="text/event-stream" if end else "application/x-ndjson")


async def _lines(first: Chunk | None, pull: _Pull, events: Events, error_line: Callable[[Exception], str],
                 end: str) -> AsyncIterator[str]:
    chunk, opening = first, True
    try:
        while chunk is not None:
            for line in events(chunk, opening):
                yield line
            opening = False
            if chunk.finish_reason is not None:
                break
            chunk = await pull.next()
    except Exception as e:  # the status line is sent: the error goes in the stream
        yield error_line(e if isinstance(e, SlmError) else SlmError("the remote stream failed"))
    finally:
        pull.close()
    if end:
        yield end


def _close(chunks: Iterator[Chunk]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        with contextlib.suppress(ValueError):  # still running elsewhere: it ends with its own thread
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
