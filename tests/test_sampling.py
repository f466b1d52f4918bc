"""Logits processors and the sampler, on small hand-computed logits.

The truncation settings (temperature, top-k, top-p, min-p, typical-p) live in ``Sampler.distribution``,
which works on a shrinking candidate set: it is checked against hand-computed answers (the exact tokens it
may draw and their probabilities), and its fast paths against full-sort references on vocabulary-sized
inputs.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from slm.errors import InvalidParameter
from slm.generation.params import GenerationParams
from slm.generation.sampling import (
    Sampler,
    _nucleus,
    _smallest_set_with_mass,
    build_sampler,
    frequency_presence_penalty,
    logit_bias,
    repetition_penalty,
    softmax,
)

NEG_INF = -np.inf
#: No truncation at all: every setting but temperature switched off.
PLAIN = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0}


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def sampler_for(**settings: object) -> Sampler:
    return build_sampler(GenerationParams(**{**PLAIN, "temperature": 1.0, **settings}), generated_from=0)


def candidates(sampler: Sampler, logits: np.ndarray) -> dict[int, float]:
    """Every token the sampler kept as a candidate (each once), and its probability (possibly 0)."""
    ids, probs = sampler.distribution(logits.copy())
    assert len(set(ids.tolist())) == len(ids)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    return {int(i): float(q) for i, q in zip(ids, probs, strict=True)}


def drawable(sampler: Sampler, logits: np.ndarray) -> dict[int, float]:
    """The sampler's candidate tokens with a non-zero probability, and those probabilities."""
    return {i: q for i, q in candidates(sampler, logits).items() if q > 0}


def normalized(weights: dict[int, float]) -> dict[int, float]:
    total = sum(weights.values())
    return {i: w / total for i, w in weights.items()}


def softmax_of(values: tuple[float, ...], keep: set[int], t: float = 1.0) -> dict[int, float]:
    """The hand-computed answer: softmax of ``values / t`` over the tokens in ``keep``."""
    return normalized({i: math.exp(values[i] / t) for i in keep})


def assert_distribution(actual: dict[int, float], expected: dict[int, float]) -> None:
    assert set(actual) == set(expected)
    for token, q in expected.items():
        assert actual[token] == pytest.approx(q, rel=1e-5, abs=1e-7), token


# --- logit bias and penalties -------------------------------------------------------------------


def test_logit_bias_adds_to_chosen_tokens_only() -> None:
    out = logit_bias({0: 5.0, 3: -100.0, 5: 0.5})([], f32(1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    np.testing.assert_array_equal(out, f32(6.0, 2.0, 3.0, -96.0, 5.0, 6.5))


def test_repetition_penalty_divides_positive_multiplies_negative_including_prompt() -> None:
    penalty = repetition_penalty(2.0)
    # Token 0 is in the "prompt" part only, token 1 twice (penalized once), token 6 has logit 0.
    out = penalty([0, 1, 1, 4, 6], f32(2.0, -2.0, 1.0, -1.0, 0.5, 3.0, 0.0))
    np.testing.assert_array_equal(out, f32(1.0, -4.0, 1.0, -1.0, 0.25, 3.0, 0.0))
    # The sequence grows: token 2 joins the penalized set; the others are still penalized once.
    out = penalty([0, 1, 1, 4, 6, 2], f32(2.0, -2.0, 1.0, -1.0, 0.5, 3.0, 0.0))
    np.testing.assert_array_equal(out, f32(1.0, -4.0, 0.5, -1.0, 0.25, 3.0, 0.0))


def test_repetition_penalty_forgets_tokens_after_a_rewind() -> None:
    penalty = repetition_penalty(4.0)
    penalty([3, 5], np.zeros(6, dtype=np.float32))
    out = penalty([3], np.full(6, 4.0, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(4.0, 4.0, 4.0, 1.0, 4.0, 4.0))


def test_repetition_penalty_recounts_after_rewind_and_regrowth() -> None:
    penalty = repetition_penalty(2.0)
    penalty([0, 1], np.zeros(4, dtype=np.float32))
    # Rewound to [0], then [2, 3] appended: token 1 is gone from the sequence.
    out = penalty([0, 2, 3], np.full(4, 2.0, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(1.0, 2.0, 1.0, 1.0))


def test_frequency_presence_penalty_counts_only_generated_tokens() -> None:
    penalty = frequency_presence_penalty(0.5, 1.0, start=2)
    # Prompt [3, 3]; generated [0, 0, 1]: token 0 twice, token 1 once, token 3 never (prompt only).
    out = penalty([3, 3, 0, 0, 1], np.zeros(6, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(-(2 * 0.5 + 1.0), -(1 * 0.5 + 1.0), 0, 0, 0, 0))
    out = penalty([3, 3, 0, 0, 1, 0], np.zeros(6, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(-(3 * 0.5 + 1.0), -(1 * 0.5 + 1.0), 0, 0, 0, 0))


def test_frequency_presence_penalty_recounts_after_shrinking() -> None:
    penalty = frequency_presence_penalty(0.5, 1.0, start=2)
    penalty([3, 3, 0, 0, 1], np.zeros(6, dtype=np.float32))
    out = penalty([3, 3, 0], np.zeros(6, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(-1.5, 0, 0, 0, 0, 0))
    out = penalty([3, 3], np.zeros(6, dtype=np.float32))  # back to the prompt: nothing penalized
    np.testing.assert_array_equal(out, np.zeros(6, dtype=np.float32))


def test_frequency_presence_penalty_recounts_after_rewind_and_regrowth() -> None:
    """``Generator.rewind_to`` then ``append_tokens`` hands the processor a sequence that was cut and
    grew past its old length before the next step; the counts must be those of the new sequence."""
    penalty = frequency_presence_penalty(0.5, 1.0, start=2)
    penalty([3, 3, 0, 0, 1], np.zeros(6, dtype=np.float32))
    # Rewound to the prompt, then [1, 1, 1, 2]: token 0 no longer occurs, token 1 three times.
    out = penalty([3, 3, 1, 1, 1, 2], np.zeros(6, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(0, -(3 * 0.5 + 1.0), -(1 * 0.5 + 1.0), 0, 0, 0))


def test_negative_frequency_and_presence_penalties_encourage() -> None:
    out = frequency_presence_penalty(-1.0, -0.5, start=0)([4, 4], np.zeros(5, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(0, 0, 0, 0, 2.5))


# --- temperature --------------------------------------------------------------------------------

TEMPERATURE_LOGITS = (2.0, -1.0, 0.5, NEG_INF, 0.0, 3.0)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits_and_a_masked_token_is_no_candidate(t: float) -> None:
    # At 0.5 the logits count double (4, -2, 1, 0, 6), at 2 half (1, -0.5, 0.25, 0, 1.5).
    expected = softmax_of(TEMPERATURE_LOGITS, {0, 1, 2, 4, 5}, t)
    actual = candidates(sampler_for(temperature=t), f32(*TEMPERATURE_LOGITS))
    assert 3 not in actual  # -inf stays out at any temperature: not even with probability 0
    assert_distribution(actual, expected)


def test_a_lower_temperature_sharpens_the_distribution() -> None:
    logits = f32(*TEMPERATURE_LOGITS)
    top = [candidates(sampler_for(temperature=t), logits)[5] for t in (2.0, 1.0, 0.5, 0.25)]
    assert top == sorted(top) and top[0] < top[-1]


# --- top-k --------------------------------------------------------------------------------------

TOP_K_LOGITS = (0.5, 9.0, 3.0, -2.0, 7.0, -5.0, 1.0, 0.0)


@pytest.mark.parametrize(("k", "expected"), [(1, {1}), (2, {1, 4}), (3, {1, 4, 2}), (5, {1, 4, 2, 6, 0})])
def test_top_k_keeps_the_k_highest(k: int, expected: set[int]) -> None:
    # The survivors keep their logits: their probabilities are the softmax of the originals over them.
    actual = candidates(sampler_for(top_k=k), f32(*TOP_K_LOGITS))
    assert_distribution(actual, softmax_of(TOP_K_LOGITS, expected))


def test_top_k_keeps_all_ties_at_the_boundary() -> None:
    values = (1.0, 5.0, 3.0, 3.0, 2.0, 0.0, 3.0)
    actual = candidates(sampler_for(top_k=2), f32(*values))
    assert_distribution(actual, softmax_of(values, {1, 2, 3, 6}))


def test_top_k_far_apart_logits() -> None:
    # The sampler widens its window around the maximum until k tokens are in: here they are 50 apart.
    values = (0.0, 100.0, -100.0, 50.0, NEG_INF, -200.0)
    actual = candidates(sampler_for(top_k=3), f32(*values))
    assert set(actual) == {0, 1, 3}
    assert actual[1] == pytest.approx(1.0) and actual[3] == pytest.approx(math.exp(-50.0), rel=1e-4)
    assert actual[0] < actual[3]


@pytest.mark.parametrize("k", [6, 7, 1000])
def test_top_k_at_or_beyond_vocabulary_is_a_no_op(k: int) -> None:
    values = (1.0, -3.0, NEG_INF, 2.0, 0.0, -1.0)
    actual = candidates(sampler_for(top_k=k), f32(*values))
    assert_distribution(actual, softmax_of(values, {0, 1, 3, 4, 5}))  # the masked token 2 stays out


# --- top-p --------------------------------------------------------------------------------------

TOP_P_LOGITS = (1.0, 3.0, -1.0, 2.0, 0.0, NEG_INF)


@pytest.mark.parametrize(("p", "expected"), [(0.5, {1}), (0.8, {1, 3}), (0.9, {1, 3, 0}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(p: float, expected: set[int]) -> None:
    z = sum(math.exp(v) for v in TOP_P_LOGITS)
    p3, p2, p1 = math.exp(3.0) / z, math.exp(2.0) / z, math.exp(1.0) / z
    assert (round(p3, 3), round(p3 + p2, 3), round(p3 + p2 + p1, 3)) == (0.636, 0.871, 0.957)  # by hand
    # p = 1.0 keeps every token (but the masked one), with the untruncated probabilities.
    actual = candidates(sampler_for(top_p=p), f32(*TOP_P_LOGITS))
    assert_distribution(actual, softmax_of(TOP_P_LOGITS, expected))


@pytest.mark.parametrize(
    ("p", "size"), [(0.25, 1), (0.4999999, 2), (0.5, 2), (0.5000001, 3), (0.75, 3), (0.7500001, 4)]
)
def test_top_p_boundary_where_the_mass_is_reached_exactly(p: float, size: int) -> None:
    # Four equal logits: probabilities exactly 0.25, cumulative masses exactly 0.25, 0.5, 0.75, 1.
    logits = f32(0.0, NEG_INF, 0.0, 0.0, NEG_INF, 0.0)
    assert softmax(logits.copy())[0] == np.float32(0.25)
    actual = candidates(sampler_for(top_p=p), logits)
    assert len(actual) == size and set(actual) <= {0, 2, 3, 5}  # which of the ties: unspecified
    assert all(q == pytest.approx(1 / size) for q in actual.values())


@pytest.mark.parametrize(("p", "size"), [(0.5, 2), (0.5000001, 3), (0.75, 3)])
def test_top_p_exact_boundary_on_a_large_vocabulary(p: float, size: int) -> None:
    # Over 1024 candidates the sampler cuts by a probability floor before sorting. Four tokens at 0,
    # the rest at -200 (probability exactly 0 in float32): the masses are again exactly 0.25 steps.
    logits = np.full(5000, -200.0, dtype=np.float32)
    live = [7, 1234, 2500, 4999]
    logits[live] = 0.0
    assert np.count_nonzero(softmax(logits.copy())) == 4
    actual = candidates(sampler_for(top_p=p), logits)
    assert len(actual) == size and set(actual) <= set(live)
    assert all(q == pytest.approx(1 / size) for q in actual.values())


# --- min-p --------------------------------------------------------------------------------------

MIN_P_LOGITS = (2.0, 1.0, -0.5, -0.2, 0.3, -3.0)
# Probability relative to the top token, exp(logit - 2): 1, 0.368, 0.082, 0.111, 0.183, 0.007.


@pytest.mark.parametrize(("p", "expected"), [(0.1, {0, 1, 3, 4}), (0.2, {0, 1}), (0.5, {0}), (0.0, set(range(6)))])
def test_min_p_drops_tokens_below_p_times_the_top_probability(p: float, expected: set[int]) -> None:
    actual = candidates(sampler_for(min_p=p), f32(*MIN_P_LOGITS))
    assert_distribution(actual, softmax_of(MIN_P_LOGITS, expected))


def test_min_p_is_relative_to_the_top_token_not_an_absolute_floor() -> None:
    # Eight equal tokens of probability 1/8 each: min-p 0.5 keeps them all (1/8 >= 0.5 * 1/8).
    logits = np.zeros(8, dtype=np.float32)
    assert_distribution(candidates(sampler_for(min_p=0.5), logits), {i: 1 / 8 for i in range(8)})
    # A token exactly at p times the top is kept: min-p 1.0 keeps every token tied with the top.
    values = (0.0, -1.0, 0.0, NEG_INF, 0.0)
    assert_distribution(candidates(sampler_for(min_p=1.0), f32(*values)), {0: 1 / 3, 2: 1 / 3, 4: 1 / 3})


# --- typical-p ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "expected"), [
    (0.2, {1: 1.0}),  # not the most likely token
    (0.3, {1: 1 / 3, 0: 2 / 3}),
    (0.7, {1: 1 / 3, 0: 2 / 3}),
    (0.9, {0: 0.5, 1: 0.25, 2: 0.125, 3: 0.125}),
    (1.0, {0: 0.5, 1: 0.25, 2: 0.125, 3: 0.125}),  # everything but the masked token, untruncated
])
def test_typical_p_keeps_tokens_closest_to_the_entropy(p: float, expected: dict[int, float]) -> None:
    # Probabilities 1/2, 1/4, 1/8, 1/8 (plus a masked token, left out of the entropy):
    #   surprises  -ln p = ln2, 2 ln2, 3 ln2, 3 ln2
    #   entropy    H = 1/2 ln2 + 1/4 2ln2 + 2 * 1/8 3ln2 = 1.75 ln2
    #   distances  |-ln p - H| = 0.75 ln2, 0.25 ln2, 1.25 ln2, 1.25 ln2
    # so the typical order is token 1 (p=1/4), token 0 (1/2), then tokens 2 and 3.
    ln2 = math.log(2.0)
    logits = f32(-ln2, -2 * ln2, -3 * ln2, -3 * ln2, NEG_INF)
    assert_distribution(candidates(sampler_for(typical_p=p), logits), expected)


def test_typical_p_on_an_uneven_distribution() -> None:
    values = (3.0, 2.5, 1.0, 0.0, -1.0, -4.0)
    z = sum(math.exp(v) for v in values)
    probs = [math.exp(v) / z for v in values]
    entropy = -sum(q * math.log(q) for q in probs)
    surprises = [-math.log(q) for q in probs]
    assert round(entropy, 3) == 1.037 and [round(s, 3) for s in surprises[:3]] == [0.594, 1.094, 2.594]
    # Distances to H: 0.443, 0.057, 1.557, 2.557, ... so the order is token 1, token 0, token 2.
    mass = probs[1] + probs[0]
    assert round(mass, 3) == 0.887
    logits = f32(*values)
    assert_distribution(candidates(sampler_for(typical_p=mass - 0.01), logits), softmax_of(values, {0, 1}))
    assert_distribution(candidates(sampler_for(typical_p=mass + 0.01), logits), softmax_of(values, {0, 1, 2}))


# --- the fast paths against full sorts ----------------------------------------------------------


def _reference_set(order_key: np.ndarray, probs: np.ndarray, mass: float) -> np.ndarray:
    order = np.argsort(order_key, kind="stable")
    cumulative = np.cumsum(probs[order])
    reached = np.flatnonzero(cumulative >= mass)
    size = int(reached[0]) + 1 if reached.size else len(order)
    return order[:size]


def _random_probs(seed: int, scale: float, n: int = 50_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return softmax((rng.standard_normal(n) * scale).astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])
def test_smallest_set_with_mass_matches_full_sort(seed: int, p: float, scale: float) -> None:
    probs = _random_probs(seed, scale)
    logp = np.log(probs)
    entropy = -float(np.sum(probs * logp))
    # The top-p order (most likely first) and the typical-p order (surprise closest to the entropy).
    for key in (-probs, np.abs(-logp - entropy)):
        fast = _smallest_set_with_mass(key, probs, p)
        reference = _reference_set(key, probs, p)
        assert len(fast) == len(reference)
        assert len(set(fast.tolist())) == len(fast)
        np.testing.assert_array_equal(np.sort(key[fast]), np.sort(key[reference]))
        assert probs[fast].sum(dtype=np.float64) >= p - 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])
def test_nucleus_matches_full_sort(seed: int, p: float, scale: float) -> None:
    probs = _random_probs(seed, scale)
    fast = _nucleus(probs, p)
    reference = _reference_set(-probs, probs, p)
    assert len(fast) == len(reference)
    np.testing.assert_array_equal(np.sort(probs[fast]), np.sort(probs[reference]))


def _reference_distribution(logits: np.ndarray, t: float, k: int, p: float, m: float, typ: float) -> dict[int, float]:
    """Temperature, top-k, top-p, min-p, typical-p over the whole vocabulary with full sorts."""
    x = logits.astype(np.float32) / np.float32(t)
    alive = np.isfinite(x)
    if 0 < k < x.shape[0]:
        alive &= x >= np.sort(x)[-k]

    def probs_of(mask: np.ndarray) -> np.ndarray:
        return softmax(np.where(mask, x, np.float32(NEG_INF)))

    if p < 1.0:
        q = probs_of(alive)
        keep = _reference_set(-q, q, p)
        alive = np.zeros_like(alive)
        alive[keep] = True
    if m > 0.0:
        q = probs_of(alive)
        alive &= q >= m * q.max()
    if typ < 1.0:
        q = probs_of(alive)
        with np.errstate(divide="ignore"):
            logq = np.log(q)
        entropy = -float(np.sum(q[alive] * logq[alive]))
        distance = np.where(alive, np.abs(-logq - entropy), np.inf)
        keep = _reference_set(distance, q, typ)
        alive = np.zeros_like(alive)
        alive[keep] = True
    q = probs_of(alive)
    return {int(i): float(q[i]) for i in np.flatnonzero(q > 0)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1.0},  # the defaults
        {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0},
        {"temperature": 1.3, "top_k": 2000, "top_p": 0.5, "min_p": 0.0, "typical_p": 1.0},
        {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 0.9},
        {"temperature": 1.0, "top_k": 0, "top_p": 0.99, "min_p": 0.01, "typical_p": 0.95},
    ],
)
def test_sampler_distribution_matches_full_vocabulary_reference(seed: int, settings: dict[str, float]) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(49_152) * 2.5).astype(np.float32)  # SmolLM2's vocabulary size
    logits[rng.choice(49_152, 500, replace=False)] = NEG_INF
    expected = _reference_distribution(logits, *settings.values())  # type: ignore[arg-type]
    assert_distribution(drawable(sampler_for(**settings), logits), expected)


# --- build_sampler ------------------------------------------------------------------------------


def test_processors_run_in_order_bias_then_custom_then_penalties() -> None:
    seen: list[np.ndarray] = []

    def custom(token_ids: object, logits: np.ndarray) -> np.ndarray:
        seen.append(logits.copy())
        logits[0] += 2.0
        return logits

    params = GenerationParams(logit_bias={2: 1.5}, logits_processors=[custom], repetition_penalty=2.0)
    sampler = build_sampler(params, generated_from=2)
    out = sampler.process([0, 2], f32(1.0, 1.0, 1.0, 1.0, 1.0, 1.0))
    # The custom processor saw the bias but not the penalty...
    np.testing.assert_array_equal(seen[0], f32(1.0, 1.0, 2.5, 1.0, 1.0, 1.0))
    # ...and the penalty divided what the custom processor produced: (1 + 2) / 2 and (1 + 1.5) / 2.
    np.testing.assert_array_equal(out, f32(1.5, 1.0, 1.25, 1.0, 1.0, 1.0))


def test_frequency_penalty_in_the_sampler_counts_from_generated_from() -> None:
    sampler = build_sampler(GenerationParams(frequency_penalty=1.0, presence_penalty=0.5), generated_from=3)
    out = sampler.process([1, 1, 1, 2, 2], np.zeros(4, dtype=np.float32))
    np.testing.assert_array_equal(out, f32(0.0, 0.0, -2.5, 0.0))


def test_temperature_is_applied_before_top_p_and_min_p() -> None:
    # Logits 2, 1, 0 give probabilities 0.665, 0.245, 0.090 at temperature 1 (top-p 0.8 keeps two)
    # and 0.982, 0.018, 0.000 at temperature 0.25 (it keeps one).
    logits = f32(2.0, 1.0, 0.0)
    assert set(drawable(sampler_for(temperature=1.0, top_p=0.8), logits)) == {0, 1}
    assert set(drawable(sampler_for(temperature=0.25, top_p=0.8), logits)) == {0}
    # Min-p 0.2: exp(-1) = 0.37 >= 0.2 keeps token 1 at temperature 1; exp(-4) = 0.02 drops it at 0.25.
    assert set(drawable(sampler_for(temperature=1.0, min_p=0.2), logits)) == {0, 1}
    assert set(drawable(sampler_for(temperature=0.25, min_p=0.2), logits)) == {0}
    # And the draws agree.
    sampler = build_sampler(GenerationParams(temperature=0.25, seed=5, **{**PLAIN, "min_p": 0.2}), 0)
    assert {sampler.choose([], logits.copy()) for _ in range(500)} == {0}


def test_top_k_is_applied_before_top_p() -> None:
    # Top-k 2 leaves 2 and 1, renormalized to 0.731 and 0.269: top-p 0.7 then keeps only token 0.
    # Without top-k, token 0 has 0.665 < 0.7 and top-p would keep two.
    logits = f32(2.0, 1.0, 0.0)
    assert set(drawable(sampler_for(top_p=0.7), logits)) == {0, 1}
    assert set(drawable(sampler_for(top_k=2, top_p=0.7), logits)) == {0}


def test_samplers_run_in_the_order_asked_and_one_left_out_does_not_run() -> None:
    logits = f32(2.0, 1.0, 0.0)
    # llama.cpp's order: top-p at temperature 1 keeps tokens 0 and 1 (0.665 + 0.245), then temperature 0.25
    # sharpens those two; Hugging Face's (the default) sharpens first and top-p keeps token 0 alone.
    last = sampler_for(temperature=0.25, top_p=0.8, samplers=("top_k", "typical_p", "top_p", "min_p", "temperature"))
    assert_distribution(drawable(last, logits), softmax_of((2.0, 1.0, 0.0), {0, 1}, t=0.25))
    assert set(drawable(sampler_for(temperature=0.25, top_p=0.8), logits)) == {0}
    # top-k left out: a top_k of 1 keeps nothing out; temperature left out: the logits are not scaled
    assert_distribution(drawable(sampler_for(top_k=1, temperature=0.5, samplers=("top_p",)), logits),
                        softmax_of((2.0, 1.0, 0.0), {0, 1, 2}))
    # top-k after top-p: top-p 0.95 at temperature 1 keeps three, top-k 2 then two of them
    after = sampler_for(top_p=0.95, top_k=2, samplers=("top_p", "top_k"))
    assert_distribution(drawable(after, logits), softmax_of((2.0, 1.0, 0.0), {0, 1}))


def _reference_in_order(logits: np.ndarray, order: tuple[str, ...], settings: dict[str, float]) -> dict[int, float]:
    """The samplers in ``order`` over the whole vocabulary, each as its own full-sort mask."""
    x = logits.astype(np.float32)
    alive = np.isfinite(x)
    for step in order:
        q = softmax(np.where(alive, x, np.float32(NEG_INF)))
        if step == "temperature":
            x = x / np.float32(settings["temperature"])
        elif step == "top_k":
            alive &= np.where(alive, x, NEG_INF) >= np.sort(np.where(alive, x, NEG_INF))[-int(settings["top_k"])]
        elif step == "top_p":
            keep = _reference_set(-q, q, settings["top_p"])
            alive = np.zeros_like(alive)
            alive[keep] = True
        elif step == "min_p":
            alive &= q >= settings["min_p"] * q.max()
    q = softmax(np.where(alive, x, np.float32(NEG_INF)))
    return {int(i): float(q[i]) for i in np.flatnonzero(q > 0)}


@pytest.mark.parametrize("order", [("top_k", "top_p", "min_p", "temperature"),  # llama.cpp's, without typical
                                   ("min_p", "temperature", "top_p", "top_k"),
                                   ("top_p", "top_k", "temperature")])
def test_any_sampler_order_matches_a_full_vocabulary_reference(order: tuple[str, ...]) -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(49_152) * 2.5).astype(np.float32)
    settings = {"temperature": 0.7, "top_k": 200, "top_p": 0.9, "min_p": 0.02}
    expected = _reference_in_order(logits, order, settings)
    sampler = build_sampler(GenerationParams(**{**PLAIN, **settings}, samplers=order), generated_from=0)  # type: ignore[arg-type]
    assert_distribution(drawable(sampler, logits), expected)


@pytest.mark.parametrize(("samplers", "named"), [
    (("top_k", "dry"), "samplers[1]"), (("top_p", "top_p"), "samplers[1]"), ("top_k", "samplers")])
def test_unknown_or_repeated_samplers_are_refused(samplers: object, named: str) -> None:
    with pytest.raises(InvalidParameter, match=re.escape(named)):
        GenerationParams(samplers=samplers)  # type: ignore[arg-type]


def test_greedy_is_the_argmax_of_processed_logits() -> None:
    logits = f32(1.0, 2.0, 0.5, -1.0, 1.9, 0.0)
    greedy = build_sampler(GenerationParams(temperature=0), generated_from=0)
    assert greedy.greedy
    assert greedy.choose([], greedy.process([], logits.copy())) == 1
    # Logit bias moves the argmax: 0.5 + 3 = 3.5 beats 2.
    biased = build_sampler(GenerationParams(temperature=0, logit_bias={2: 3.0}), generated_from=0)
    assert biased.choose([], biased.process([], logits.copy())) == 2
    # A repetition penalty on token 1 (in the prompt) leaves token 4 on top: 2 / 2 = 1 < 1.9.
    penalized = build_sampler(GenerationParams(temperature=0, repetition_penalty=2.0), generated_from=1)
    assert penalized.choose([1], penalized.process([1], logits.copy())) == 4
    # Greedy ignores the seed, and truncation settings cannot change the argmax.
    picks = {
        build_sampler(GenerationParams(temperature=0, seed=s, top_k=1 + s % 3, min_p=0.5), 0).choose([], logits.copy())
        for s in range(20)
    }
    assert picks == {1}


def test_sampler_never_picks_a_masked_token() -> None:
    logits = f32(NEG_INF, 1.0, 0.5, 2.0, NEG_INF, 0.2, -0.3, 1.5, 0.1, NEG_INF)
    sampler = build_sampler(GenerationParams(temperature=1.5, seed=11, **PLAIN), generated_from=0)
    draws = np.array([sampler.choose([], logits.copy()) for _ in range(20_000)])
    assert not np.isin(draws, [0, 4, 9]).any()
    assert set(draws.tolist()) == {1, 2, 3, 5, 6, 7, 8}  # and every live token does come out
    # Masked by logit bias -100 plus top-k (3 keeps 3, 7, 1) rather than by the model.
    params = GenerationParams(temperature=1.0, seed=12, logit_bias={3: -100}, **{**PLAIN, "top_k": 3})
    sampler = build_sampler(params, generated_from=0)
    draws = np.array([sampler.choose([], sampler.process([], logits.copy())) for _ in range(5_000)])
    assert set(draws.tolist()) == {1, 2, 7}


class _FixedDraw:
    """A random source that always returns the same number (to hit the ends of the cdf)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(("u", "expected"), [(0.0, 2), (float(np.nextafter(1.0, 0.0)), 4)])
def test_sampler_skips_masked_tokens_at_both_ends_of_the_cdf(u: float, expected: int) -> None:
    logits = f32(NEG_INF, NEG_INF, 1.0, 0.0, 2.0, NEG_INF, NEG_INF)
    sampler = sampler_for()
    sampler.rng = _FixedDraw(u)  # type: ignore[assignment]
    assert sampler.choose([], logits.copy()) == expected


def test_seeded_sampling_is_reproducible() -> None:
    logits = f32(0.3, 0.1, 0.0, -0.2, 0.25, 0.05, -0.1, 0.2)

    def draws(seed: int) -> list[int]:
        sampler = build_sampler(GenerationParams(temperature=1.0, seed=seed, **PLAIN), generated_from=0)
        return [sampler.choose([], logits.copy()) for _ in range(200)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)
    assert len(set(draws(42))) > 4  # a real spread, not a constant


@pytest.mark.parametrize("temp", [1.0, 0.5])
def test_sampling_frequencies_follow_softmax(temp: float) -> None:
    logits = f32(1.0, 0.0, -1.0)
    weights = [math.exp(v / temp) for v in (1.0, 0.0, -1.0)]
    expected = np.array([w / sum(weights) for w in weights])  # T=1: 0.665, 0.245, 0.090
    sampler = build_sampler(GenerationParams(temperature=temp, seed=2024, **PLAIN), generated_from=0)
    n = 20_000
    counts = np.bincount([sampler.choose([], logits.copy()) for _ in range(n)], minlength=3)
    freqs = counts / n
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n)  # five standard errors
    assert np.all(np.abs(freqs - expected) < tolerance), (freqs, expected)
    chi2 = float(np.sum((counts - n * expected) ** 2 / (n * expected)))
    assert chi2 < 13.8  # chi-square with 2 degrees of freedom, p = 0.001
