"""Logits processors and the sampler: next-token logits (V,) -> one token id.

The processors (logit bias, the caller's, the penalties) are factories returning callables
``(token_ids, logits) -> logits``, applied in order; their output is the model's distribution as the
request reshaped it. The ``Sampler`` then truncates and draws, in Hugging Face's and vLLM's order:
temperature, top-k, top-p, min-p, typical-p. Temperature 0 is the argmax of the processed logits, not a
separate path.

No step sorts the whole vocabulary: top-k first keeps what lies near the maximum, and the nucleus-style
filters grow a partial sort until it holds the mass they need, so a step stays O(V) in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slm.generation.params import SAMPLERS, GenerationParams, LogitsProcessor


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities (V,) from logits (V,); -inf logits get probability 0."""
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max()
    return logits - (top + np.log(np.exp(logits - top).sum()))


# --- processors that reshape the distribution ------------------------------------------------


def logit_bias(bias: dict[int, float]) -> LogitsProcessor:
    """Add a fixed bias to chosen tokens (OpenAI's ``logit_bias``)."""
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def apply(token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        logits[ids] += values
        return logits

    return apply


class _Counts:
    """Occurrences of each token in ``token_ids[start:]``, updated incrementally as the sequence grows.

    If the tokens already counted are no longer a prefix of the sequence (it was rewound, then
    maybe grew again), everything is counted again. The prefix check is one list comparison in C.
    """

    def __init__(self, start: int) -> None:
        self.start = start
        self.counted: list[int] = []
        self.counts: dict[int, int] = {}

    def update(self, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        seen = self.start + len(self.counted)
        if list(token_ids[self.start : seen]) != self.counted:
            self.counted, self.counts = [], {}
            seen = self.start
        new = list(token_ids[seen:])
        for token in new:
            if token >= 0:  # an image's placeholder ids are no tokens of the vocabulary
                self.counts[token] = self.counts.get(token, 0) + 1
        self.counted.extend(new)
        ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
        return ids, counts


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Make every token already in the sequence (prompt included) less likely: positive logits are
    divided by ``penalty``, negative ones multiplied (the CTRL paper's rule, as in transformers)."""
    counts = _Counts(start=0)

    def apply(token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        ids, _ = counts.update(token_ids)
        seen = logits[ids]
        logits[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
        return logits

    return apply


def frequency_presence_penalty(frequency: float, presence: float, start: int) -> LogitsProcessor:
    """OpenAI's penalties over the tokens generated so far (from position ``start`` on):
    ``logit -= count * frequency + (count > 0) * presence``."""
    counts = _Counts(start=start)

    def apply(token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        ids, n = counts.update(token_ids)
        logits[ids] -= n * frequency + presence
        return logits

    return apply


def no_repeat_ngram(size: int) -> LogitsProcessor:
    """Ban every token that would make an n-gram of ``size`` tokens occur a second time in the sequence
    (prompt included), as transformers' ``no_repeat_ngram_size`` does."""

    def apply(token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        logits[banned_by_ngrams(token_ids, size)] = -np.inf
        return logits

    return apply


def banned_by_ngrams(token_ids: Sequence[int], size: int) -> list[int]:
    """The tokens that would end an n-gram of ``size`` already in ``token_ids``."""
    n = len(token_ids)
    if n + 1 < size:
        return []
    tail = list(token_ids[n - size + 1 :]) if size > 1 else []
    head = size - 1
    return [int(token_ids[i + head]) for i in range(n - head) if list(token_ids[i : i + head]) == tail]


# --- the sampler -----------------------------------------------------------------------------

SMALL = 1024
"""Candidate sets up to this size are sorted outright; larger ones are cut by thresholds first."""


_WIDTHS = tuple(4.0 * 1.5**i for i in range(18))  # 4 .. ~5900 logits below the top


def _top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` highest logits (ties at the boundary kept), without partitioning all of V:
    first keep what lies within ``width`` of the maximum, widening gently until at least k tokens are
    in (a wide jump on a peaked distribution would pull in most of the vocabulary)."""
    top = float(logits.max())
    for width in _WIDTHS:
        ids = np.flatnonzero(logits >= top - width)
        if ids.shape[0] >= k:
            break
    else:  # fewer than k tokens near the top (a processor banned the rest): every finite one is in
        ids = np.flatnonzero(np.isfinite(logits))
    if ids.shape[0] <= k:
        return ids
    values = logits[ids]
    kth = values[np.argpartition(values, -k)[-k]]
    return ids[values >= kth]


def _smallest_set_with_mass(order_key: np.ndarray, probs: np.ndarray, mass: float) -> np.ndarray:
    """Ids of the fewest tokens, taken in ascending ``order_key``, whose probabilities sum to at
    least ``mass``. Sorts a growing prefix instead of the whole vocabulary."""
    n = order_key.shape[0]
    width = min(64, n)
    while True:
        part = np.argpartition(order_key, width - 1)[:width] if width < n else np.arange(n)
        part = part[np.argsort(order_key[part], kind="stable")]
        cumulative = np.cumsum(probs[part])
        if cumulative[-1] >= mass or width == n:
            keep = int(np.searchsorted(cumulative, mass, side="left")) + 1
            return part[: min(keep, width)]
        width = min(width * 4, n)


def _nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    """Positions in ``probs`` of the smallest most-likely set with mass >= p. Only tokens above a
    probability floor are sorted; the floor drops until the tokens above it hold the mass."""
    if probs.shape[0] > SMALL:
        floor = float(probs.max()) * 1e-3
        while True:
            above = np.flatnonzero(probs >= floor)
            if probs[above].sum() >= p or floor < 1e-30:
                break
            floor *= 1e-3
        if above.shape[0] < probs.shape[0] and probs[above].sum() >= p:
            order = above[np.argsort(-probs[above], kind="stable")]
            keep = int(np.searchsorted(np.cumsum(probs[order]), p, side="left")) + 1
            return order[: min(keep, order.shape[0])]
    return _smallest_set_with_mass(-probs, probs, p)


@dataclass
class Sampler:
    """Turns one step's logits into a token.

    ``processors`` reshape the model's distribution (their output is what logprobs report). The
    truncation settings then shape the draw, in ``order`` (Hugging Face's by default: temperature, top-k,
    top-p, min-p, typical-p; llama.cpp's ``samplers`` may ask for another, and leave some out). Each keeps
    part of the candidates the one before left and renormalizes over them: the distribution masking the
    whole vocabulary step by step would give, without building those masks.
    """

    processors: list[LogitsProcessor]
    rng: np.random.Generator
    greedy: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    order: tuple[str, ...] = SAMPLERS

    def process(self, token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        for processor in self.processors:
            logits = processor(token_ids, logits)
        return logits

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that may be drawn from processed logits (V,), and their probabilities."""
        steps = list(self.order)
        ids = None
        # Top-k keeps the same tokens before or after a temperature (a positive scale keeps the order): it runs
        # first when only temperatures come before it, on the whole vocabulary's logits, without a sort.
        if "top_k" in steps and set(steps[: steps.index("top_k")]) <= {"temperature"}:
            steps.remove("top_k")
            if 0 < self.top_k < logits.shape[0]:
                ids = _top_k_ids(logits, self.top_k)
        if ids is None:
            ids = np.flatnonzero(np.isfinite(logits))
        values = logits[ids]
        for step in steps:
            if step == "temperature":
                values = values / self.temperature
                continue
            keep = self._cut(step, values)
            if keep is not None:
                ids, values = ids[keep], values[keep]
        return ids, softmax(values)

    def _cut(self, step: str, values: np.ndarray) -> np.ndarray | None:
        """Positions of ``values`` (logits) that truncation ``step`` keeps; None when it keeps them all."""
        if step == "top_k":
            if not 0 < self.top_k < values.shape[0]:
                return None
            kth = values[np.argpartition(values, -self.top_k)[-self.top_k]]
            return np.flatnonzero(values >= kth)
        if step == "top_p" and self.top_p < 1.0:
            return _nucleus(softmax(values), self.top_p)
        if step == "min_p" and self.min_p > 0.0:
            probs = softmax(values)
            return np.flatnonzero(probs >= self.min_p * probs.max())
        if step == "typical_p" and self.typical_p < 1.0:
            probs, logp = softmax(values), log_softmax(values)
            entropy = -float(np.sum(probs * logp))
            return _smallest_set_with_mass(np.abs(-logp - entropy), probs, self.typical_p)
        return None

    def choose(self, token_ids: Sequence[int], logits: np.ndarray) -> int:
        """Pick a token from processed logits."""
        if self.greedy:
            return int(np.argmax(logits))
        ids, probs = self.distribution(logits)
        return int(ids[draw(self.rng, probs)])


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """An index drawn with weights ``probs`` (not necessarily summing to 1)."""
    cdf = np.cumsum(probs)
    # side="right" never lands on a zero-probability index: its cdf equals its predecessor's.
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), probs.shape[0] - 1)


def build_sampler(params: GenerationParams, generated_from: int, constraint: LogitsProcessor | None = None) -> Sampler:
    """The processor chain and sampler for one request; ``generated_from`` is the position where
    generated tokens begin (the frequency and presence penalties count from there). ``constraint`` (a
    grammar's) comes last, so that nothing after it gives a refused token back its chance."""
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(logit_bias(dict(params.logit_bias)))
    processors.extend(params.logits_processors)
    if params.repetition_penalty != 1.0:
        processors.append(repetition_penalty(params.repetition_penalty))
    if params.frequency_penalty or params.presence_penalty:
        processors.append(
            frequency_presence_penalty(params.frequency_penalty, params.presence_penalty, generated_from)
        )
    if params.no_repeat_ngram_size:
        processors.append(no_repeat_ngram(params.no_repeat_ngram_size))
    if constraint is not None:
        processors.append(constraint)
    return Sampler(
        processors, np.random.default_rng(params.seed), params.greedy,
        temperature=params.temperature or 1.0, top_k=params.top_k, top_p=params.top_p,
        min_p=params.min_p, typical_p=params.typical_p, order=params.samplers,
    )
