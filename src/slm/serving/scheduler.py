"""Continuous batching: many requests, one batched engine step at a time.

An explicit state machine. A request waits in a bounded queue, runs once a slot is free, and finishes
when its generation ends, fails or is cancelled. Each ``step()`` makes one engine call for every
running request: one token for each sequence that is decoding, then chunks of new prompts with what
is left of the token budget, so a long prompt never stalls the running streams. Requests join and
leave between steps. The engine loop runs on its own thread; callers hear back through callbacks
called on that thread (the server bridges them to its event loop).

The KV cache is shared, so a request is admitted only when its prompt and the start of its answer
fit beside the running ones (cached prefixes live in host memory, not in it).
If running answers outgrow it all the same, the youngest request is paused: its KV cache is freed,
it goes back to the head of the queue with its tokens and sampling state, and it is recomputed when
there is room again. Nothing fails for lack of KV cache that could run alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from slm.engines import Engine, media
from slm.engines.base import check_adapter, common_prefix
from slm.errors import EngineError, InvalidParameter, KVCacheFull, QueueFull, SlmError
from slm.generation.constraints import fill_masks
from slm.generation.generator import Generator, check_logit_bias, first_bad_id
from slm.generation.params import GenerationParams
from slm.generation.speculative import Draft, proposer_for
from slm.generation.stream import Chunk, TextStream, fit_to_context
from slm.serving.histogram import Histogram
from slm.serving.prefix_cache import MAX_BYTES, MIN_REUSE, PrefixCache

log = logging.getLogger("slm.serving.scheduler")

Planned = tuple["Request", int, bool, Draft]
"""A request's part of a step: the request, how many of its pending tokens are evaluated, whether that is
all of them (it then samples), and the draft checked after them."""
NO_DRAFT = Draft([])

ChunkCallback = Callable[[Chunk], None]
ErrorCallback = Callable[[Exception], None]
T = TypeVar("T")


RESERVE_TOKENS = 256
"""KV cells set aside for the answer of a request without ``max_tokens`` when it is admitted: it may
write more, and is paused if the cache runs out."""


@dataclass(eq=False)
class Request:
    """One generation request and where it stands: waiting -> running -> finished."""

    id: int
    prompt: list[int]
    params: GenerationParams
    on_chunk: ChunkCallback
    on_error: ErrorCallback
    state: str = "waiting"
    submitted_at: float = field(default_factory=time.perf_counter)
    """When the request was queued: time to first token counts from here (queueing included)."""
    cancelled: bool = False
    cached_tokens: int = 0
    """Prompt tokens whose KV cache came from an earlier request (the prefix cache)."""
    reserve: int = 0
    """KV cells this request is counted for while it runs: its prompt and the answer it may write."""
    preemptions: int = 0
    """Times it was paused for lack of KV cache and recomputed."""
    _gen: Generator | None = None
    _text: TextStream | None = None
    _scheduler: Scheduler | None = None

    def cancel(self) -> None:
        """Stop this request; its sequence is freed at the next step (safe from any thread)."""
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler._wake_up()


class Scheduler:
    """Runs the requests of one model, batching every running sequence into each engine call."""

    def __init__(self, engine: Engine, name: str = "", max_running: int = 8, max_queue: int = 64,
                 max_batch_tokens: int = 512, prefix_cache_bytes: int = MAX_BYTES,
                 reserve_tokens: int = RESERVE_TOKENS, draft: Engine | None = None) -> None:
        """``prefix_cache_bytes``: host memory for finished requests' KV caches (0: no prefix reuse).
        ``name`` names the engine thread. ``draft``: a draft model's engine for speculative requests (driven
        by the same thread)."""
        self.name = name or engine.name
        self.engine = engine
        self.draft = draft
        info = self.engine.info
        self.kv_cells = info.kv_cells or info.context_length
        self.cache = PrefixCache(self.engine, prefix_cache_bytes)
        self.max_running = max_running
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.reserve_tokens = reserve_tokens
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ended = False
        self._paused_for_room = False
        self.time_to_first_token = Histogram()
        self.time_per_token = Histogram()
        self.counters = {"requests": 0, "finished": 0, "failed": 0, "cancelled": 0,
                         "prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "preemptions": 0,
                         "draft_tokens": 0, "draft_tokens_accepted": 0, "prefill_tokens": 0, "forked_tokens": 0}

    # --- the caller's side (any thread) ------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: GenerationParams, on_chunk: ChunkCallback,
               on_error: ErrorCallback) -> Request:
        """Queue a request; raises InvalidParameter for what this model cannot do at all (the rest, such
        as a prompt beyond the context, fails through ``on_error``), QueueFull when ``max_queue``
        requests already wait."""
        self._check(prompt, params)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry later")
            request = Request(next(self._ids), list(prompt), params, on_chunk, on_error, _scheduler=self)
            self._waiting.append(request)
            self.counters["requests"] += 1
            self._cond.notify()
        return request

    def _check(self, prompt: Sequence[int], params: GenerationParams) -> None:
        info = self.engine.info
        if not prompt:
            raise InvalidParameter("prompt", "is empty")
        if params.max_tokens is not None and params.max_tokens >= info.context_length:
            raise InvalidParameter(
                "max_tokens", f"{params.max_tokens} leaves no room for a prompt in this model's context of "
                f"{info.context_length} tokens",
            )
        check_adapter(params.adapter, info.adapters)
        vocab = info.vocab_size
        check_logit_bias(params, vocab)
        bad = first_bad_id(self.engine, prompt)
        if bad is not None:
            raise InvalidParameter("prompt", f"token id {bad} is not in this model's vocabulary (0..{vocab - 1})")

    def call(self, work: Callable[[], T]) -> Future[T]:
        """Run ``work`` on the engine thread between two steps: the way to tokenize or detokenize with this
        engine from another thread (an engine is driven by one thread only)."""
        future: Future[T] = Future()
        with self._cond:
            if self._ended:
                raise EngineError(f"{self.name} has stopped")
            self._calls.append((work, future))
            self._cond.notify()
        return future

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "running": len(self._running), "waiting": len(self._waiting), **self.counters,
                "kv_cells": self.kv_cells, "kv_cells_reserved": self._kv_reserved(),
                "prefix_cache_entries": len(self.cache), "prefix_cache_bytes": self.cache.nbytes,
                "prefix_cache_lookups": self.cache.lookups,
                "prefix_cache_hits": self.cache.hits, "prefix_cache_hit_tokens": self.cache.hit_tokens,
            }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"slm-scheduler-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Let in-flight and queued requests finish, then end the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.cache.clear()

    def _wake_up(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._calls and not self._waiting and not self._running and not self._stopping:
                    self._cond.wait()
                calls, self._calls = self._calls, deque()
                if self._stopping and not calls and not self._waiting and not self._running:
                    self._ended = True
                    return
            for work, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(work())
                    except BaseException as e:  # the caller's to raise
                        future.set_exception(e)
            try:
                self.step()
            except Exception as e:  # a bug: fail what was running rather than leave it hanging
                log.exception("scheduler step failed")
                for request in list(self._running):
                    self._fail(request, e)

    def step(self) -> bool:
        """Admit, run one batched engine call, deliver one token per finished evaluation.
        Returns whether there was anything to do."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
        work, plan, prefill = self._plan()
        drafted = any(draft.tokens for _, _, _, draft in plan)
        keep = [len(draft.tokens) + 1 for _, _, _, draft in plan] if drafted else None
        try:
            logits = self.engine.evaluate(work, keep=keep)  # (B, V), or (sum(keep), V) with drafts
        except KVCacheFull as e:  # make room for the next try: the youngest request waits its turn
            if len(self._running) > 1:
                self._preempt(self._running[-1])
            else:
                self._fail(self._running[0], e)
            return True
        except Exception as e:  # an engine error, or a fault below it: give up one request, the others go on
            if not isinstance(e, EngineError):
                log.exception("the engine's step failed; failing the youngest request")
            self._fail(self._running[-1], e)
            return True
        self.counters["steps"] += 1
        self.counters["prefill_tokens"] += prefill
        self._fill_masks(plan)
        row = 0
        for request, count, complete, draft in plan:
            rows = logits[row : row + len(draft.tokens) + 1]
            row += len(rows)
            gen = request._gen
            assert gen is not None and request._text is not None
            if not complete:
                gen.mark_evaluated(count)
                continue
            try:
                gen.take_step(rows, draft)
                if draft.tokens:
                    self.counters["draft_tokens"] += len(draft.tokens)
                    self.counters["draft_tokens_accepted"] += len(gen.step_tokens) - 1
                chunks = request._text.push(gen)
            except Exception as e:  # a bad parameter, or a caller's logits processor that raised: this one only
                self._fail(request, e)
                continue
            self.counters["generated_tokens"] += len(chunks)
            if not all(self._deliver(request, chunk) for chunk in chunks):
                continue
            if gen.is_done():
                self._finish(request, "finished")
        return True

    def _fill_masks(self, plan: list[Planned]) -> None:
        """The grammar masks of every constrained sequence about to sample, in one parallel call; the
        unconstrained ones pay nothing. A grammar that fails fails its own request."""
        constrained = []
        for request, _, complete, _ in plan:
            gen = request._gen
            if complete and gen is not None and gen.constraint is not None:
                constrained.append((gen.constraint, gen.tokens))
        # If one sequence's tokens left its grammar, each constraint finds out on its own when it samples.
        with contextlib.suppress(SlmError):
            fill_masks(constrained, self.engine.info.vocab_size)

    def _plan(self) -> tuple[list[tuple[int, list[int]]], list[Planned], int]:
        """Decoding sequences first (one token each, and a speculative one its draft after it), then prompt
        chunks within the token budget; and how many prompt tokens those chunks hold."""
        budget = self.max_batch_tokens
        work: list[tuple[int, list[int]]] = []
        plan: list[Planned] = []
        prefilling = []
        prefill = 0
        for request in self._running:
            gen = request._gen
            assert gen is not None
            pending = gen.pending_tokens()
            if len(pending) == 1 and budget > 0:
                draft = self._draft(request, gen, budget - 1)
                work.append((gen.seq, pending + draft.tokens))
                plan.append((request, 1, True, draft))
                budget -= 1 + len(draft.tokens)
                prefill += gen.generated == 0  # a prompt's last token (after a fork or a cache hit)
            elif len(pending) > 1:
                prefilling.append((request, pending))
        for request, pending in prefilling:
            if budget <= 0:
                break
            chunk = pending[: media.chunk_end(pending, budget)]
            assert request._gen is not None
            work.append((request._gen.seq, chunk))
            plan.append((request, len(chunk), len(chunk) == len(pending), NO_DRAFT))
            budget -= len(chunk)
            prefill += len(chunk)
        return work, plan, prefill

    def _draft(self, request: Request, gen: Generator, room: int) -> Draft:
        """The draft a decoding request checks this step (none without a proposer), at most ``room`` tokens."""
        if gen.proposer is None or room <= 0:
            return NO_DRAFT
        try:
            draft = gen.draft()
        except Exception as e:  # the draft model failed: decode this one plainly from now on
            log.warning("request %d: drafting failed (%s); decoding without drafts", request.id, e)
            gen.proposer.close()
            gen.proposer = None
            return NO_DRAFT
        del draft.tokens[room:]
        if draft.probs is not None:
            del draft.probs[room:]
        return draft

    def _admit(self) -> None:
        if self._paused_for_room and self._running:
            return  # a request was paused for KV room: none joins until one leaves
        self._paused_for_room = False
        while len(self._running) < self.max_running:
            with self._cond:
                if not self._waiting:
                    return
                if self._twin_prefilling(self._waiting[0]):
                    return  # it forks its twin once that has read the prompt
                request = self._waiting.popleft()
            try:
                admitted = self._start(request)
            except SlmError as e:
                self._fail(request, e)
                continue
            if not admitted:  # no sequence slot or KV room yet: it stays first in line
                with self._cond:
                    self._waiting.appendleft(request)
                return
            request.state = "running"
            with self._cond:
                self._running.append(request)

    def _start(self, request: Request) -> bool:
        """Give a waiting request (new, or paused) a sequence; False if there is no room for it yet."""
        gen = request._gen
        if gen is None:
            prompt = fit_to_context(self.engine.info, request.prompt, request.params)
            answer = request.params.max_tokens or self.reserve_tokens
            request.reserve = min(len(prompt) + answer, self.engine.info.context_length)
        else:
            prompt = gen.tokens  # a paused request: everything it had, prompt and answer so far
        if self._running and self._kv_reserved() + max(request.reserve, len(prompt)) > self.kv_cells:
            return False  # alone, a request may use the whole cache
        sequence = self._open(prompt, request.params.adapter)
        if sequence is None:
            if not self._running:  # nothing will free a slot: waiting would spin forever
                raise EngineError(f"no free sequence among the engine's {self.engine.max_sequences}")
            return False
        if gen is not None:
            gen.adopt(sequence)
            return True
        try:
            gen = Generator(self.engine, request.params, sequence=sequence,
                            proposer=proposer_for(request.params, self.draft))
            request.cached_tokens = cached = len(gen.tokens)
            gen.append_tokens(prompt[cached:])
            request._text = TextStream(self.engine, request.params, len(prompt), cached)
        except BaseException:
            self.engine.free(sequence[0])
            raise
        request._gen = gen
        self.counters["prompt_tokens"] += len(prompt)
        return True

    def _kv_reserved(self) -> int:
        """KV cells counted as taken: each running request's reservation, or more if it outgrew it."""
        total = 0
        for r in list(self._running):  # stats() reads this from other threads: read each _gen once
            gen = r._gen
            total += max(r.reserve, len(gen.tokens) if gen is not None else 0)
        return total

    def _open(self, prompt: list[int], adapter: str | None) -> tuple[int, list[int]] | None:
        """An engine sequence for ``prompt`` through LoRA adapter ``adapter``, starting from the longest prefix
        a running request of the same adapter holds (a fork: the choices of an ``n`` request, a shared system
        prompt) or the prefix cache has; None when the engine has no sequence slot (or KV room) for it yet."""
        try:
            reused = self._fork_running(prompt, adapter) or self.cache.take(prompt, adapter)
        except EngineError:  # no room to restore the whole entry (or no slot): start from nothing
            reused = None
        try:
            return reused if reused is not None else (self.engine.new_sequence(adapter), [])
        except EngineError:
            return None

    def _fork_running(self, prompt: list[int], adapter: str | None) -> tuple[int, list[int]] | None:
        """A fork of the running sequence whose KV cache holds the longest prefix of ``prompt`` (at least
        ``MIN_REUSE`` tokens, whole images, one token short of the prompt), rewound to it; None if there is none
        or the engine's fork computes again what it copies (ONNX Runtime GenAI)."""
        if getattr(self.engine, "fork_recomputes", False):
            return None
        best: tuple[int, Generator] | None = None
        for request in self._running:
            gen = request._gen
            if gen is None or gen.seq is None or request.params.adapter != adapter:
                continue  # another adapter's cache holds other keys and values
            keep = media.whole_images_before(prompt, min(common_prefix(gen.evaluated_tokens(), prompt),
                                                         len(prompt) - 1))
            if keep >= MIN_REUSE and (best is None or keep > best[0]):
                best = (keep, gen)
        if best is None:
            return None
        keep, gen = best
        seq = self.engine.fork(gen.seq)
        self.engine.rewind(seq, keep)
        self.counters["forked_tokens"] += keep
        return seq, prompt[:keep]

    def _twin_prefilling(self, request: Request) -> bool:
        """Whether a running request is still reading a prompt that starts as ``request``'s (the other choices
        of an ``n`` request): ``request`` then waits to fork it rather than read the prompt again."""
        if getattr(self.engine, "fork_recomputes", False) or request._gen is not None:
            return False
        for running in self._running:
            gen = running._gen
            if gen is None or len(gen.pending_tokens()) <= 1 or running.params.adapter != request.params.adapter:
                continue
            common = min(common_prefix(gen.tokens, request.prompt), len(request.prompt) - 1)
            if common >= MIN_REUSE and gen.evaluated < common:
                return True
        return False

    def _preempt(self, request: Request) -> None:
        """Pause a running request for lack of KV cache: free its cells, queue it first again."""
        assert request._gen is not None
        request._gen.evict()
        request.preemptions += 1
        self.counters["preemptions"] += 1
        self._paused_for_room = True
        with self._cond:
            self._running.remove(request)
            request.state = "waiting"
            self._waiting.appendleft(request)

    def _observe(self, request: Request, generated: int) -> None:
        text = request._text
        if text is None or generated == 0:
            return
        self.time_to_first_token.observe(text.first - request.submitted_at)
        if generated > 1:
            self.time_per_token.observe((text.last - text.first) / (generated - 1))

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [r for r in self._waiting if r.cancelled]
            for request in dropped:
                self._waiting.remove(request)
        for request in dropped + [r for r in self._running if r.cancelled]:
            self._finish(request, "cancelled")

    def _deliver(self, request: Request, chunk: Chunk) -> bool:
        try:
            request.on_chunk(chunk)
            return True
        except Exception:  # the listener is gone (closed loop, dropped client): stop generating for it
            self._finish(request, "cancelled")
            return False

    def _fail(self, request: Request, error: Exception) -> None:
        self._finish(request, "failed")
        with contextlib.suppress(Exception):  # nobody is listening any more
            request.on_error(error)

    def _finish(self, request: Request, outcome: str) -> None:
        gen, request._gen = request._gen, None
        if gen is not None and gen.seq is not None:
            if outcome == "finished":  # keep its KV cache for the next prompt that starts the same way
                self._observe(request, gen.generated)
                try:
                    self.cache.add(*gen.detach())  # frees the sequence, kept or not
                except Exception:
                    log.exception("could not keep a finished sequence in the prefix cache")
            else:
                gen.close()
        with self._cond:
            if request in self._running:
                self._running.remove(request)
                self._paused_for_room = False  # its room is free: paused requests may try again
        if request.state != "finished":
            request.state = "finished"
            self.counters[outcome] += 1
