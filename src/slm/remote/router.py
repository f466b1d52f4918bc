"""Routes: try the targets in order (typically a local small model, then a cloud model) with retries,
deadlines and a circuit breaker; the answer says which target gave it.

A target is skipped when its circuit is open (it failed ``circuit_failures`` times in a row; it is tried
again after ``circuit_cooldown`` seconds) or when the prompt is estimated longer than its
``max_prompt_tokens``. A target that fails with a connection error, a timeout, a 429 or 5xx, a prompt
beyond its context, or any other error is retried (when waiting can help: connection, timeout, 429,
5xx) with exponential backoff and jitter, then left for the next one. Once a target has streamed text,
the answer is its own: a failure after that is an error, not a silent switch to another model.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
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


@dataclass
class _Target:
    name: str
    max_prompt_tokens: int
    model: Any = None
    failures: int = 0
    open_until: float = 0.0
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
        self.metrics: Counter[str] = Counter()
        """requests, fallbacks, answered:TARGET, failed:TARGET, skipped_open:TARGET, skipped_long:TARGET,
        circuit_opened:TARGET"""

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

    # --- routing ---------------------------------------------------------------------------

    def _run(self, call: Callable[[Any, float], Iterator[Chunk]], estimate: int) -> Iterator[Chunk]:
        """Check the route can start (so a bad parameter fails at the call), then stream from it."""
        self.metrics["requests"] += 1
        return self._attempts(call, estimate, self._clock() + self.route.deadline)

    def _attempts(self, call: Callable[[Any, float], Iterator[Chunk]], estimate: int,
                  deadline: float) -> Iterator[Chunk]:
        why: list[str] = []
        refused: list[InvalidParameter] = []  # the caller's doing (a parameter, a prompt too long): no circuit
        for index, target in enumerate(self._targets):
            if index and why:
                self.metrics["fallbacks"] += 1
            if target.max_prompt_tokens and estimate > target.max_prompt_tokens:
                self.metrics[f"skipped_long:{target.name}"] += 1
                why.append(f"{target.name}: prompt of about {estimate} tokens is over its limit "
                           f"of {target.max_prompt_tokens}")
                continue
            if self._clock() < target.open_until:
                self.metrics[f"skipped_open:{target.name}"] += 1
                why.append(f"{target.name}: skipped, it failed {target.failures} times in a row")
                continue
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
                        yield from self._answer(target, first, chunks, deadline)
                        return
                if isinstance(error, InvalidParameter | RemoteContextExceeded):
                    why.append(f"{target.name}: {error}")
                    if isinstance(error, InvalidParameter):
                        refused.append(error)
                    break
                retry = isinstance(error, RemoteError) and error.retryable and attempt < self.route.retries
                if not retry:
                    why.append(f"{target.name}: {error}")
                    self._failed(target)
                    break
                pause = self.route.backoff * 2 ** attempt * (0.5 + random.random())
                self._sleep(max(0.0, min(pause, deadline - self._clock())))
        if refused and len(refused) == len(why):  # every target refused the request itself: a 400, not a 502
            raise InvalidParameter(refused[0].field, f"route {self.name}: {'; '.join(why)}")
        raise RemoteError(f"route {self.name}: no target answered ({'; '.join(why)})")

    @contextlib.contextmanager
    def _turn(self, target: _Target) -> Iterator[None]:
        """Hold a local target for the whole answer; a remote one (or a route) is not held."""
        if isinstance(self._model(target), RemoteModel | Router):
            yield
            return
        with target.turn:
            yield

    def _answer(self, target: _Target, first: Chunk, chunks: Iterator[Chunk], deadline: float) -> Iterator[Chunk]:
        """This target's answer: it is committed to once text has been handed out."""
        chunk = first
        try:
            while True:
                if chunk.finish_reason is not None:
                    chunk.served_by = chunk.served_by or target.name
                    with self._lock:
                        target.failures, target.open_until = 0, 0.0
                    self.metrics[f"answered:{target.name}"] += 1
                    yield chunk
                    return
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
            self.metrics[f"failed:{target.name}"] += 1
            target.failures += 1
            if target.failures >= self.route.circuit_failures:
                target.open_until = self._clock() + self.route.circuit_cooldown
                self.metrics[f"circuit_opened:{target.name}"] += 1


def _call(model: Any, method: str, what: Any, params: GenerationParams, deadline: float) -> Iterator[Chunk]:
    """A target's stream; remote models take the deadline, local ones are bounded by the route between
    chunks."""
    if isinstance(model, RemoteModel):
        chunks: Iterator[Chunk] = getattr(model, method)(what, params, deadline=deadline)
    else:
        chunks = getattr(model, method)(what, params)
    return chunks
