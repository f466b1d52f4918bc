"""Scheduler requests seen from asyncio.

The scheduler calls back on its engine thread; ``Batch`` hands each chunk to the event loop with
``call_soon_threadsafe`` and the handler awaits them, so the loop never blocks on compute. However an
HTTP call ends (done, client gone, server stopping) its requests are cancelled, which frees their
sequences within one engine step.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from slm.api import Model
from slm.errors import InvalidParameter
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, collect
from slm.serving.scheduler import Request as ScheduledRequest
from slm.server.errors import RequestTimeout
from slm.server.pool import Served

T = TypeVar("T")

Job = tuple[list[int], GenerationParams]
"""A prompt's token ids and how to continue it."""


def check_request(model: Model, params: GenerationParams, prompts: Sequence[list[int]] = ()) -> None:
    """Fail before queueing on what the model cannot do at all (the scheduler checks the rest)."""
    info = model.info
    if params.max_tokens is not None and params.max_tokens >= info.context_length:
        raise InvalidParameter(
            "max_tokens", f"{params.max_tokens} leaves no room for a prompt in this model's context of "
            f"{info.context_length} tokens",
        )
    beyond = sorted(t for t in params.logit_bias if t >= info.vocab_size)
    if beyond:
        raise InvalidParameter(
            "logit_bias", f"token id {beyond[0]} is not in this model's vocabulary (0..{info.vocab_size - 1})"
        )
    for prompt in prompts:
        bad = next((t for t in prompt if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise InvalidParameter(
                "prompt", f"token id {bad} is not in this model's vocabulary (0..{info.vocab_size - 1})"
            )


def jobs_for(prompts: Sequence[list[int]], params: GenerationParams, n: int) -> list[Job]:
    """``n`` jobs per prompt, prompt-major (choice ``i`` is prompt ``i // n``). With a seed, choice ``j``
    of a prompt uses seed + j, so the choices differ yet the request is reproducible."""
    return [
        (prompt, params if params.seed is None else params.replace(seed=params.seed + j))
        for prompt in prompts
        for j in range(n)
    ]


class Batch:
    """The scheduler requests of one HTTP call, their chunks merged on one queue, tagged by index.
    With ``timeout``, the whole call (queueing included) must end within that many seconds."""

    def __init__(self, served: Served, jobs: Sequence[Job]) -> None:
        scheduler = served.scheduler
        self._loop = asyncio.get_running_loop()
        self._timeout = served.timeout
        self._deadline = None if served.timeout is None else self._loop.time() + served.timeout
        self._queue: asyncio.Queue[tuple[int, Chunk | Exception]] = asyncio.Queue()
        self._requests: list[ScheduledRequest] = []
        self._open: set[int] = set()
        try:
            for index, (prompt, params) in enumerate(jobs):
                put = functools.partial(self._put, index)
                self._requests.append(scheduler.submit(prompt, params, put, put))
                self._open.add(index)
        except BaseException:  # e.g. QueueFull at the third of n: withdraw the first two
            self.cancel()
            raise

    def _put(self, index: int, item: Chunk | Exception) -> None:
        # On the engine thread. If the loop is closed this raises, and the scheduler drops the request.
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

    def _left(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    @property
    def done(self) -> bool:
        return not self._open

    async def next(self) -> tuple[int, Chunk]:
        """The next chunk of any of the requests. A request's error is raised (the others cancelled)."""
        while True:
            try:
                index, item = await asyncio.wait_for(self._queue.get(), self._left())
            except TimeoutError:
                self.cancel()
                raise RequestTimeout(f"the request did not finish within {self._timeout:g} s (--timeout)") from None
            if index not in self._open:
                continue  # a cancelled request's last words
            if isinstance(item, Exception):
                self.cancel()
                raise item
            if item.finish_reason is not None:
                self._open.discard(index)
            return index, item

    async def completions(self) -> list[Completion]:
        """Every request run to its end, in index order."""
        chunks: list[list[Chunk]] = [[] for _ in self._requests]
        while self._open:
            index, chunk = await self.next()
            chunks[index].append(chunk)
        return [collect(c) for c in chunks]

    def cancel(self) -> None:
        for index in self._open:
            self._requests[index].cancel()
        self._open.clear()


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, unless the client goes away first: then cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise ClientGone()
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read: the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class BatchStream(StreamingResponse):
    """A streamed answer that cancels its batch however it ends: finished, client gone, or stopping."""

    def __init__(self, content: AsyncIterator[str], batch: Batch, media_type: str) -> None:
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.batch = batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.batch.cancel()
