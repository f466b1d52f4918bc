"""Speculative decoding: a proposer guesses the next few tokens, the model checks them all in one evaluation.

Decoding a small model on a CPU is bound by memory bandwidth: reading the weights once for k+1 tokens costs
little more than for one. So each step evaluates the last sampled token and a draft ``d1..dk`` together, with
the logits after every one of them (``Engine.evaluate(..., keep=)``), and keeps the longest prefix of the
draft the model agrees with, plus one token of its own: between 1 and k+1 tokens for one pass over the weights.

Agreement is the standard rejection rule (Leviathan et al., Chen et al.), so the output has the model's own
distribution whatever the draft: greedy, a draft token is kept when it is the argmax (the answer is plain
greedy decoding's); sampling, ``d`` drawn from the proposer's ``q`` is kept with probability
``min(1, p(d) / q(d))``, and at the first rejection the token is drawn from ``max(p - q, 0)`` renormalized.
``p`` is the request's whole sampling distribution (processors, constraint, temperature, top-k/p, min-p), so
penalties and grammars hold under speculation: a draft token a grammar refuses has ``p = 0`` and is rejected.

Proposers:
- ``PromptLookup``: no second model; the continuation of the latest earlier occurrence of the sequence's last
  n tokens (prompt included). Strong where the answer copies its input (editing, extraction, summaries).
- ``DraftModel``: a smaller model with the same vocabulary, in an engine of its own, greedy or sampled with
  the request's settings; its draft length adapts to how much of it is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from slm.engines.base import Engine, common_prefix
from slm.errors import InvalidParameter
from slm.generation.params import MAX_LOOKUP, GenerationParams
from slm.generation.sampling import Sampler, draw

MAX_DRAFT = MAX_LOOKUP
"""The longest draft a step checks."""


@dataclass
class Draft:
    """Proposed tokens, and the distribution each was drawn from (None: proposed for certain, ``q(d) = 1``)."""

    tokens: list[int]
    probs: list[tuple[np.ndarray, np.ndarray]] | None = None
    """Per token: (ids, probabilities) of the proposer's distribution at that step."""


class Proposer(Protocol):
    """Guesses what follows a sequence; told afterwards how much of each guess was kept."""

    def propose(self, tokens: Sequence[int], limit: int, sampler: Sampler) -> Draft:
        """Up to ``limit`` tokens to follow ``tokens`` (the whole sequence, the last not yet evaluated).
        ``sampler`` is the request's: a proposer that samples draws with its settings."""
        ...

    def accepted(self, proposed: int, kept: int) -> None:
        """Of ``proposed`` draft tokens, the model kept the first ``kept``."""
        ...

    def close(self) -> None: ...


@dataclass
class Stats:
    """How a speculative generation went: steps that checked a draft, tokens proposed and kept."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class PromptLookup:
    """Drafts by n-gram lookup in the sequence itself: find the latest earlier place where its last ``n``
    tokens occur (``n`` from ``max_ngram`` down to ``min_ngram``) and propose what followed there.

    Checking a draft is not free on a CPU (k + 1 tokens cost more than one), so the length adapts: up to
    ``num_tokens`` while drafts are kept whole, down to what was kept plus one after a partial one, and after
    a draft rejected outright the next 1, 2, 4 ... 64 steps propose nothing (free text rarely repeats). Measured
    on llama.cpp, 2 cores: 3 tokens in one evaluation cost twice one token, so a wrong guess is not cheap."""

    def __init__(self, num_tokens: int = 10, max_ngram: int = 4, min_ngram: int = 3) -> None:
        if not 1 <= num_tokens <= MAX_DRAFT:
            raise InvalidParameter("lookup", f"must be in [1, {MAX_DRAFT}] tokens a step, got {num_tokens}")
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.length = num_tokens
        """The next draft's length at most."""
        self._skip = 0  # steps left without a draft
        self._backoff = 1  # steps to skip after the next draft rejected outright

    def propose(self, tokens: Sequence[int], limit: int, sampler: Sampler) -> Draft:
        limit = min(limit, self.length)
        if self._skip:
            self._skip -= 1
            return Draft([])
        if limit <= 0 or len(tokens) < 2:
            return Draft([])
        seq = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            # starts of every earlier window equal to the tail (the tail itself excluded)
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            found = np.flatnonzero((windows == tail).all(axis=1))
            if found.shape[0]:
                start = int(found[-1]) + n
                proposal = seq[start : start + limit]
                images = np.flatnonzero(proposal < 0)  # an image's placeholders are no tokens to propose
                return Draft([int(t) for t in proposal[: images[0] if images.shape[0] else limit]])
        return Draft([])

    def accepted(self, proposed: int, kept: int) -> None:
        if kept == proposed:
            self.length = min(self.num_tokens, self.length + 2)
            self._backoff = 1
        elif kept:
            self.length = kept + 1
            self._backoff = 1
        else:
            self.length = max(1, self.length // 2)
            self._skip, self._backoff = self._backoff, min(64, 2 * self._backoff)

    def close(self) -> None:
        return None


@dataclass
class DraftModel:
    """Drafts with a smaller model in an engine of its own (one sequence per generation), kept level with the
    target's sequence: a step appends what the target accepted since, or rewinds to where they part.

    A draft stops where the draft model is unsure (its next token's probability below ``confidence``, as
    llama.cpp's ``--draft-p-min``): a guess it doubts is rarely kept, and checking it costs. Its length is
    also capped, from ``num_tokens``: one more after a draft kept whole, one fewer after any rejection
    (between 1 and ``MAX_DRAFT``)."""

    engine: Engine
    num_tokens: int = 4
    confidence: float = 0.75
    seq: int | None = None
    tokens: list[int] = field(default_factory=list)
    """What the draft engine's sequence holds."""

    def propose(self, tokens: Sequence[int], limit: int, sampler: Sampler) -> Draft:
        limit = min(limit, self.num_tokens)
        if limit <= 0 or min(tokens) < 0:  # a prompt with images: the draft model reads no images
            return Draft([])
        if self.seq is None:
            self.seq = self.engine.new_sequence()
        same = common_prefix(self.tokens, tokens)
        if same == len(tokens):
            same -= 1  # read the last token again for the logits after it
        if same < len(self.tokens):
            self.engine.rewind(self.seq, same)
            del self.tokens[same:]
        pending = list(tokens[same:])
        drafted: list[int] = []
        probs: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(limit):
            logits = self.engine.evaluate([(self.seq, pending)])[0]
            self.tokens.extend(pending)
            if sampler.greedy:
                token = int(np.argmax(logits))
                sure = 1.0 / float(np.exp(logits - logits[token]).sum())  # its probability
            else:
                ids, p = sampler.distribution(logits)
                at = draw(sampler.rng, p)
                token, sure = int(ids[at]), float(p.max())
            if sure < self.confidence:
                break
            if not sampler.greedy:
                probs.append((ids, p))
            drafted.append(token)
            pending = [token]
        return Draft(drafted, None if sampler.greedy else probs)

    def accepted(self, proposed: int, kept: int) -> None:
        if kept == proposed:
            self.num_tokens = min(MAX_DRAFT, self.num_tokens + 1)
        else:
            self.num_tokens = max(1, self.num_tokens - 1)

    def close(self) -> None:
        if self.seq is not None:
            self.engine.free(self.seq)
            self.seq = None
            self.tokens.clear()


def proposer_for(params: GenerationParams, draft: Engine | None) -> Proposer | None:
    """The proposer a request asks for: prompt lookup with ``params.lookup``, else the model's draft model
    (``draft``) unless ``params.speculative`` is off; None for plain decoding."""
    if params.lookup:
        return PromptLookup(params.lookup)
    if draft is not None and params.speculative:
        return DraftModel(draft)
    return None


def check_draft_model(target: Engine, draft: Engine) -> None:
    """Refuse a draft model that cannot draft for ``target``: another vocabulary (the same ids must be the same
    tokens), or one no smaller than the target."""
    t, d = target.info, draft.info
    if d.vocab_size > t.vocab_size or any(draft.token_bytes(i) != target.token_bytes(i) for i in range(d.vocab_size)):
        raise InvalidParameter("draft", f"its vocabulary ({d.vocab_size} tokens) is not the model's "
                                        f"({t.vocab_size}): a draft must read and write the same token ids")
    if d.parameters and t.parameters and d.parameters >= t.parameters:
        raise InvalidParameter("draft", f"it has {d.parameters:,} parameters, no fewer than the model's "
                                        f"{t.parameters:,}: a draft must be smaller to be faster")


def verify(sampler: Sampler, tokens: list[int], rows: np.ndarray, draft: Draft, k: int) -> tuple[int, np.ndarray]:
    """Check draft token ``k`` (0-based) against the model's logits after it, ``rows[k]``, the sequence so far
    being ``tokens``. Returns (the token to append, the processed logits it was chosen from): the draft token
    when kept, else the model's own (for ``k == len(draft.tokens)``, always the model's own)."""
    logits = sampler.process(tokens, rows[k])
    if k == len(draft.tokens):
        return sampler.choose(tokens, logits), logits
    proposed = draft.tokens[k]
    if sampler.greedy:
        return int(np.argmax(logits)), logits
    ids, p = sampler.distribution(logits)
    where = np.flatnonzero(ids == proposed)
    p_d = float(p[where[0]]) if where.shape[0] else 0.0
    if draft.probs is None:  # proposed for certain: keep with probability p(d)
        if sampler.rng.random() < p_d:
            return proposed, logits
        residual = p.copy()
        residual[ids == proposed] = 0.0
    else:
        q_ids, q = draft.probs[k]
        q_d = float(q[np.flatnonzero(q_ids == proposed)[0]])
        if sampler.rng.random() * q_d < p_d:
            return proposed, logits
        residual = np.maximum(p - _q_on(ids, q_ids, q), 0.0)
    if residual.sum() <= 0.0:  # p and q agree everywhere but on what was rejected: p is the answer
        residual = p
    return int(ids[draw(sampler.rng, residual / residual.sum())]), logits


def _q_on(ids: np.ndarray, q_ids: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The proposer's probabilities of ``ids`` (0 where it gave none)."""
    out = np.zeros(ids.shape[0])
    order = np.argsort(q_ids)
    at = np.searchsorted(q_ids, ids, sorter=order).clip(0, q_ids.shape[0] - 1)
    hit = q_ids[order[at]] == ids
    out[hit] = q[order[at[hit]]]
    return out
