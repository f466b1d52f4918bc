"""The step-level generator (ONNX Runtime GenAI style) and the engine operations under it.

Everything runs on the session's SmolLM2 engine; every test frees the sequences it opens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

import slm
from slm.engines.llamacpp import LlamaCppEngine
from slm.errors import InvalidParameter
from slm.generation.generator import Generator
from slm.generation.sampling import log_softmax

PROMPT = "The capital of France is"
STORY = "Once upon a time, in a small village,"


def _run(gen: Generator) -> list[int]:
    """Generate until done; return the generated tokens."""
    out = []
    while not gen.is_done():
        out.append(gen.generate_next_token())
    return out


def _greedy_continuation(engine: LlamaCppEngine, seq: int, first_logits: np.ndarray, n: int) -> list[int]:
    """Continue ``seq`` greedily for ``n`` tokens straight on the engine (no generator)."""
    tokens = [int(np.argmax(first_logits))]
    while len(tokens) < n:
        tokens.append(int(np.argmax(engine.evaluate([(seq, [tokens[-1]])])[0])))
    return tokens


def _assert_all_sequences_free(engine: LlamaCppEngine) -> None:
    seqs = [engine.new_sequence() for _ in range(engine.max_sequences)]
    try:
        assert len(set(seqs)) == engine.max_sequences
        assert all(engine.sequence_length(s) == 0 for s in seqs)
    finally:
        for s in seqs:
            engine.free(s)


# --- the step API equals the one-shot API -------------------------------------------------------


def test_step_loop_equals_generate(model: slm.Model) -> None:
    prompt = model.tokenize(PROMPT)
    expected = model.generate(prompt, temperature=0, max_tokens=16)
    with model.generator(temperature=0, max_tokens=16) as gen:
        gen.append_tokens(prompt)
        tokens = _run(gen)
        assert gen.tokens == prompt + tokens
        assert gen.next_token == tokens[-1]
        assert gen.generated == len(tokens)
        assert gen.finish_reason == expected.finish_reason
    assert tokens == expected.tokens
    assert len(tokens) == 16


def test_append_accepts_numpy_ids(model: slm.Model) -> None:
    """ORT GenAI's append_tokens takes the numpy array a tokenizer returns; numpy integers are valid ids."""
    prompt = model.tokenize(PROMPT)
    expected = model.generate(prompt, temperature=0, max_tokens=4).tokens
    with model.generator(temperature=0, max_tokens=4) as gen:
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        assert _run(gen) == expected


# --- rewinding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_generated", [0, 1, 7])
def test_rewind_then_regenerate_reproduces_the_continuation(model: slm.Model, keep_generated: int) -> None:
    prompt = model.tokenize(STORY)
    with model.generator(temperature=0, max_tokens=12) as gen:
        gen.append_tokens(prompt)
        first = _run(gen)
        assert gen.finish_reason == "length"
        gen.rewind_to(len(prompt) + keep_generated)
        assert gen.tokens == prompt + first[:keep_generated]
        assert gen.generated == keep_generated
        assert not gen.is_done()
        again = _run(gen)
        assert gen.finish_reason == "length"
        assert gen.tokens == prompt + first
    assert first[:keep_generated] + again == first


def test_rewind_into_the_prompt_then_append_other_tokens(model: slm.Model) -> None:
    start = model.tokenize("The capital of France is")
    other = model.tokenize("The capital of Italy is")
    common = next(i for i, (a, b) in enumerate(zip(start, other, strict=False)) if a != b)
    assert 0 < common < len(start)
    expected = model.generate(other, temperature=0, max_tokens=8).tokens
    with model.generator(temperature=0, max_tokens=8) as gen:
        gen.append_tokens(start)
        france = _run(gen)
        gen.rewind_to(common)
        assert gen.tokens == start[:common]
        gen.append_tokens(other[common:])
        italy = _run(gen)
        assert gen.tokens == other + italy
    assert italy == expected
    assert italy != france


def test_rewind_to_zero_needs_new_tokens(model: slm.Model) -> None:
    with model.generator(temperature=0, max_tokens=4) as gen:
        gen.append_tokens(model.tokenize(PROMPT))
        gen.generate_next_token()
        gen.rewind_to(0)
        assert gen.tokens == []
        with pytest.raises(InvalidParameter):
            gen.generate_next_token()
        gen.append_tokens(model.tokenize(PROMPT))
        assert _run(gen) == model.generate(PROMPT, temperature=0, max_tokens=4).tokens


def test_rewind_out_of_range_is_refused(model: slm.Model) -> None:
    with model.generator(temperature=0, max_tokens=2) as gen:
        gen.append_tokens(model.tokenize(PROMPT))
        with pytest.raises(InvalidParameter) as excinfo:
            gen.rewind_to(len(gen.tokens) + 1)
        assert excinfo.value.field == "length"
        with pytest.raises(InvalidParameter):
            gen.rewind_to(-1)


# --- stopping and refusing ----------------------------------------------------------------------


def test_max_tokens_finishes_with_length(model: slm.Model) -> None:
    with model.generator(temperature=0, max_tokens=3) as gen:
        gen.append_tokens(model.tokenize(STORY))
        assert not gen.is_done()
        for _ in range(2):
            gen.generate_next_token()
            assert not gen.is_done() and gen.finish_reason is None
        gen.generate_next_token()
        assert gen.is_done()
        assert gen.finish_reason == "length"
        assert gen.generated == 3


def test_generate_after_done_raises(model: slm.Model) -> None:
    with model.generator(temperature=0, max_tokens=1) as gen:
        gen.append_tokens(model.tokenize(PROMPT))
        gen.generate_next_token()
        assert gen.is_done()
        with pytest.raises(InvalidParameter) as excinfo:
            gen.generate_next_token()
        assert excinfo.value.field == "generator"
        assert len(gen.tokens) == len(model.tokenize(PROMPT)) + 1  # the refused call changed nothing


def test_generate_before_append_raises(model: slm.Model) -> None:
    with model.generator(temperature=0) as gen, pytest.raises(InvalidParameter):
        gen.generate_next_token()


@pytest.mark.parametrize("bad", [-1, "vocab_size", 10**9, 3.0, "7"])
def test_out_of_vocab_id_is_refused(model: slm.Model, bad: object) -> None:
    if bad == "vocab_size":
        bad = model.info.vocab_size
    with model.generator(temperature=0) as gen:
        with pytest.raises(InvalidParameter) as excinfo:
            gen.append_tokens([1, 2, bad])  # type: ignore[list-item]
        assert excinfo.value.field == "tokens"
        assert gen.tokens == []  # nothing of a refused append is kept


def test_append_nothing_is_refused(model: slm.Model) -> None:
    with model.generator(temperature=0) as gen, pytest.raises(InvalidParameter):
        gen.append_tokens([])


def test_append_beyond_context_is_refused(model: slm.Model) -> None:
    with model.generator(temperature=0) as gen, pytest.raises(slm.ContextOverflow):
        gen.append_tokens([100] * (model.info.context_length + 1))


# --- logprobs -----------------------------------------------------------------------------------


def test_logprobs_match_the_raw_logits(model: slm.Model, engine: LlamaCppEngine) -> None:
    prompt = model.tokenize(PROMPT)
    k = 5
    steps = []
    with model.generator(temperature=0, max_tokens=6, logprobs=True, top_logprobs=k) as gen:
        gen.append_tokens(prompt)
        while not gen.is_done():
            token = gen.generate_next_token()
            assert gen.last_logprob is not None and gen.last_logprob.token == token
            steps.append(gen.last_logprob)
    generated = [s.token for s in steps]

    seq = engine.new_sequence()  # the reference: the same prefixes, read step by step in another sequence
    try:
        logits = engine.evaluate([(seq, prompt)])[0]
        for i, step in enumerate(steps):
            reference = log_softmax(logits.astype(np.float64))
            assert step.token == int(np.argmax(reference))
            assert step.logprob == pytest.approx(reference[step.token], abs=1e-4)
            assert step.logprob <= 0.0

            assert len(step.top) == k
            ids = [t for t, _ in step.top]
            values = [v for _, v in step.top]
            assert len(set(ids)) == k
            assert values == sorted(values, reverse=True)
            assert step.top[0] == (step.token, step.logprob)
            assert values == pytest.approx([reference[t] for t in ids], abs=1e-4)
            assert values == pytest.approx(np.sort(reference)[::-1][:k].tolist(), abs=1e-4)  # they are the top k
            if i + 1 < len(steps):
                logits = engine.evaluate([(seq, [generated[i]])])[0]
    finally:
        engine.free(seq)


def test_completion_carries_logprobs(model: slm.Model) -> None:
    out = model.generate(PROMPT, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    assert [lp.token for lp in out.logprobs] == out.tokens
    assert all(len(lp.top) == 3 and lp.top[0][0] == lp.token for lp in out.logprobs)
    without = model.generate(PROMPT, temperature=0, max_tokens=5)
    assert without.logprobs == [] and without.tokens == out.tokens


# --- logits processors --------------------------------------------------------------------------


def test_banning_the_greedy_token_picks_the_runner_up(model: slm.Model) -> None:
    plain = model.generate(PROMPT, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    banned, runner_up = plain.tokens[0], plain.logprobs[0].top[1][0]

    def ban(token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        logits[banned] = -np.inf
        return logits

    out = model.generate(PROMPT, temperature=0, max_tokens=4, logits_processors=[ban])
    assert out.tokens[0] == runner_up
    assert banned not in out.tokens


@pytest.mark.filterwarnings("error::RuntimeWarning")  # masking all but one token is ordinary constrained decoding
def test_forcing_a_token(model: slm.Model) -> None:
    forced = model.tokenize(" banana", add_special=False)[0]
    seen_lengths = []

    def force(token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        seen_lengths.append(len(token_ids))
        logits[:] = -np.inf
        logits[forced] = 0.0
        return logits

    prompt = model.tokenize(PROMPT)
    out = model.generate(prompt, temperature=0.9, seed=3, max_tokens=4, logits_processors=[force])
    assert out.tokens == [forced] * 4
    assert out.text == model.detokenize([forced]) * 4
    # The processor sees the whole sequence so far, growing by one token per step.
    assert seen_lengths == [len(prompt) + i for i in range(4)]


def test_logit_bias_steers_greedy(model: slm.Model) -> None:
    forced = model.tokenize(" banana", add_special=False)[0]
    out = model.generate(PROMPT, temperature=0, max_tokens=1, logit_bias={forced: 100})
    assert out.tokens == [forced]


# --- sampling and sequence bookkeeping ----------------------------------------------------------


def test_seeded_sampling_repeats_and_frees_sequences(model: slm.Model, engine: LlamaCppEngine) -> None:
    wild = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "max_tokens": 12}
    first = model.generate(STORY, seed=1234, **wild)
    second = model.generate(STORY, seed=1234, **wild)
    assert first.tokens == second.tokens
    assert first.text == second.text
    others = [model.generate(STORY, seed=s, **wild).tokens for s in (1, 2, 3)]
    assert any(o != first.tokens for o in others), "different seeds should draw differently"

    # A stream abandoned after one chunk frees its sequence too.
    stream = model.stream(STORY, seed=1234, **wild)
    chunk = next(stream)
    assert chunk.token == first.tokens[0]
    stream.close()

    _assert_all_sequences_free(engine)


# --- engine level -------------------------------------------------------------------------------


def test_fork_copies_the_kv_cache(model: slm.Model, engine: LlamaCppEngine) -> None:
    prompt = model.tokenize(STORY)
    seq = engine.new_sequence()
    child = None
    try:
        logits = engine.evaluate([(seq, prompt)])[0]
        child = engine.fork(seq)
        assert child != seq
        assert engine.sequence_length(child) == engine.sequence_length(seq) == len(prompt)
        original = _greedy_continuation(engine, seq, logits.copy(), 8)
        forked = _greedy_continuation(engine, child, logits.copy(), 8)
        assert forked == original
        assert engine.sequence_length(child) == engine.sequence_length(seq) == len(prompt) + 7
        assert original == model.generate(prompt, temperature=0, max_tokens=8).tokens
    finally:
        engine.free(seq)
        if child is not None:
            engine.free(child)


def test_rewind_engine_sequence_and_reread(model: slm.Model, engine: LlamaCppEngine) -> None:
    prompt = model.tokenize(STORY)
    seq = engine.new_sequence()
    try:
        full = engine.evaluate([(seq, prompt)])[0]
        engine.rewind(seq, len(prompt) - 1)
        assert engine.sequence_length(seq) == len(prompt) - 1
        again = engine.evaluate([(seq, prompt[-1:])])[0]
        assert int(np.argmax(again)) == int(np.argmax(full))
        np.testing.assert_allclose(again, full, atol=1e-2)
    finally:
        engine.free(seq)


def _close_enough(batched: np.ndarray, alone: np.ndarray) -> None:
    np.testing.assert_allclose(batched, alone, atol=1e-2, rtol=0)
    top2 = np.sort(alone)[-2:]
    if top2[1] - top2[0] >= 1e-2:  # a near-tie may legitimately flip
        assert int(np.argmax(batched)) == int(np.argmax(alone))


def test_batched_evaluate_equals_each_sequence_alone(model: slm.Model, engine: LlamaCppEngine) -> None:
    prompts = [model.tokenize(p) for p in (PROMPT, STORY, "def add(a, b):\n    return")]
    assert len({len(p) for p in prompts}) == 3  # ragged on purpose
    seqs = [engine.new_sequence() for _ in prompts]
    try:
        batched = engine.evaluate(list(zip(seqs, prompts, strict=True)))
        assert batched.shape == (3, model.info.vocab_size)
        assert [engine.sequence_length(s) for s in seqs] == [len(p) for p in prompts]
        nexts = [[int(np.argmax(row))] for row in batched]
        batched_step = engine.evaluate(list(zip(seqs, nexts, strict=True)))  # one decode step for all three
        assert batched_step.shape == (3, model.info.vocab_size)

        for row, (prompt, nxt) in enumerate(zip(prompts, nexts, strict=True)):
            seq = engine.new_sequence()
            try:
                alone = engine.evaluate([(seq, prompt)])[0]
                _close_enough(batched[row], alone)
                alone_step = engine.evaluate([(seq, nxt)])[0]
                _close_enough(batched_step[row], alone_step)
            finally:
                engine.free(seq)
    finally:
        for s in seqs:
            engine.free(s)
