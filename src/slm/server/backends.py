"""What a served name stands for, seen from asyncio: a backend that answers prompts with chunks.

A handler parses its request, asks the pool for the backend of the model it names, hands it the
prompts and reads back ``Answers``: the chunks of every choice, tagged by index. It never asks which
kind of backend it holds.

- ``LocalBackend``: a model of this machine. Its prompts are prepared (``Model.prepare``: tokenized, their
  tools' grammar added) on the thread of the scheduler that owns the engine (``Scheduler.call``), then
  submitted; the scheduler calls back on that thread, where ``Batch`` splits each chunk's tool calls
  from its text and posts it to the event loop through the model's ``Handoff``. A beam search
  (``num_beams > 1``) is driven from here one step at a time, each step a ``Scheduler.call`` (one batched
  evaluation of its beams between two scheduler steps): ``BeamAnswers``.
- ``RemoteBackend``: a remote model or a route (slm as a gateway). Its blocking stream is read on
  worker threads of its own, one chunk at a time, so the event loop never waits on the network. Tools
  and grammars are not sent upstream yet: a request with them is refused before any upstream call.

However an HTTP call ends (done, client gone, server stopping), its answers are cancelled: a local
model's sequences are freed within one engine step, a remote stream is closed at its next chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from slm.errors import ClientGone, InvalidParameter, RemoteBadResponse, RequestTimeout, SlmError
from slm.generation.beam import BeamCompletion, BeamSearch
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, Usage, collect, fit_to_context
from slm.generation.tool_calls import ToolCallParser
from slm.model import LanguageModel, Model, Prompt, ask
from slm.model.images import image_places
from slm.model.local import Prepared
from slm.serving.scheduler import Request as ScheduledRequest
from slm.serving.scheduler import Scheduler
from slm.store.catalog import ResolvedModel

T = TypeVar("T")
log = logging.getLogger("slm.server")

WRITE_TIMEOUT = 30.0
"""Seconds a streamed answer waits for a client that does not read before it drops the stream."""

Job = tuple[list[int], GenerationParams, ToolCallParser | None]
"""A prompt's token ids, how to continue it, and the parser of its tool calls (its own: it holds state)."""

_REMOTE_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="slm-remote")
"""Threads that wait on remote streams: their own, so stalled upstreams cannot take the threads local
models need (asyncio's default pool has a handful)."""


class Answers(ABC):
    """The chunks of one HTTP call's choices, tagged by index."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Every choice has had its last chunk."""

    @abstractmethod
    async def next(self) -> tuple[int, Chunk]:
        """The next chunk of any choice. A choice's error is raised (the others cancelled)."""

    @abstractmethod
    async def completions(self) -> list[Completion]:
        """Every choice run to its end, in index order."""

    @abstractmethod
    def prompt_ids(self, index: int) -> list[int]:
        """The token ids choice ``index`` continued (Ollama's ``context``); empty when the model is remote."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop every choice that is still running (safe to call twice)."""


class Backend(ABC):
    """A served model: ``model`` for what it is (its info, whether it is tuned to chat), ``answer`` to
    run prompts on it."""

    def __init__(self, name: str, model: LanguageModel, load_seconds: float = 0.0) -> None:
        self.name = name
        self.model = model
        self.load_seconds = load_seconds
        """What this request spent loading it (Ollama's ``load_duration``)."""

    @abstractmethod
    async def answer(self, prompts: Sequence[Prompt], params: GenerationParams, n: int = 1) -> Answers:
        """Start ``n`` choices for each prompt (prompt-major: choice ``i`` continues prompt ``i // n``).
        A request the model cannot take at all fails here; the rest fails from ``Answers.next``."""


# --- a model of this machine ------------------------------------------------------------------------


class Handoff:
    """Carries chunks from an engine thread to the event loop with one wake-up of the loop for all that was
    posted meanwhile. A scheduler step hands a chunk to every running request: waking the loop once a step
    instead of once a token leaves more of the cores to the engine (on a small machine they are shared)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._posted: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[T], item: T) -> None:
        """Put ``item`` on ``queue`` in ``loop``, soon (from any thread). Raises RuntimeError once the loop is
        closed, so that the poster stops."""
        if loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            posted = self._posted.setdefault(loop, [])
            posted.append((queue, item))
            if len(posted) > 1:
                return  # the loop has yet to take what came before: it takes this too
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._posted.pop(loop, None)
            raise

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            posted = self._posted.pop(loop, [])
        for queue, item in posted:
            queue.put_nowait(item)


@dataclass(eq=False, kw_only=True)
class Resident:
    """A model the pool has loaded: what leasing it, keeping it alive and unloading it need."""

    name: str
    file: ResolvedModel
    memory: int
    """Bytes estimated for it when it was loaded (weights, KV cache, buffers)."""
    loaded_at: float
    """When it was loaded (the pool's clock)."""
    leases: int = 0
    """HTTP calls using it now."""
    expires_at: float = math.inf
    """When it is unloaded if idle (the pool's clock; inf: never)."""
    last_used: float = 0.0

    def idle(self) -> bool:
        """No lease, nothing queued or running: it may be unloaded."""
        raise NotImplementedError


@dataclass(eq=False, kw_only=True)
class Served(Resident):
    """A loaded model and the scheduler that owns its engine (the pool loads and unloads them)."""

    model: Model
    scheduler: Scheduler
    timeout: float | None = None
    """Seconds one of its requests may take, queueing included (None: no limit)."""
    lookup: int = 0
    """Prompt-lookup draft length for its requests that do not set one (``slm serve --lookup``)."""
    handoff: Handoff = field(default_factory=Handoff)
    """How its scheduler's chunks reach the event loop."""

    def idle(self) -> bool:
        stats = self.scheduler.stats()
        return self.leases == 0 and stats["running"] == 0 and stats["waiting"] == 0


class LocalBackend(Backend):
    def __init__(self, served: Served, load_seconds: float = 0.0, adapter: str | None = None) -> None:
        """``adapter``: the LoRA adapter (loaded over the served model) the requests go through, by name."""
        super().__init__(adapter or served.name, served.model, load_seconds)
        self.served = served
        self.adapter = adapter

    async def answer(self, prompts: Sequence[Prompt], params: GenerationParams, n: int = 1) -> Answers:
        model = self.served.model
        if self.adapter is not None:
            params = params.replace(adapter=self.adapter)
        if self.served.lookup and "lookup" not in params.given and params.num_beams == 1:  # beams do not draft
            params = params.replace(lookup=self.served.lookup)
        prepared = await asyncio.wrap_future(self.served.scheduler.call(lambda: [model.prepare(p, params)
                                                                                 for p in prompts]))
        if params.num_beams > 1:
            held = model.engine.max_sequences
            if params.num_beams > held:
                raise InvalidParameter("best_of", f"{params.num_beams} beams need {params.num_beams} sequences; "
                                       f"this server holds {held} per model (slm serve --parallel)")
            jobs = [fit_to_context(model.info, p.tokens, p.params) for p in prepared]
            return BeamAnswers(self.served, jobs, prepared[0].params, n)
        return Batch(self.served, jobs_for(prepared, n))


def jobs_for(prompts: Sequence[Prepared], n: int) -> list[Job]:
    """``n`` jobs per prompt, prompt-major (choice ``i`` is prompt ``i // n``), each ``Prepared.choice``: a
    parser of its own, and with a seed, seed + j for choice ``j``."""
    return [(c.tokens, c.params, c.parser) for p in prompts for c in (p.choice(j) for j in range(n))]


class Batch(Answers):
    """The scheduler requests of one HTTP call, their chunks merged on one queue, tagged by index.
    With the served model's ``timeout``, the whole call (queueing included) must end within that many
    seconds."""

    def __init__(self, served: Served, jobs: Sequence[Job]) -> None:
        scheduler = served.scheduler
        self._handoff = served.handoff
        self._loop = asyncio.get_running_loop()
        self._timeout = served.timeout
        self._deadline = None if served.timeout is None else self._loop.time() + served.timeout
        self._queue: asyncio.Queue[tuple[int, Chunk | Exception]] = asyncio.Queue()
        self._jobs = list(jobs)
        self._requests: list[ScheduledRequest] = []
        self._open: set[int] = set()
        try:
            for index, (prompt, params, parser) in enumerate(jobs):
                put = functools.partial(self._put, index, parser)
                self._requests.append(scheduler.submit(prompt, params, put, put))
                self._open.add(index)
        except BaseException:  # e.g. QueueFull at the third of n: withdraw the first two
            self.cancel()
            raise

    def _put(self, index: int, parser: ToolCallParser | None, item: Chunk | Exception) -> None:
        # On the engine thread: tool calls are parsed here, so the event loop pays nothing for them.
        # If the loop is closed this raises, and the scheduler drops the request.
        if parser is not None and isinstance(item, Chunk):
            try:
                item = parser.chunk(item)
            except Exception as e:  # a parser's bug fails its answer; raised here, it would hang it
                item = e
        self._handoff.post(self._loop, self._queue, (index, item))

    def _left(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    @property
    def done(self) -> bool:
        return not self._open

    async def next(self) -> tuple[int, Chunk]:
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
        chunks: list[list[Chunk]] = [[] for _ in self._requests]
        while self._open:
            index, chunk = await self.next()
            chunks[index].append(chunk)
        return [collect(c) for c in chunks]

    def prompt_ids(self, index: int) -> list[int]:
        return self._jobs[index][0]

    def cancel(self) -> None:
        for index in self._open:
            self._requests[index].cancel()
        self._open.clear()


class BeamAnswers(Answers):
    """The beam searches of one HTTP call, one prompt after the other. Each step of a search is a
    ``Scheduler.call`` (its beams' batched evaluation on the engine thread, between two scheduler steps), so
    other requests go on meanwhile and a cancelled or timed-out call stops at the next step, its sequences
    freed. No beam is an answer before its search ends: choice ``i * n + j`` (prompt ``i``'s ``j``-th best
    beam) is one chunk, once all have ended."""

    def __init__(self, served: Served, prompts: Sequence[list[int]], params: GenerationParams, n: int) -> None:
        self._served = served
        self._prompts = list(prompts)
        self._params = params
        self._n = n
        self._timeout = served.timeout
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._chunks: list[tuple[int, Chunk]] | None = None

    async def _run(self) -> list[BeamCompletion]:
        return [await self._search(prompt) for prompt in self._prompts]

    async def _search(self, prompt: list[int]) -> BeamCompletion:
        scheduler, engine = self._served.scheduler, self._served.model.engine

        async def on_engine(work: Callable[[], T]) -> T:
            return await asyncio.wrap_future(scheduler.call(work))

        search = await on_engine(lambda: BeamSearch(engine, prompt, self._params))
        try:
            while not search.is_done():
                await on_engine(lambda: search.advance(engine.evaluate(search.pending())))
            return await on_engine(search.completion)
        finally:
            if not search.is_done():  # cancelled or failed between steps: free its sequences on the engine thread
                with contextlib.suppress(SlmError):
                    scheduler.call(search.close)

    async def _finished(self) -> list[BeamCompletion]:
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), self._timeout)
        except TimeoutError:
            self.cancel()
            raise RequestTimeout(f"the request did not finish within {self._timeout:g} s (--timeout)") from None

    @property
    def done(self) -> bool:
        return self._chunks is not None and not self._chunks

    async def next(self) -> tuple[int, Chunk]:
        if self._chunks is None:
            self._chunks = [(i * self._n + j, Chunk(c.text, None, finish_reason=c.finish_reason, usage=c.usage,
                                                     timings=c.timings))
                            for i, completion in enumerate(await self._finished())
                            for j, c in enumerate(self._split(completion))]
        return self._chunks.pop(0)

    async def completions(self) -> list[Completion]:
        return [c for completion in await self._finished() for c in self._split(completion)]

    def _split(self, completion: BeamCompletion) -> list[Completion]:
        """The ``n`` best beams of a search, each as a completion."""
        return [Completion(beam.text, beam.finish_reason, Usage(completion.usage.prompt_tokens, len(beam.tokens)),
                           completion.timings, list(beam.tokens)) for beam in completion.beams[: self._n]]

    def prompt_ids(self, index: int) -> list[int]:
        return self._prompts[index // self._n]

    def cancel(self) -> None:
        self._task.cancel()


# --- a remote model or a route ----------------------------------------------------------------------


class RemoteBackend(Backend):
    async def answer(self, prompts: Sequence[Prompt], params: GenerationParams, n: int = 1) -> Answers:
        if n != 1:
            raise InvalidParameter("n", "a remote model or route answers one choice per request")
        if len(prompts) != 1 or prompts[0].tokens is not None:
            raise InvalidParameter("prompt", "a remote model or route takes one prompt, as text")
        if prompts[0].tools is not None:
            raise InvalidParameter("tools", "tool calling is not supported for remote models yet")
        if prompts[0].messages is not None and (places := image_places(prompts[0].messages)):
            raise InvalidParameter(places[0], "images are not passed to remote models yet")
        if params.num_beams > 1:
            raise InvalidParameter("use_beam_search", "beam search runs on local models only")
        if params.grammar is not None:  # named as the request named it: response_format, or Ollama's format
            raise InvalidParameter(params.grammar.field.split(".")[0],
                                   "structured output is not supported for remote models yet")
        loop = asyncio.get_running_loop()
        # A parameter the provider refuses fails here, before any answer: a 400.
        chunks = await loop.run_in_executor(_REMOTE_THREADS, ask, self.model, prompts[0], params)
        return RemoteAnswers(chunks)


class RemoteAnswers(Answers):
    """A remote stream read one chunk at a time on a worker thread. It is closed only when no thread is
    inside it (a generator cannot be closed while it runs), so a client that leaves mid-answer ends the
    upstream call at its next chunk."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks
        self._pending: concurrent.futures.Future[Chunk | None] | None = None
        self._finished = False
        self._closed = False
        self._stop = threading.Event()

    @property
    def done(self) -> bool:
        return self._finished or self._closed

    async def next(self) -> tuple[int, Chunk]:
        self._pending = _REMOTE_THREADS.submit(next, self._chunks, None)
        try:
            chunk = await asyncio.wrap_future(self._pending)
        except SlmError:
            self.cancel()
            raise
        except Exception:
            self.cancel()
            raise RemoteBadResponse("the remote stream failed") from None
        if chunk is None:
            self.cancel()
            raise RemoteBadResponse("the remote stream ended without its last chunk")
        if chunk.finish_reason is not None:
            self._finished = True
            self.cancel()
        return 0, chunk

    async def completions(self) -> list[Completion]:
        """The whole answer read in one worker call; it stops at the next chunk once cancelled."""

        def read_all() -> Completion:
            def check(_: Chunk) -> None:
                if self._stop.is_set():
                    raise ClientGone()

            try:
                return collect(self._chunks, on_chunk=check)
            finally:
                _close(self._chunks)

        loop = asyncio.get_running_loop()
        try:
            return [await loop.run_in_executor(_REMOTE_THREADS, read_all)]
        finally:
            self._closed = True

    def prompt_ids(self, index: int) -> list[int]:
        return []

    def cancel(self) -> None:
        self._stop.set()
        if self._closed:
            return
        self._closed = True
        pending = self._pending
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: _close(self._chunks))
        else:
            _REMOTE_THREADS.submit(_close, self._chunks)


def _close(chunks: Iterator[Chunk]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        with contextlib.suppress(ValueError):  # still running elsewhere: it ends with its own thread
            close()


# --- one response, however it is answered ---------------------------------------------------------

LEAST_LOGPROB = -9999.0
"""What a response says for a token of probability 0 (one a grammar refused: -inf, which JSON cannot
carry), as OpenAI says "very unlikely"."""


def reported(logprob: float) -> float:
    return max(logprob, LEAST_LOGPROB)



async def respond(request: Request, answers: Answers, stream: bool,
                  lines: Callable[[tuple[int, Chunk], Answers], AsyncIterator[str]],
                  whole: Callable[[list[Completion]], dict[str, object]], media_type: str) -> Response:
    """A stream (its first chunk awaited before the 200, so that a request that fails at once, such as a
    prompt beyond the context, gets its error status) or one JSON response."""
    try:
        if stream:
            first = await unless_disconnected(request, answers.next())
            state = request.app.state
            return AnswerStream(lines(first, answers), answers, media_type, state.write_timeout, state.dropped)
        finished = await unless_disconnected(request, answers.completions())
    except BaseException:
        answers.cancel()
        raise
    served_by = finished[0].served_by if finished else None
    return JSONResponse(whole(finished), headers={"x-slm-served-by": served_by} if served_by else None)


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


class SlowReader(Exception):
    """A client left a stream's writes waiting longer than the write timeout."""


class AnswerStream(StreamingResponse):
    """A streamed answer that cancels its answers however it ends: finished, client gone, stopping, or a
    client that stopped reading: once a write has waited ``write_timeout`` seconds for it (the socket's and
    the server's write buffers are full), the stream is dropped and counted in ``dropped``, so that a
    reader that never reads holds neither a sequence nor a growing buffer."""

    def __init__(self, content: AsyncIterator[str], answers: Answers, media_type: str,
                 write_timeout: float = WRITE_TIMEOUT, dropped: Counter[str] | None = None) -> None:
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.answers = answers
        self.write_timeout = write_timeout
        self.dropped = dropped if dropped is not None else Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded(message: MutableMapping[str, Any]) -> None:
            try:
                await asyncio.wait_for(send(message), self.write_timeout)
            except TimeoutError:
                raise SlowReader() from None

        try:
            await super().__call__(scope, receive, bounded)
        except SlowReader:
            self.dropped["slow_reader"] += 1
            log.warning("%s: the client read nothing for %g s; stream dropped", scope.get("path"), self.write_timeout)
        finally:
            self.answers.cancel()
