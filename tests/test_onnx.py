"""Batching on ONNX Runtime GenAI (engines/onnx): sequences read in one call become the rows of one batched
Generator and decode a token each a step; every row's logits are the logits of that sequence alone, whatever
joins, leaves, forks, rewinds or drafts around it, and the rows allocated never exceed ``max_sequences``.
On SmolLM2 built to float32 and int4 by `slm convert --to onnx`.

A batched row equals its sequence alone up to float rounding when both took the same path (a read, then single
tokens; measured: 0 with three rows, up to 3e-5 with four on float32). A sequence read again (after a fork,
or after leaving its group) reads at once what it had decoded a token at a time: float32 keeps that within
1e-3."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import slm
from slm.engines.onnx import READ_POSITIONS, OnnxGenAIEngine, packs
from slm.generation import GenerationParams
from slm.serving.scheduler import Scheduler

TEXTS = ["The capital of France is", "Once upon a time there", "def f(x):\n    return x + 1",
         "Water boils at a temperature of"]
BATCHED = 1e-4
"""A row of a batch against its sequence alone, on the same path."""
REREAD = 1e-3
"""float32: a sequence read at once against the same tokens decoded one at a time."""


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert np.abs(a - b).max() <= BATCHED


@pytest.fixture(scope="module")
def engine(smollm2_onnx_fp32_path: Path) -> Iterator[OnnxGenAIEngine]:
    made = OnnxGenAIEngine(smollm2_onnx_fp32_path, n_ctx=512, max_sequences=6)
    yield made
    made.close()


def alone(engine: OnnxGenAIEngine, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """The logits after ``prompt`` and after each of ``tokens``, its sequence the only one open."""
    seq = engine.new_sequence()
    try:
        out = [engine.evaluate([(seq, prompt)])[0]]
        out += [engine.evaluate([(seq, [t])])[0] for t in tokens]
        return out
    finally:
        engine.free(seq)


def read_at_once(engine: OnnxGenAIEngine, tokens: list[int], keep: int = 1) -> np.ndarray:
    """The logits after the last ``keep`` of ``tokens``, read in one run of a new sequence: (keep, V)."""
    seq = engine.new_sequence()
    try:
        return engine.evaluate([(seq, tokens)], keep=[keep])
    finally:
        engine.free(seq)


def groups(engine: OnnxGenAIEngine) -> list[int]:
    """The live rows of each of the engine's batched Generators (white box: whether it batched at all)."""
    return sorted(len(g.live()) for g in engine._groups)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_sequences_read_together_decode_in_one_batch_as_each_alone(
        precision: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"smollm2_onnx_{precision}_path")
    engine = OnnxGenAIEngine(path, n_ctx=512, max_sequences=4)
    try:
        prompts = [engine.tokenize(t) for t in TEXTS[:3]]
        assert len({len(p) for p in prompts}) > 1  # padded on the right to the longest
        steps = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]]
        expected = [alone(engine, p, s) for p, s in zip(prompts, steps, strict=True)]
        seqs = [engine.new_sequence() for _ in prompts]
        rows = engine.evaluate(list(zip(seqs, prompts, strict=True)))
        assert groups(engine) == [3]
        same(rows, np.stack([e[0] for e in expected]))
        for k in range(4):
            rows = engine.evaluate([(seq, [s[k]]) for seq, s in zip(seqs, steps, strict=True)])
            same(rows, np.stack([e[k + 1] for e in expected]))
        assert groups(engine) == [3] and engine._rows() == 3
        assert [engine.sequence_length(s) for s in seqs] == [len(p) + 4 for p in prompts]
        for seq in seqs:
            engine.free(seq)
        assert engine._groups == [] and engine._rows() == 0
    finally:
        engine.close()


def test_each_way_of_leaving_a_group_keeps_every_sequence_s_logits(
        engine: OnnxGenAIEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freed (its row idles), left out of a step, an end token, a draft (several tokens), a rewind: the others
    step on as alone, and the one that left is read again at its next evaluation."""
    monkeypatch.setattr(engine, "_read_seconds", math.inf)  # idle rows never outweigh a read: no timing here
    prompts = [engine.tokenize(t) for t in TEXTS]
    steps = [[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44]]
    expected = [alone(engine, p, s) for p, s in zip(prompts, steps, strict=True)]
    end = next(iter(engine._ends))
    a, b, c, d = seqs = [engine.new_sequence() for _ in prompts]
    try:
        engine.evaluate(list(zip(seqs, prompts, strict=True)))
        assert groups(engine) == [4]
        engine.free(a)  # its row idles
        rows = engine.evaluate([(b, [21]), (c, [31])])  # d left out: it leaves
        same(rows, np.stack([expected[1][1], expected[2][1]]))
        assert groups(engine) == [2] and engine._sequences[d].group is None
        rows = engine.evaluate([(b, [22]), (c, [end])])  # an end token: c leaves and is read alone
        same(rows[0], expected[1][2])
        assert np.abs(rows[1] - read_at_once(engine, prompts[2] + [31, end])[0]).max() < REREAD
        rows = engine.evaluate([(b, [23]), (c, [32, 33]), (d, [41])], keep=[1, 2, 1])
        same(rows[0], expected[1][3])  # b steps alone in its group of four
        assert groups(engine) == [1] and engine._rows() == 6
        assert np.abs(rows[1:3] - read_at_once(engine, prompts[2] + [31, end, 32, 33], keep=2)).max() < REREAD
        assert np.abs(rows[3] - expected[3][1]).max() < REREAD  # d read again
        engine.rewind(b, len(prompts[1]) + 1)  # b leaves: its group is dropped
        assert engine._groups == []
        rows = engine.evaluate([(b, [22]), (d, [42])])
        assert np.abs(rows - np.stack([expected[1][2], expected[3][2]])).max() < REREAD
    finally:
        for seq in seqs[1:]:
            engine.free(seq)
    assert engine._groups == [] and engine._rows() == 0


def test_forks_and_restores_are_read_together_at_their_next_evaluation(engine: OnnxGenAIEngine) -> None:
    prompt = engine.tokenize(TEXTS[0])
    head, last = prompt[:-1], prompt[-1]
    expected = alone(engine, prompt, [7])
    parent = engine.new_sequence()
    engine.evaluate([(parent, head)])
    children = [engine.fork(parent), engine.fork(parent), engine.restore(engine.save(parent))]
    try:
        assert [engine.sequence_length(s) for s in children] == [len(head)] * 3
        assert engine._rows() == 1  # nothing computed for them yet
        rows = engine.evaluate([(s, [last]) for s in [parent, *children]])
        assert groups(engine) == [3]  # the parent steps with its own Generator
        same(rows[0], expected[0])
        assert np.abs(rows[1:] - expected[0]).max() < REREAD
        rows = engine.evaluate([(s, [7]) for s in [parent, *children]])
        assert np.abs(rows - expected[1]).max() < REREAD
    finally:
        for seq in [parent, *children]:
            engine.free(seq)


def test_groups_with_idle_rows_are_taken_apart_to_make_room(engine: OnnxGenAIEngine) -> None:
    """Four read together, three freed, three more read: the four rows and three new ones would pass
    ``max_sequences`` (6), so the group is taken apart and its last sequence is read again when it next runs."""
    prompts = [engine.tokenize(t) for t in TEXTS]
    old = [engine.new_sequence() for _ in prompts]
    engine.evaluate(list(zip(old, prompts, strict=True)))
    for seq in old[1:]:
        engine.free(seq)
    new = [engine.new_sequence() for _ in prompts[1:]]
    try:
        engine.evaluate(list(zip(new, prompts[1:], strict=True)))
        assert groups(engine) == [3] and engine._rows() == 3
        assert engine._sequences[old[0]].group is None
        rows = engine.evaluate([(old[0], [5]), *((s, [5]) for s in new)])
        assert np.abs(rows[0] - read_at_once(engine, prompts[0] + [5])[0]).max() < REREAD
        assert engine._rows() == 4
    finally:
        for seq in [old[0], *new]:
            engine.free(seq)


@pytest.mark.parametrize("worth_it", [False, True])
def test_a_group_of_idle_rows_is_taken_apart_once_they_cost_what_reading_the_others_again_would(
        engine: OnnxGenAIEngine, monkeypatch: pytest.MonkeyPatch, worth_it: bool) -> None:
    """The cost of a read is the engine's own measure (seconds over positions, of every read so far); here made
    infinite, then nothing: the group goes on with its idle rows, or is taken apart after its first step."""
    monkeypatch.setattr(engine, "_read_seconds", 0.0 if worth_it else math.inf)
    monkeypatch.setattr(engine, "_read_positions", math.inf if worth_it else 1.0)
    prompts = [engine.tokenize(t) for t in TEXTS]
    seqs = [engine.new_sequence() for _ in prompts]
    engine.evaluate(list(zip(seqs, prompts, strict=True)))
    for seq in seqs[2:]:
        engine.free(seq)
    first, second = seqs[:2]
    try:
        engine.evaluate([(first, [100]), (second, [100])])
        assert groups(engine) == ([] if worth_it else [2])
        assert engine._rows() == (0 if worth_it else 4)
        # Read again, together, at the next step (or on in the same group), and on as before.
        rows = engine.evaluate([(first, [9]), (second, [9])])
        assert groups(engine) == [2]
        for seq, row in zip((first, second), rows, strict=True):
            held = engine._sequences[seq].tokens
            assert np.abs(row - read_at_once(engine, held)[0]).max() < REREAD
    finally:
        engine.free(first)
        engine.free(second)


def test_a_sequence_ending_in_the_pad_token_is_read_alone(engine: OnnxGenAIEngine) -> None:
    """A batched read takes trailing pad tokens for padding (the pad token is SmolLM2's end of turn)."""
    pad = engine._pad
    prompts = [engine.tokenize(TEXTS[0]) + [pad], engine.tokenize(TEXTS[1])]
    seqs = [engine.new_sequence() for _ in prompts]
    try:
        rows = engine.evaluate(list(zip(seqs, prompts, strict=True)))
        assert engine._sequences[seqs[0]].generator is not None
        for row, prompt in zip(rows, prompts, strict=True):
            same(row, read_at_once(engine, prompt)[0])
    finally:
        for seq in seqs:
            engine.free(seq)


def test_whatever_opens_frees_steps_forks_and_drafts_every_logit_is_its_sequence_s_own(
        engine: OnnxGenAIEngine) -> None:
    """Random work against each sequence read at once (in the one sequence left free), and never more rows than
    ``max_sequences``."""
    rng = random.Random(15)
    OPEN = engine.max_sequences - 1  # noqa: N806
    held: dict[int, list[int]] = {}
    try:
        for _ in range(40):
            op = rng.random()
            if op < 0.25 and len(held) < OPEN:
                for _ in range(rng.randint(1, OPEN - len(held))):
                    held[engine.new_sequence()] = []
            elif op < 0.35 and held:
                seq = rng.choice(sorted(held))
                engine.free(seq)
                del held[seq]
            elif op < 0.45 and held and len(held) < OPEN:
                parent = rng.choice([s for s in sorted(held) if held[s]] or [None])
                if parent is not None:
                    held[engine.fork(parent)] = list(held[parent])
            elif op < 0.5 and held:
                seq = rng.choice(sorted(held))
                length = rng.randint(0, len(held[seq]))
                engine.rewind(seq, length)
                del held[seq][length:]
            elif held:
                work = []
                for seq in sorted(held):
                    if rng.random() < 0.85:
                        count = rng.randint(3, 12) if not held[seq] else rng.choice([1, 1, 1, 1, 2, 3])
                        work.append((seq, [rng.randrange(100, 5000) for _ in range(count)]))
                if not work:
                    continue
                keep = [rng.randint(1, len(tokens)) for _, tokens in work]
                rows = engine.evaluate(work, keep=keep)
                first = 0
                for (seq, tokens), k in zip(work, keep, strict=True):
                    held[seq] += tokens
                    assert np.abs(rows[first : first + k] - read_at_once(engine, held[seq], k)).max() < REREAD
                    first += k
            assert engine._rows() <= engine.max_sequences
            assert all(engine.sequence_length(s) == len(t) for s, t in held.items())
    finally:
        for seq in held:
            engine.free(seq)
    assert engine._rows() == 0


def test_packs_keep_padding_and_positions_bounded() -> None:
    assert packs([130, 131, 129, 132], 8) == [[3, 1, 0, 2]]  # longest first, padding of a few tokens
    assert packs([5, 5, 11], 8) == [[2, 0, 1]]  # short prompts: a few positions a row
    assert packs([500, 50], 8) == [[0], [1]]  # ten times the tokens: each alone
    assert packs([300] * 6, 4) == [[0, 1, 2, 3], [4, 5]]  # at most the limit a group
    long = READ_POSITIONS // 3
    assert packs([long] * 4, 8) == [[0, 1, 2], [3]]


def test_the_scheduler_batches_on_the_onnx_engine(smollm2_onnx_int4_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests through the scheduler on the int4 build: the same greedy tokens as each alone, decoded
    in one batched Generator. (A sequence read again would read at once what it decoded a token at a time,
    which int4 computes differently enough to flip a near tie: so no group is taken apart here.)"""
    model = slm.load(str(smollm2_onnx_int4_path), max_sequences=4, n_ctx=512)
    engine = model.engine
    assert isinstance(engine, OnnxGenAIEngine)
    monkeypatch.setattr(engine, "_read_seconds", math.inf)
    params = GenerationParams(temperature=0, max_tokens=12)
    prompts = [model.tokenize(t) for t in TEXTS[:3]]
    try:
        expected = [model.generate(p, params).tokens for p in prompts]
        scheduler = Scheduler(engine, max_running=4)
        got: list[list[int]] = [[] for _ in prompts]
        for i, prompt in enumerate(prompts):
            scheduler.submit(prompt, params, lambda c, i=i: got[i].append(c.token) if c.token is not None else None,
                             lambda e: None)
        widest = 0
        while scheduler.step():
            widest = max([widest, *groups(engine)])
        scheduler.stop()
        assert got == expected
        assert widest == 3
    finally:
        model.close()
