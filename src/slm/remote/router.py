"""Routes: a named set of targets behind the surface of one model, with retries, deadlines and a circuit
breaker; the answer says which target gave it.

A route's ``strategy`` says which target a call goes to first. ``fallback`` (the default) tries them in
order: typically a local small model, then a cloud model. ``balance`` spreads calls over equal replicas
(several ``slm serve``, vLLM or SGLang servers of one model): each call goes to the target with the fewest
calls in flight through this route, ties taken in turn so that equal load spreads evenly.

A target is skipped when its circuit is open (it failed ``circuit_failures`` times in a row; it is tried
again after ``circuit_cooldown`` seconds) or when the prompt is estimated longer than its
``max_prompt_tokens``. A target that fails with a connection error, a timeout, a 429 or 5xx, a prompt
beyond its context, or any other error is retried (when waiting can help: connection, timeout, 429,
5xx) with exponential backoff and jitter, then left for the next one (in order, or the next least
loaded). Once a target has streamed text, the answer is its own: a failure after that is an error, not a
silent switch to another model.

A balance route also probes its remote targets (``RemoteModel.alive``: a GET of the model list, 2 s at
most) and skips one whose probe failed until a probe succeeds. Probes are lazy: a call probes, on its own
thread and before it picks, the targets whose last probe is ``health_interval`` seconds old; the calls
meanwhile go on with what is known. No thread of its own, then: a route in a CLI that exits leaves
nothing behind, an idle gateway sends nothing, and a replica that comes back is seen by the first call
after its interval. The price is a probe's wait on that one call (short on a refused connection; up to
the probe's timeout on a host that does not answer).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from slm.errors import InvalidParameter, RemoteContextExceeded, RemoteError, RemoteTimeout, SlmError
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, collect
from slm.model import LanguageModel, Messages
from slm.remote.config import Route
from slm.remote.providers import RemoteInfo, RemoteModel

Loader = Callable[..., LanguageModel]
"""Opens a target by name (``slm.load``): a local model, a ``RemoteModel`` or another route."""

PROBE_TIMEOUT = 2.0
"""Seconds a health probe waits (at most the route's timeout): a server that takes longer is down."""


@dataclass
class _Target:
    name: str
    max_prompt_tokens: int
    model: Any = None
    failures: int = 0
    open_until: float = 0.0
    outstanding: int = 0
    """Calls in flight on this target through the route: picked, not yet answered, failed or closed."""
    down: bool = False
    """Its last health probe failed (balance routes)."""
    probed_at: float = float("-inf")
    turn: threading.Lock = field(default_factory=threading.Lock)
    """A local model answers one call at a time (one thread drives an engine); remote ones any number."""


class Router:
    """A named route with the surface of ``slm.Model``: ``chat``, ``chat_stream``, ``generate``, ``stream``."""

    instruct = True

    def __init__(self, route: Route, loader: Loader, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.route, self.name = route, route.name
        self.info = RemoteInfo(architecture="route")
        limits = route.max_prompt_tokens or (0,) * len(route.targets)
        self._targets = [_Target(name, limit) for name, limit in zip(route.targets, limits, strict=True)]
        self._load, self._clock, self._sleep = loader, clock, sleep
        self._lock = threading.Lock()
        self._counting = threading.Lock()
        self._rotation = 0
        """Where a balance route starts looking among targets with equally few calls in flight."""
        self.metrics: Counter[str] = Counter()
        """requests, fallbacks, answered:TARGET, failed:TARGET, skipped_open:TARGET, skipped_long:TARGET,
        skipped_down:TARGET, circuit_opened:TARGET, marked_down:TARGET and marked_up:TARGET (a health
        probe found it down, or back)"""

    # --- the surface of slm.Model ----------------------------------------------------------

    def chat_stream(self, messages: Messages, params: GenerationParams | None = None,
                    **overrides: Any) -> Iterator[Chunk]:
        params = GenerationParams.of(params, **overrides)
        estimate = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 4 * len(messages)
        return self._run(lambda model, deadline: _call(model, "chat_stream", messages, params, deadline), estimate)

    def chat(self, messages: Messages, params: GenerationParams | None = None,
             **overrides: Any) -> Completion:
        return collect(self.chat_stream(messages, params, **overrides))

    def stream(self, prompt: str, params: GenerationParams | None = None, **overrides: Any) -> Iterator[Chunk]:
        params = GenerationParams.of(params, **overrides)
        return self._run(lambda model, deadline: _call(model, "stream", prompt, params, deadline), len(prompt) // 4)

    def generate(self, prompt: str, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        return collect(self.stream(prompt, params, **overrides))

    def close(self) -> None:
        for target in self._targets:
            if target.model is not None:
                target.model.close()
                target.model = None

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Router({self.name!r}, targets={list(self.route.targets)})"

    def _count(self, event: str) -> None:
        with self._counting:  # calls on many threads count at once; += alone could lose some
            self.metrics[event] += 1

    def outstanding(self) -> dict[str, int]:
        """Calls in flight per target: a gauge beside the counters of ``metrics``."""
        with self._lock:
            return {target.name: target.outstanding for target in self._targets}

    # --- routing ---------------------------------------------------------------------------

    def _run(self, call: Callable[[Any, float], Iterator[Chunk]], estimate: int) -> Iterator[Chunk]:
        """Check the route can start (so a bad parameter fails at the call), then stream from it."""
        self._count("requests")
        return self._attempts(call, estimate, self._clock() + self.route.deadline)

    def _attempts(self, call: Callable[[Any, float], Iterator[Chunk]], estimate: int,
                  deadline: float) -> Iterator[Chunk]:
        if self.route.strategy == "balance":
            self._probe_due()
        why: list[str] = []
        refused: list[InvalidParameter] = []  # the caller's doing (a parameter, a prompt too long): no circuit
        tried: set[int] = set()
        while (target := self._pick(tried, estimate)) is not None:
            if len(tried) > 1 and why:
                self._count("fallbacks")
            try:
                last = yield from self._try(target, call, estimate, deadline, why, refused)
            finally:  # however the answer ended: finished, failed, or closed by the consumer
                with self._lock:
                    target.outstanding -= 1
            if last is not None:
                yield last
                return
        if refused and len(refused) == len(why):  # every target refused the request itself: a 400, not a 502
            raise InvalidParameter(refused[0].field, f"route {self.name}: {'; '.join(why)}")
        raise RemoteError(f"route {self.name}: no target answered ({'; '.join(why)})")

    def _pick(self, tried: set[int], estimate: int) -> _Target | None:
        """The next target for a call that has tried ``tried`` (None when none is left), counted in flight
        at once, so that concurrent calls see each other's choices. Fallback takes them in order. Balance
        takes the usable target (circuit closed, probe passed, prompt within its limit) with the fewest
        calls in flight, the first at or after the rotation among equals; unusable ones come last, to be
        skipped with their reason."""
        with self._lock:
            left = [index for index in range(len(self._targets)) if index not in tried]
            if not left:
                return None
            if self.route.strategy == "balance":
                now, count = self._clock(), len(self._targets)

                def load(index: int) -> tuple[bool, int, int]:
                    target = self._targets[index]
                    unusable = now < target.open_until or target.down \
                        or 0 < target.max_prompt_tokens < estimate
                    return unusable, target.outstanding, (index - self._rotation) % count

                index = min(left, key=load)
                self._rotation = index + 1
            else:
                index = left[0]
            tried.add(index)
            self._targets[index].outstanding += 1
            return self._targets[index]

    def _try(self, target: _Target, call: Callable[[Any, float], Iterator[Chunk]], estimate: int, deadline: float,
             why: list[str], refused: list[InvalidParameter]) -> Generator[Chunk, None, Chunk | None]:
        """The attempts on one target: its answer's chunks but the last, which it returns (handed out by the
        caller once the target is free). None when the target is skipped or fails before any text; ``why``
        then says so."""
        if target.max_prompt_tokens and estimate > target.max_prompt_tokens:
            self._count(f"skipped_long:{target.name}")
            why.append(f"{target.name}: prompt of about {estimate} tokens is over its limit "
                       f"of {target.max_prompt_tokens}")
            return None
        if self._clock() < target.open_until:
            self._count(f"skipped_open:{target.name}")
            why.append(f"{target.name}: skipped, it failed {target.failures} times in a row")
            return None
        if target.down:
            self._count(f"skipped_down:{target.name}")
            why.append(f"{target.name}: skipped, its health probe failed")
            return None
        for attempt in range(self.route.retries + 1):
            left = deadline - self._clock()
            if left <= 0:
                raise RemoteTimeout(f"route {self.name}: no answer within its deadline of "
                                    f"{self.route.deadline:g} s ({'; '.join(why) or 'no target answered'})")
            with self._turn(target):
                try:
                    chunks = call(self._model(target), self._clock() + min(self.route.timeout, left))
                    first = next(chunks)
                except StopIteration:
                    error: SlmError = RemoteError(f"{target.name}: an empty answer")
                except SlmError as e:
                    error = e
                else:
                    return (yield from self._answer(target, first, chunks, deadline))
            if isinstance(error, InvalidParameter | RemoteContextExceeded):
                why.append(f"{target.name}: {error}")
                if isinstance(error, InvalidParameter):
                    refused.append(error)
                return None
            if not (isinstance(error, RemoteError) and error.retryable and attempt < self.route.retries):
                break
            pause = self.route.backoff * 2 ** attempt * (0.5 + random.random())
            self._sleep(max(0.0, min(pause, deadline - self._clock())))
        why.append(f"{target.name}: {error}")
        self._failed(target)
        return None

    def _probe_due(self) -> None:
        """Probe each remote target whose last probe is ``health_interval`` old; a call claims a probe by
        stamping its time, so concurrent calls do not probe the same target twice. The first call opens
        every target (to learn which are remote), as the next few calls would anyway."""
        for target in self._targets:
            with self._lock:
                now = self._clock()
                if now - target.probed_at < self.route.health_interval:
                    continue
                target.probed_at = now
            try:
                model = self._model(target)
            except SlmError:  # it cannot even be opened: the call that picks it says why
                continue
            if not isinstance(model, RemoteModel):
                continue
            up = model.alive(min(PROBE_TIMEOUT, self.route.timeout))
            with self._lock:
                if up == target.down:
                    target.down = not up
                    self._count(f"{'marked_up' if up else 'marked_down'}:{target.name}")

    @contextlib.contextmanager
    def _turn(self, target: _Target) -> Iterator[None]:
        """Hold a local target for the whole answer; a remote one (or a route) is not held."""
        if isinstance(self._model(target), RemoteModel | Router):
            yield
            return
        with target.turn:
            yield

    def _answer(self, target: _Target, first: Chunk, chunks: Iterator[Chunk],
                deadline: float) -> Generator[Chunk, None, Chunk]:
        """This target's answer, committed to once text has been handed out: its chunks, and the last one
        returned."""
        chunk = first
        try:
            while True:
                if chunk.finish_reason is not None:
                    chunk.served_by = chunk.served_by or target.name
                    with self._lock:
                        target.failures, target.open_until = 0, 0.0
                    self._count(f"answered:{target.name}")
                    return chunk
                yield chunk
                if self._clock() > deadline:
                    raise RemoteTimeout(f"route {self.name}: {target.name} was still answering at the deadline")
                chunk = next(chunks)
        except (SlmError, StopIteration) as e:
            self._failed(target)
            raise RemoteError(f"route {self.name}: {target.name} failed mid-answer: {e}") from None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _model(self, target: _Target) -> Any:
        with self._lock:
            if target.model is None:
                target.model = self._load(target.name)
            return target.model

    def _failed(self, target: _Target) -> None:
        with self._lock:
            self._count(f"failed:{target.name}")
            target.failures += 1
            if target.failures >= self.route.circuit_failures:
                target.open_until = self._clock() + self.route.circuit_cooldown
                self._count(f"circuit_opened:{target.name}")


def _call(model: Any, method: str, what: Any, params: GenerationParams, deadline: float) -> Iterator[Chunk]:
    """A target's stream; remote models take the deadline, local ones are bounded by the route between
    chunks."""
    if isinstance(model, RemoteModel):
        chunks: Iterator[Chunk] = getattr(model, method)(what, params, deadline=deadline)
    else:
        chunks = getattr(model, method)(what, params)
    return chunks
