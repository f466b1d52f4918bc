"""Continuous batching: batched equals single, requests join and leave, cancel frees, long prompts are chunked."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import slm
from slm.errors import ContextOverflow, QueueFull
from slm.generation import Chunk, GenerationParams
from slm.serving.scheduler import Request, Scheduler

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "A haiku about autumn:\n",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
]
GREEDY = GenerationParams(temperature=0, max_tokens=24)
MakeScheduler = Callable[..., Scheduler]


class Collector:
    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.errors: list[Exception] = []
        self.done = threading.Event()

    def on_chunk(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        if chunk.finish_reason is not None:
            self.done.set()

    def on_error(self, error: Exception) -> None:
        self.errors.append(error)
        self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [c.token for c in self.chunks if c.token is not None]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)


@pytest.fixture
def make_scheduler(model: slm.Model) -> Iterator[Callable[..., Scheduler]]:
    """Schedulers over the session engine, stopped afterwards so their cached sequences are freed."""
    made: list[Scheduler] = []

    def make(**options: object) -> Scheduler:
        made.append(Scheduler(model.engine, **options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for scheduler in made:
        scheduler.stop(timeout=60)


def submit(scheduler: Scheduler, prompt: list[int], params: GenerationParams = GREEDY) -> tuple[Request, Collector]:
    sink = Collector()
    return scheduler.submit(prompt, params, sink.on_chunk, sink.on_error), sink


def run_until_idle(scheduler: Scheduler, limit: int = 2000) -> int:
    steps = 0
    while scheduler.step():
        steps += 1
        assert steps < limit
    return steps


def top2_gap(model: slm.Model, tokens: list[int]) -> float:
    """The gap between the two best logits after ``tokens`` (a single-sequence evaluation)."""
    seq = model.engine.new_sequence()
    try:
        logits = model.engine.evaluate([(seq, tokens)])[0]
    finally:
        model.engine.free(seq)
    best = np.sort(logits)[-2:]
    return float(best[1] - best[0])


def test_eight_batched_greedy_requests_equal_the_same_requests_one_at_a_time(
    model: slm.Model, make_scheduler: MakeScheduler
) -> None:
    prompts = [model.tokenize(p) for p in PROMPTS]
    alone = [model.generate(p, GREEDY).tokens for p in prompts]
    scheduler = make_scheduler(max_running=8)
    sinks = [submit(scheduler, p)[1] for p in prompts]
    steps = run_until_idle(scheduler)
    assert steps < sum(len(a) for a in alone)  # the requests really shared steps
    for prompt, single, sink in zip(prompts, alone, sinks, strict=True):
        assert not sink.errors and sink.chunks[-1].finish_reason is not None
        batched = sink.tokens
        same = next((i for i, (a, b) in enumerate(zip(single, batched, strict=False)) if a != b), None)
        if same is None:
            assert batched == single
            continue
        # llama.cpp's batched kernels sum in another order: a flip may only happen at a near-tie.
        assert top2_gap(model, prompt + single[:same]) < 0.1, f"divergence at {same} is not a near-tie"
    assert scheduler.stats()["running"] == 0


def test_requests_join_a_running_batch_and_leave_when_done(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=4)
    first = [submit(scheduler, model.tokenize(p))[1] for p in PROMPTS[:2]]
    for _ in range(5):
        scheduler.step()
    assert all(len(s.chunks) >= 3 for s in first)
    short = GenerationParams(temperature=0, max_tokens=4)
    later = [submit(scheduler, model.tokenize(p), short)[1] for p in PROMPTS[2:4]]
    scheduler.step()
    assert scheduler.stats()["running"] == 4  # joined at the next step
    for _ in range(5):
        scheduler.step()
    assert all(s.chunks[-1].finish_reason == "length" for s in later)  # left while the first two go on
    assert scheduler.stats()["running"] == 2
    run_until_idle(scheduler)
    for prompt, sink in zip(PROMPTS[:2], first, strict=True):  # joining and leaving changed nothing
        ids = model.tokenize(prompt)
        assert_same_up_to_near_ties(model, ids, model.generate(ids, GREEDY).tokens, sink.tokens)


def test_cancel_frees_the_sequence_within_one_step(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=8)
    request, sink = submit(scheduler, model.tokenize(PROMPTS[0]), GenerationParams(temperature=0, max_tokens=200))
    for _ in range(3):
        scheduler.step()
    seq = request._gen.seq if request._gen else None
    assert seq is not None and model.engine.sequence_length(seq) > 0
    request.cancel()
    scheduler.step()
    assert request.state == "finished" and scheduler.stats()["cancelled"] == 1
    assert scheduler.stats()["running"] == 0
    with pytest.raises(KeyError):
        model.engine.sequence_length(seq)  # its KV cache is gone
    assert len(sink.chunks) < 200


def test_a_full_queue_refuses_at_once(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=1, max_queue=2)
    for p in PROMPTS[:2]:
        submit(scheduler, model.tokenize(p))
    with pytest.raises(QueueFull):
        submit(scheduler, model.tokenize(PROMPTS[2]))


def test_a_long_prompt_is_chunked_and_does_not_stall_running_streams(
    model: slm.Model, make_scheduler: MakeScheduler
) -> None:
    scheduler = make_scheduler(max_running=4, max_batch_tokens=32)
    _, streaming = submit(scheduler, model.tokenize(PROMPTS[0]), GenerationParams(temperature=0, max_tokens=40))
    scheduler.step()
    long_prompt = model.tokenize(" ".join(["The quick brown fox jumps over the lazy dog."] * 30))
    assert len(long_prompt) > 200
    _, late = submit(scheduler, long_prompt, GenerationParams(temperature=0, max_tokens=4))
    before = len(streaming.chunks)
    for _ in range(6):  # the long prompt needs > 6 steps of 31 tokens; the stream gets a token each step
        scheduler.step()
    assert len(streaming.chunks) == before + 6
    assert not late.chunks
    run_until_idle(scheduler)
    assert late.tokens == model.generate(long_prompt, GenerationParams(temperature=0, max_tokens=4)).tokens


def test_a_prompt_beyond_the_context_fails_that_request_only(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=4)
    too_long = model.tokenize("word " * 3000)
    _, bad = submit(scheduler, too_long)
    _, good = submit(scheduler, model.tokenize(PROMPTS[0]))
    run_until_idle(scheduler)
    assert isinstance(bad.errors[0], ContextOverflow)
    assert good.chunks[-1].finish_reason == "length"


def test_the_engine_thread_serves_requests_and_stops_cleanly(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=4)
    scheduler.start()
    try:
        sinks = [submit(scheduler, model.tokenize(p))[1] for p in PROMPTS[:3]]
        assert all(s.done.wait(60) for s in sinks)
    finally:
        scheduler.stop(timeout=60)
    assert scheduler._thread is not None and not scheduler._thread.is_alive()
    assert scheduler.stats()["finished"] == 3


SYSTEM = (
    "You are a careful assistant for a hardware store. You answer questions about tools, paint, garden "
    "supplies and plumbing. Keep answers short, name the aisle where the item is found, and never invent "
    "prices. Aisles: 1 paint, 2 hand tools, 3 power tools, 4 garden, 5 plumbing, 6 electrical. "
) * 3


def test_a_short_shared_prefix_is_reused_too(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=1)
    prompts = [model.tokenize("Once upon a time, in a small village by the sea, " + end)
               for end in ("a fisherman lived alone.", "the children played.")]
    common = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    assert 4 <= common < 16  # as short as a chat template's opening
    for prompt in prompts:
        submit(scheduler, prompt)
        run_until_idle(scheduler)
    assert scheduler.stats()["prefix_cache_hit_tokens"] == common


def test_a_shared_system_prompt_is_computed_once(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=2)
    questions = ["Where is the blue paint?", "Do you sell hammers?"]
    prompts = [model.chat_tokens([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in questions]
    common = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    assert common > 100
    first, sink1 = submit(scheduler, prompts[0])
    run_until_idle(scheduler)
    second, sink2 = submit(scheduler, prompts[1])
    run_until_idle(scheduler)
    assert first.cached_tokens == 0
    assert second.cached_tokens == common  # everything before the question came from the cache
    stats = scheduler.stats()
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_hit_tokens"] == common
    for prompt, sink in ((prompts[0], sink1), (prompts[1], sink2)):
        alone = model.generate(prompt, GREEDY).tokens
        same = next((i for i, (a, b) in enumerate(zip(alone, sink.tokens, strict=False)) if a != b), None)
        assert same is None or top2_gap(model, prompt + alone[:same]) < 0.1
    # The same prompt again reuses all but its last token.
    third, _ = submit(scheduler, prompts[1])
    run_until_idle(scheduler)
    assert third.cached_tokens == len(prompts[1]) - 1


@pytest.fixture(scope="module")
def small_kv(smollm2_path: Path) -> Iterator[slm.Model]:
    """SmolLM2 with a KV cache of 512 positions for 8 sequences: room for few requests at once."""
    with slm.load(str(smollm2_path), n_ctx=512, kv_cells=512, max_sequences=8) as m:
        yield m


def assert_same_up_to_near_ties(model: slm.Model, prompt: list[int], single: list[int], batched: list[int]) -> None:
    same = next((i for i, (a, b) in enumerate(zip(single, batched, strict=False)) if a != b), None)
    if same is None:
        assert batched == single
    else:
        assert top2_gap(model, prompt + single[:same]) < 0.1, f"divergence at {same} is not a near-tie"


def test_requests_are_admitted_only_when_their_kv_cache_fits(small_kv: slm.Model) -> None:
    scheduler = Scheduler(small_kv.engine, max_running=4)
    params = GenerationParams(temperature=0, max_tokens=150)
    prompts = [small_kv.tokenize(p) for p in PROMPTS[:4]]
    assert sum(len(p) + 150 for p in prompts) > 512 >= sum(len(p) + 150 for p in prompts[:3])
    sinks = [submit(scheduler, p, params)[1] for p in prompts]
    most = 0
    while scheduler.step():
        stats = scheduler.stats()
        most = max(most, stats["running"])
        assert stats["kv_cells_reserved"] <= stats["kv_cells"]
    try:
        assert most == 3  # the fourth waited for room, though a slot was free
        assert all(not s.errors and s.chunks[-1].finish_reason is not None for s in sinks)
        assert scheduler.stats()["preemptions"] == 0  # they were admitted with room for their answers
        for prompt, sink in zip(prompts, sinks, strict=True):
            assert_same_up_to_near_ties(small_kv, prompt, small_kv.generate(prompt, params).tokens, sink.tokens)
    finally:
        scheduler.stop(timeout=60)


def kernel_noise(model: slm.Model, prompt: list[int], answer: list[int]) -> float:
    """How far llama.cpp's two paths to the same logits differ after ``prompt + answer``: the whole text
    read in one batch (what a paused request's recomputation does) against the answer decoded token by
    token (what a request run alone does)."""
    engine = model.engine
    whole, stepwise = engine.new_sequence(), engine.new_sequence()
    try:
        at_once = engine.evaluate([(whole, prompt + answer)])[0]
        logits = engine.evaluate([(stepwise, prompt)])[0]
        for token in answer:
            logits = engine.evaluate([(stepwise, [token])])[0]
    finally:
        engine.free(whole)
        engine.free(stepwise)
    return float(np.abs(at_once - logits).max())


def test_running_out_of_kv_cache_pauses_the_youngest_request_and_loses_nothing(smollm2_path: Path) -> None:
    # Four sequences of up to 128 positions share 256 cells. Without max_tokens each is admitted with
    # room for 8 tokens of answer, and they outgrow the cache as they write to the end of their context.
    with slm.load(str(smollm2_path), n_ctx=128, kv_cells=256, max_sequences=8) as model:
        scheduler = Scheduler(model.engine, max_running=4, reserve_tokens=8)
        params = GenerationParams(temperature=0, max_tokens=None)
        prompts = [model.tokenize(p) for p in PROMPTS[1:5]]
        requests = [submit(scheduler, p, params) for p in prompts]
        run_until_idle(scheduler, limit=5000)
        scheduler.stop(timeout=60)  # frees the cached prefixes: the checks below need the cells
        stats = scheduler.stats()
        assert stats["preemptions"] > 0 and stats["failed"] == 0 and stats["finished"] == 4
        assert any(r.preemptions for r, _ in requests)
        long = 0
        for prompt, (_, sink) in zip(prompts, requests, strict=True):
            assert not sink.errors and sink.chunks[-1].finish_reason in ("stop", "length")
            long += sink.chunks[-1].finish_reason == "length"
            single = model.generate(prompt, params).tokens
            same = next((i for i, (a, b) in enumerate(zip(single, sink.tokens, strict=False)) if a != b), None)
            if same is None:
                assert sink.tokens == single
                continue
            # A paused request's text is read again in one batch, whose kernels round differently from
            # decoding token by token; deep in a text that drifts the logits by up to about 1. A token
            # may flip only where the two best are closer than that drift.
            gap = top2_gap(model, prompt + single[:same])
            assert gap < kernel_noise(model, prompt, single[:same]), f"divergence at {same} (gap {gap:.3f})"
        total = sum(len(p) + len(sink.tokens) for p, (_, sink) in zip(prompts, requests, strict=True))
        assert long >= 1 and total > model.info.kv_cells  # together they really outgrew the cache


def test_cached_prefixes_live_in_host_memory_and_are_evicted_least_recently_used_first(small_kv: slm.Model) -> None:
    short = GenerationParams(temperature=0, max_tokens=4)
    prompts = [small_kv.tokenize(f"Note {i}: " + "the cat sat on the mat. " * 6) for i in range(3)]
    per_entry = (len(prompts[0]) + 4) * small_kv.info.kv_bytes_per_token
    scheduler = Scheduler(small_kv.engine, max_running=2, prefix_cache_bytes=int(2.5 * per_entry))
    try:
        for prompt in prompts[:2]:
            submit(scheduler, prompt, short)
            run_until_idle(scheduler)
        assert len(scheduler.cache) == 2
        assert scheduler.stats()["kv_cells_reserved"] == 0  # nothing of the cache is in the engine
        submit(scheduler, prompts[0], short)  # a hit: the first entry becomes the most recent
        run_until_idle(scheduler)
        submit(scheduler, prompts[2], short)  # a third entry does not fit: the least recently used goes
        run_until_idle(scheduler)
        kept = [e[: len(prompts[0])] for e in scheduler.cache.entries()]
        assert prompts[1] not in kept and prompts[2] in kept
        assert scheduler.cache.nbytes <= scheduler.cache.max_bytes
        assert scheduler.stats()["prefix_cache_hits"] == 1
    finally:
        scheduler.stop(timeout=60)


def test_a_failing_logits_processor_fails_its_request_only(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    def broken(tokens: list[int], logits: np.ndarray) -> np.ndarray:
        raise RuntimeError("processor bug")

    scheduler = make_scheduler(max_running=4)
    scheduler.start()
    _, bad = submit(scheduler, model.tokenize(PROMPTS[0]), GREEDY.replace(logits_processors=(broken,)))
    _, good = submit(scheduler, model.tokenize(PROMPTS[1]))
    assert bad.done.wait(60) and good.done.wait(60)
    assert isinstance(bad.errors[0], RuntimeError)
    assert not good.errors and good.chunks[-1].finish_reason == "length"
    assert scheduler._thread is not None and scheduler._thread.is_alive()
    with pytest.raises(slm.InvalidParameter):
        scheduler.submit([], GREEDY, lambda c: None, lambda e: None)  # nothing to generate from


def test_the_choices_of_one_prompt_read_it_once_and_fork_it(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    """``n`` choices arrive as requests with one prompt: the first reads it, the others wait a step and fork
    its KV cache (each reads only the prompt's last token, for logits of its own). Counted by the scheduler:
    the prompt tokens evaluated and those taken by a fork."""
    prompt = model.chat_tokens([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hammers?"}])
    for params in (GREEDY, GenerationParams(temperature=0.9, max_tokens=12)):
        scheduler = make_scheduler(max_running=4, prefix_cache_bytes=0)
        sinks = [submit(scheduler, prompt, params.replace(seed=i) if not params.greedy else params)[1]
                 for i in range(4)]
        run_until_idle(scheduler)
        assert all(not s.errors and s.chunks[-1].finish_reason for s in sinks)
        stats = scheduler.stats()
        assert stats["prefill_tokens"] == len(prompt) + 3
        assert stats["forked_tokens"] == 3 * (len(prompt) - 1)
        if params.greedy:
            alone = model.generate(prompt, GREEDY).tokens
            for sink in sinks:  # four rows in one batch against one alone: equal up to near-ties
                assert_same_up_to_near_ties(model, prompt, alone, sink.tokens)
        else:
            assert len({tuple(s.tokens) for s in sinks}) > 1  # each choice samples with its own seed


def test_a_request_forks_the_shared_prefix_of_a_running_one(model: slm.Model, make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler(max_running=2, prefix_cache_bytes=0)
    prompts = [model.chat_tokens([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in ("Where is the blue paint?", "Do you sell hammers?")]
    common = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    sinks = [submit(scheduler, p)[1] for p in prompts]
    run_until_idle(scheduler)
    stats = scheduler.stats()
    assert stats["forked_tokens"] == common
    assert stats["prefill_tokens"] == len(prompts[0]) + len(prompts[1]) - common
    for prompt, sink in zip(prompts, sinks, strict=True):
        assert_same_up_to_near_ties(model, prompt, model.generate(prompt, GREEDY).tokens, sink.tokens)


def test_an_engine_call_that_raises_fails_one_request_and_the_others_complete(
        model: slm.Model, make_scheduler: MakeScheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault below the engine protocol (here a RuntimeError at the fifth batched call) costs the youngest
    running request; the step after goes on with the others, and the counters say so."""
    evaluate = model.engine.evaluate
    calls = []

    def faulty(work: Any, keep: Any = None) -> Any:
        calls.append(len(work))
        if len(calls) == 5:
            raise RuntimeError("a fault in the engine")
        return evaluate(work, keep=keep)

    monkeypatch.setattr(model.engine, "evaluate", faulty)
    scheduler = make_scheduler(max_running=4, prefix_cache_bytes=0)
    sinks = [submit(scheduler, model.tokenize(p))[1] for p in PROMPTS[:4]]
    run_until_idle(scheduler)
    failed = [s for s in sinks if s.errors]
    assert len(failed) == 1 and failed[0] is sinks[3] and isinstance(failed[0].errors[0], RuntimeError)
    for sink in sinks[:3]:
        assert not sink.errors and sink.chunks[-1].finish_reason == "length"
    stats = scheduler.stats()
    assert (stats["failed"], stats["finished"], stats["running"], stats["kv_cells_reserved"]) == (1, 3, 0, 0)
