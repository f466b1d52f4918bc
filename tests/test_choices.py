"""Several answers to one prompt (``n``) from the Python API and the CLI: the prompt is read once and forked,
the answers are decoded side by side, each with its own seed, parser and drafts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import slm
from conftest import smollm2_engine
from slm.engines import Engine
from test_cli import ok, show, slm_cmd

ASK = [{"role": "user", "content": "Name a colour."}]
SAMPLED: dict[str, Any] = {"temperature": 1.0, "seed": 7, "max_tokens": 10}


@pytest.fixture(scope="module", params=["llamacpp", "transformers", "onnx"])
def model(request: pytest.FixtureRequest) -> Iterator[slm.Model]:
    """SmolLM2 on each engine, with room for four sequences."""
    with slm.Model("smollm2", smollm2_engine(request, request.param, n_ctx=512, max_sequences=4)) as m:
        yield m


class Counted:
    """The engine's own ``evaluate``, with the tokens of every call counted."""

    def __init__(self, engine: Engine) -> None:
        self.evaluate = engine.evaluate
        self.tokens = 0

    def __call__(self, work: list[tuple[int, list[int]]], keep: list[int] | None = None) -> np.ndarray:
        self.tokens += sum(len(tokens) for _, tokens in work)
        return self.evaluate(work, keep=keep)


def test_four_answers_read_the_prompt_once(model: slm.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted at the engine: the prompt once (all but its last token), then each answer its last token and
    every token it generated but the last. ONNX Runtime GenAI cannot copy a KV cache, so its fork computes the
    prompt again inside the engine (``fork_recomputes``): it reads the prompt once through ``evaluate`` too."""
    prompt = model.chat_tokens(ASK)
    counted = Counted(model.engine)
    monkeypatch.setattr(model.engine, "evaluate", counted)
    reply = model.chat(ASK, n=4, **SAMPLED)
    assert isinstance(reply, slm.Choices) and len(reply.choices) == 4
    answers = reply.choices
    assert counted.tokens == len(prompt) + 3 + sum(len(a.tokens) - 1 for a in answers)
    assert len({a.text for a in answers}) > 1, "each answer samples with a seed of its own"
    assert reply.text == answers[0].text and reply.finish_reason == answers[0].finish_reason
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in answers)
    assert all(a.usage.completion_tokens == len(a.tokens) and a.finish_reason in ("stop", "length") for a in answers)


def test_the_answers_are_reproducible_and_the_last_is_the_lone_answer_with_its_seed(model: slm.Model) -> None:
    """Answer ``j`` samples with seed + j. Batched rows may differ from a lone row in the last bits (near-ties
    can then part), so the same call is compared with itself, and a lone call with a one-answer call."""
    first = model.chat(ASK, n=3, **SAMPLED)
    again = model.chat(ASK, n=3, **SAMPLED)
    assert [a.tokens for a in first.choices] == [a.tokens for a in again.choices]
    one = model.chat(ASK, n=1, **SAMPLED)
    assert not isinstance(one, slm.Choices) and one.tokens == model.chat(ASK, **SAMPLED).tokens


def test_each_answer_is_held_to_the_schema_and_parsed(model: slm.Model) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"],
              "additionalProperties": False}
    reply = model.chat(ASK, n=2, response_format={"type": "json_schema", "json_schema": {"schema": schema}},
                       temperature=1.0, seed=3, max_tokens=40)
    for answer in reply.choices:
        assert answer.finish_reason == "stop", answer.text
        assert answer.parsed == json.loads(answer.text) and set(answer.parsed) == {"colour"}


def test_n_with_lookup_decodes_speculatively(model: slm.Model) -> None:
    document = "The quick brown fox jumps over the lazy dog near the river bank every morning at dawn."
    ask = [{"role": "user", "content": f"Repeat this text exactly:\n\n{document}"}]
    reply = model.chat(ask, n=2, temperature=0, max_tokens=20, lookup=8)
    plain = model.chat(ask, temperature=0, max_tokens=20)
    assert sum(a.timings.draft_tokens_accepted for a in reply.choices) > 0
    for answer in reply.choices:  # greedy: each is plain greedy's answer (here no near-tie parts them)
        assert answer.text == plain.text


def test_with_beams_n_is_the_number_of_best_beams(model: slm.Model) -> None:
    reply = model.generate("The capital of France is", n=2, num_beams=3, max_tokens=6)
    assert isinstance(reply, slm.BeamCompletion) and len(reply.beams) == 2
    assert reply.beams == model.generate("The capital of France is", num_beams=3, num_return_sequences=2,
                                         max_tokens=6).beams


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m.chat(ASK, n=0), "n: must be an integer >= 1, got 0"),
    (lambda m: m.chat(ASK, n="2"), "n: must be an integer >= 1, got '2'"),
    (lambda m: m.chat(ASK, n=5), "n: 5 answers need 5 sequences; this engine holds 4"),
    (lambda m: list(m.chat_stream(ASK, n=2)), "n: a stream carries one answer"),
])
def test_a_bad_n_is_refused_by_name(model: slm.Model, call: Any, message: str) -> None:
    with pytest.raises(slm.InvalidParameter, match=message.replace("(", r"\(")) as caught:
        call(model)
    assert caught.value.field == "n"


def test_the_cli_prints_n_numbered_answers_and_a_json_list() -> None:
    ask = ("run", "-n", "3", "--temperature", "1", "--seed", "5", "--max-tokens", "8", "Name a colour.")
    printed = ok(slm_cmd(*ask)).stdout
    assert [line.split(" ")[0] for line in printed.splitlines() if line.startswith("#")] == ["#1", "#2", "#3"]
    data = json.loads(ok(slm_cmd(*ask, "--json")).stdout)
    assert len(data["choices"]) == 3 and data["text"] == data["choices"][0]["text"]
    assert data["usage"]["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in data["choices"])
    for choice in data["choices"]:  # the printed answers are the JSON ones (the same seeds)
        assert choice["text"] in printed
    beams = json.loads(ok(slm_cmd("run", "--raw", "-n", "2", "--beams", "3", "--max-tokens", "6", "--json",
                                  "The capital of France is")).stdout)
    assert len(beams["beams"]) == 2
    for flags, says in ((["-n", "0"], "-n: must be at least 1"), (["-n", "4", "--beams", "3"], "-n: must be at most")):
        bad = slm_cmd("run", *flags, "--max-tokens", "4", "Hi")
        assert bad.returncode == 2 and says in bad.stderr, show(bad)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr, show(bad)
