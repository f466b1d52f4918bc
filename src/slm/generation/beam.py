"""Beam search over the engine protocol, with transformers' semantics.

    search = BeamSearch(engine, prompt_ids, GenerationParams(num_beams=4, max_tokens=16))
    beams = search.run()                    # the finished beams, best first

The prompt is evaluated once; the beams then fork its KV cache, and every step evaluates all live beams
in one batched ``engine.evaluate``. A step is ``pending()`` (the work: one token per beam) then
``advance(logits)``, so a scheduler can run a search beside other requests; ``run()`` drives it alone.

What is kept and when the search ends follow transformers' ``_beam_search`` (5.x):

- each step takes the model's log-softmax, applies the request's processors to it (transformers' order:
  log-probabilities first, processors after, no renormalizing), adds each beam's running score, and keeps
  the top ``max(2, 1 + number of end tokens) * num_beams`` candidates over all beams;
- of those, a candidate ending in an end-of-generation token (or reaching ``max_tokens``) finishes, but
  only if it ranks among the first ``num_beams``; its score is ``sum of logprobs / generated ** length_penalty``,
  where ``generated`` counts its new tokens, the end token included. The ``num_beams`` best finished ones
  are kept;
- the best ``num_beams`` candidates that did not finish run on;
- the search ends when every candidate hit ``max_tokens``, or with ``early_stopping=True`` once
  ``num_beams`` beams have finished, or else once the best running beam can no longer beat the worst kept
  one: at its current length (``False``), or at the longest length it could reach when
  ``length_penalty > 0`` (``"never"``).

ONNX Runtime GenAI's own beam search (its ``BeamSearchScorer``) differs: it divides by the whole
sequence's length (prompt included, end token excluded), its ``early_stopping`` is a bool, and it does
not take ``"never"``. With ``length_penalty=0`` the two agree (tests/test_beam.py checks it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from slm.engines.base import Engine
from slm.errors import InvalidParameter
from slm.generation.generator import check_logit_bias
from slm.generation.params import GenerationParams
from slm.generation.sampling import Sampler, build_sampler, log_softmax
from slm.generation.stream import Chunk, Completion, Timings, Usage

_DROPPED = np.float32(-1.0e9)
"""What transformers adds to a score to put a candidate out of the running (it stays finite)."""


@dataclass(frozen=True)
class Beam:
    """One finished beam: its generated tokens (the end token included when it ended on one), its text
    (without the end token) and its score (``sum of logprobs / len(tokens) ** length_penalty``)."""

    tokens: list[int]
    text: str
    score: float
    finish_reason: str
    """"stop" (an end-of-generation token) or "length" (``max_tokens`` or the context)."""


@dataclass
class BeamCompletion(Completion):
    """A completion from beam search: the best beam, as any completion, and ``beams``, the
    ``num_return_sequences`` best, ranked."""

    beams: list[Beam] = field(default_factory=list)


@dataclass
class _Live:
    """A running beam: its engine sequence (which holds the prompt and every token but the last, still to
    be evaluated) and its generated tokens and summed log-probabilities."""

    seq: int
    tokens: list[int]
    score: np.float32


class BeamSearch:
    """One beam search in an engine, advanced one batched step at a time. Close it (or use ``with``) to
    free its sequences; ``run`` does."""

    def __init__(self, engine: Engine, prompt: Sequence[int], params: GenerationParams) -> None:
        if params.num_beams > engine.max_sequences:
            raise InvalidParameter("num_beams", f"{params.num_beams} beams need {params.num_beams} sequences; "
                                   f"this engine holds {engine.max_sequences} (load it with more max_sequences)")
        if not prompt:
            raise InvalidParameter("prompt", "is empty")
        check_logit_bias(params, engine.info.vocab_size)
        self.engine = engine
        self.params = params
        self.prompt = [int(t) for t in prompt]
        context = engine.info.context_length
        room = context - len(self.prompt)
        if room < 1:
            raise InvalidParameter("prompt", f"{len(self.prompt)} tokens leave no room in the context of {context}")
        self.max_new = min(params.max_tokens or room, room)
        self._ends = np.array(sorted(engine.info.special.end_of_generation), dtype=np.int64)
        self._keep = max(2, 1 + len(self._ends)) * params.num_beams
        self._sampler: Sampler = build_sampler(params, generated_from=len(self.prompt))
        self._live: list[_Live] = [_Live(engine.new_sequence(params.adapter), [], np.float32(0.0))]
        self._finished: list[tuple[np.float32, list[int]]] = []  # best first, at most num_beams
        self._improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self._done = False
        self.steps = 0
        self.started = time.perf_counter()
        self.first_step_at: float | None = None

    # --- stepping ----------------------------------------------------------------------------

    def is_done(self) -> bool:
        return self._done

    @property
    def running(self) -> list[tuple[list[int], float]]:
        """The running beams, best first: their generated tokens and summed log-probabilities."""
        return [(list(beam.tokens), float(beam.score)) for beam in self._live]

    @property
    def kept(self) -> list[tuple[list[int], float]]:
        """The finished beams kept so far, best first: their tokens and scores."""
        return [(list(tokens), float(score)) for score, tokens in self._finished]

    def pending(self) -> list[tuple[int, list[int]]]:
        """The work of the next step, for ``engine.evaluate``: the prompt at first, then each running
        beam's last token."""
        assert not self._done, "the search is finished"
        if not self._live[0].tokens:
            return [(self._live[0].seq, self.prompt)]
        return [(beam.seq, beam.tokens[-1:]) for beam in self._live]

    def advance(self, logits: np.ndarray) -> None:
        """Take the step's logits, (B, V) in the order of ``pending()``: choose the candidates, keep the
        finished, fork and free sequences for the next step."""
        nb = self.params.num_beams
        rows = np.asarray(logits, dtype=np.float32)  # (B, V)
        scores = np.empty_like(rows)
        for i, beam in enumerate(self._live):
            scores[i] = self._logprobs(beam, rows[i]) + beam.score
        vocab = scores.shape[1]
        flat = scores.reshape(-1)  # (B * V,)
        keep = min(self._keep, flat.shape[0])
        top = np.argpartition(-flat, keep - 1)[:keep]
        top = top[np.argsort(-flat[top], kind="stable")]
        parents, tokens, values = top // vocab, top % vocab, flat[top]
        generated = len(self._live[0].tokens) + 1  # new tokens in every candidate
        at_limit = generated >= self.max_new
        ended = at_limit | np.isin(tokens, self._ends)  # (K,)

        # Finished candidates among the first num_beams join the kept ones, unless early stopping closed them.
        full = len(self._finished) >= nb
        if self._improvable and not (full and self.params.early_stopping is True):
            scale = np.float32(generated**self.params.length_penalty)
            for rank in np.flatnonzero(ended[:nb]):
                tokens_so_far = [*self._live[parents[rank]].tokens, int(tokens[rank])]
                self._finished.append((np.float32(values[rank] / scale), tokens_so_far))
            self._finished.sort(key=lambda item: -item[0])
            del self._finished[nb:]

        running = [int(r) for r in np.flatnonzero(~ended)[:nb]]
        self.steps += 1
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        if not running or self._should_stop(np.float32(values[running[0]]), generated):
            self.close()
            return
        self._reorder([(int(parents[r]), int(tokens[r]), np.float32(values[r])) for r in running])

    def _logprobs(self, beam: _Live, logits: np.ndarray) -> np.ndarray:
        """The beam's next-token log-probabilities as the request reshapes them (V,)."""
        logp = log_softmax(logits)
        history = [*self.prompt, *beam.tokens]
        logp = self._sampler.process(history, logp)
        if len(beam.tokens) < self.params.min_new_tokens:
            logp[self._ends] = -np.inf
        return logp

    def _should_stop(self, best_running: np.float32, generated: int) -> bool:
        """transformers' ``_check_early_stop_heuristic`` and ``_beam_search_has_unfinished_sequences``."""
        nb, lp, early = self.params.num_beams, self.params.length_penalty, self.params.early_stopping
        full = len(self._finished) >= nb
        if full:
            length = self.max_new if early == "never" and lp > 0 else generated
            best_possible = np.float32(best_running / np.float32(length**lp))
            self._improvable = self._improvable and bool(best_possible > self._finished[-1][0])
        return not self._improvable or (full and early is True) or generated >= self.max_new

    def _reorder(self, chosen: list[tuple[int, int, np.float32]]) -> None:
        """Give each chosen candidate a sequence holding its parent's cache: the parent's own for its first
        child, a fork for the others; parents with no child are freed first, so at most num_beams are open.
        If a fork fails, what is open stays in ``_live`` for ``close`` to free."""
        old = self._live
        children = {parent for parent, _, _ in chosen}
        self._live = [beam for index, beam in enumerate(old) if index in children]
        for index, beam in enumerate(old):
            if index not in children:
                self.engine.free(beam.seq)
        taken: set[int] = set()
        live: list[_Live] = []
        for parent, token, score in chosen:
            source = old[parent]
            if parent in taken:
                seq = self.engine.fork(source.seq)
                self._live.append(_Live(seq, [], score))  # open: close() frees it if a later fork fails
            else:
                seq = source.seq
                taken.add(parent)
            live.append(_Live(seq, [*source.tokens, token], score))
        self._live = live

    # --- results and lifetime ----------------------------------------------------------------

    def beams(self) -> list[Beam]:
        """The ``num_return_sequences`` best finished beams, best first."""
        assert self._done, "the search is not finished"
        ends = set(self._ends.tolist())
        result = []
        for score, tokens in self._finished[: self.params.num_return_sequences]:
            stop = bool(tokens) and tokens[-1] in ends
            text = self.engine.detokenize(tokens[:-1] if stop else tokens)
            result.append(Beam(tokens, text, float(score), "stop" if stop else "length"))
        return result

    def run(self) -> list[Beam]:
        """Search to the end alone, one batched evaluation a step; free every sequence however it ends."""
        try:
            while not self._done:
                self.advance(self.engine.evaluate(self.pending()))
            return self.beams()
        finally:
            self.close()

    def completion(self) -> BeamCompletion:
        """The finished search as a completion: the best beam's text, and every returned beam."""
        beams = self.beams()
        best = beams[0]
        now = time.perf_counter()
        first = self.first_step_at or now
        ttft, decode = first - self.started, now - first
        timings = Timings(ttft, decode, len(self.prompt) / ttft if ttft > 0 else 0.0,
                          (self.steps - 1) / decode if decode > 0 else 0.0)
        return BeamCompletion(best.text, best.finish_reason, Usage(len(self.prompt), len(best.tokens)), timings,
                              list(best.tokens), beams=beams)

    def close(self) -> None:
        """Free every sequence the search holds (safe to call twice)."""
        live, self._live = self._live, []
        for beam in live:
            self.engine.free(beam.seq)
        self._done = True

    def __enter__(self) -> BeamSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def beam_complete(engine: Engine, prompt: Sequence[int], params: GenerationParams) -> BeamCompletion:
    """Run a beam search alone to the end: the best beam as a completion, with the ranked ``beams``."""
    search = BeamSearch(engine, prompt, params)
    search.run()
    return search.completion()


def beam_stream(engine: Engine, prompt: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
    """Beam search as a stream that stays honest: no beam is the answer before the search ends, so the
    stream is one chunk, the best beam's whole text, once it has."""
    completion = beam_complete(engine, prompt, params)
    yield Chunk(completion.text, None, finish_reason=completion.finish_reason, usage=completion.usage,
                timings=completion.timings)
