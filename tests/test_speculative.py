"""Speculative decoding (``slm.generation.speculative``): drafts by prompt lookup and by a draft model, checked
in one evaluation and kept by the rejection rule.

Greedy, the answer must be plain greedy decoding's, on every engine, alone and batched in the scheduler.
Sampled, it must have the model's distribution: the rule itself is checked exactly against fixed
distributions (a chi-square test over many draws, fixed seeds), and end to end on SmolLM2 by comparing the
tokens at a fixed position over many seeds with plain sampling's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import slm
from conftest import smollm2_engine
from serving import SERVE_ARGS, Server, assert_no_traceback, assert_same_up_to_near_ties
from slm.engines import Engine
from slm.engines.llamacpp import LlamaCppEngine
from slm.engines.onnx import OnnxGenAIEngine
from slm.errors import InvalidParameter
from slm.generation import GenerationParams
from slm.generation.generator import Generator
from slm.generation.sampling import build_sampler
from slm.generation.speculative import Draft, DraftModel, PromptLookup, Proposer, verify
from slm.generation.stream import TextStream
from slm.serving.scheduler import Scheduler
from vision_checks import run_together

DOCUMENT = (
    "Alice met Bob at the station on Monday. They took the 9:15 train to Cambridge, visited the library, "
    "walked through the botanical garden and had lunch at a small cafe near the river. In the afternoon "
    "they rented a punt, argued about who should steer, and ended up in the water twice."
)
COPY = [{"role": "user", "content": f"Repeat this text exactly:\n\n{DOCUMENT}"}]
FREE = [{"role": "user", "content": "Write a short poem about the sea."}]
GREEDY = GenerationParams(temperature=0, max_tokens=32)
Z_99 = 2.326
"""The standard normal's 0.99 quantile: the tests below reject at the 1% level, with fixed seeds."""


def chi_square_critical(df: int, z: float = Z_99) -> float:
    """The chi-square distribution's quantile at the normal quantile ``z`` (Wilson and Hilferty's cube-root
    approximation, within a fraction of a percent for df >= 2)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def fits(observed: np.ndarray, expected: np.ndarray) -> bool:
    """Pearson's goodness-of-fit test: could ``observed`` counts come from ``expected``?"""
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return statistic < chi_square_critical(len(observed) - 1)


def same_distribution(table: np.ndarray) -> bool:
    """Pearson's test of homogeneity of a (2, k) table of counts."""
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return statistic < chi_square_critical(table.shape[1] - 1)


def answer(engine: Engine, prompt: list[int], params: GenerationParams, proposer: Proposer | None = None
           ) -> tuple[list[int], Generator]:
    """The tokens of a generation to its end (the generator returned closed, its counts kept)."""
    with Generator(engine, params, proposer=proposer) as gen:
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        return gen.tokens[len(prompt) :], gen


@pytest.fixture(scope="module", params=["llamacpp", "transformers", "onnx"])
def any_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """SmolLM2 on each engine (ONNX Runtime GenAI: the float32 build; see the int4 test below)."""
    engine = smollm2_engine(request, request.param, n_ctx=1024, max_sequences=8)
    yield engine
    engine.close()


def chat_tokens(engine: Engine, messages: list[dict]) -> list[int]:
    return slm.Model("smollm2", engine).chat_tokens(messages)


def first_difference_is_a_near_tie(engine: Engine, prompt: list[int], got: list[int], plain: list[int],
                                   margin: float) -> bool:
    """Whether ``got`` equals ``plain`` (greedy) up to a near-tie: at the first token where they differ, the
    two tokens' logits after ``plain``'s prefix, read alone, are within ``margin`` (what the engine's batched
    and single readings of the same position may differ by: test_engines.py's TOLERANCE)."""
    if got == plain:
        return True
    at = next((i for i, (a, b) in enumerate(zip(got, plain, strict=False)) if a != b), None)
    if at is None:
        return False  # one is a prefix of the other: no tie explains that
    seq = engine.new_sequence()
    try:
        logits = engine.evaluate([(seq, prompt + plain[:at])])[0]
    finally:
        engine.free(seq)
    return abs(float(logits[plain[at]] - logits[got[at]])) < margin


# --- greedy: the answer is plain decoding's ------------------------------------------------------------


@pytest.mark.parametrize("lookup", [3, 10])
def test_greedy_lookup_is_plain_greedy_on_every_engine(any_engine: Engine, lookup: int) -> None:
    for messages in (COPY, FREE):
        prompt = chat_tokens(any_engine, messages)
        plain, _ = answer(any_engine, prompt, GREEDY)
        fast, gen = answer(any_engine, prompt, GREEDY, PromptLookup(lookup))
        assert fast == plain
        if messages is COPY:  # the answer copies the prompt: most of each draft is kept
            assert gen.speculation.accepted > 0.5 * len(fast) and gen.speculation.steps < 0.6 * len(fast)


def test_greedy_with_a_draft_model_is_plain_greedy_on_every_engine(any_engine: Engine, smollm2_path: Path) -> None:
    """The mechanics on each engine: SmolLM2 drafting for itself (Q4_1 on llama.cpp for the other engines'
    weights; the size check of ``load(draft=...)`` is not in the way of a proposer made by hand)."""
    drafter = LlamaCppEngine(smollm2_path, n_ctx=1024, max_sequences=2)
    try:
        for messages in (COPY, FREE):
            prompt = chat_tokens(any_engine, messages)
            plain, _ = answer(any_engine, prompt, GREEDY)
            fast, gen = answer(any_engine, prompt, GREEDY, DraftModel(drafter))
            assert fast == plain
            assert gen.speculation.accepted > 0  # the same model's draft is mostly right
        assert drafter._sequences.release_all() == []  # every draft sequence was freed  # type: ignore[attr-defined]
    finally:
        drafter.close()


def test_qwen_coder_half_b_drafts_for_one_and_a_half_b(qwen15_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair the issue names, loaded as a user would: greedy answers equal, drafts accepted."""
    monkeypatch.setenv("SLM_HOME", str(qwen15_path.parent.parent))
    code = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]
    with slm.load("qwen2.5-coder:1.5b", n_ctx=1024, draft="qwen2.5-coder:0.5b") as model:
        assert isinstance(model, slm.Model) and model.draft is not None
        fast = model.chat(code, temperature=0, max_tokens=40)
        plain = model.chat(code, temperature=0, max_tokens=40, speculative=False)
        assert fast.tokens == plain.tokens
        assert fast.timings.draft_tokens > 0 and fast.timings.draft_tokens_accepted > 0
        assert plain.timings.draft_tokens == 0


def test_int4_onnx_greedy_lookup_equals_plain_up_to_near_ties(smollm2_onnx_int4_path: Path) -> None:
    """ONNX Runtime GenAI's int4 kernels read a run of tokens and one token with different rounding (logits
    apart by up to 1.3 on SmolLM2), so where the two best tokens are that close a draft check may choose
    the other: the answers must agree up to the first such near-tie."""
    engine = OnnxGenAIEngine(smollm2_onnx_int4_path, n_ctx=1024, max_sequences=2)
    try:
        for messages in (COPY, FREE):
            prompt = chat_tokens(engine, messages)
            plain, _ = answer(engine, prompt, GREEDY)
            fast, _ = answer(engine, prompt, GREEDY, PromptLookup(8))
            assert first_difference_is_a_near_tie(engine, prompt, fast, plain, 1.5)
    finally:
        engine.close()


# --- sampled: the model's distribution ---------------------------------------------------------------


def draws(p: np.ndarray, draft: Callable[[np.random.Generator], Draft], n: int, seed: int) -> np.ndarray:
    """How often each token comes out of ``verify`` for the first draft position, over ``n`` draws, each with
    a draft of its own from ``draft(rng)``."""
    sampler = build_sampler(GenerationParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed), 0)
    rows = np.log(np.stack([p, p]))  # the same distribution after the draft token
    proposals = np.random.default_rng(seed + 1)
    counts = np.zeros(p.shape[0])
    for _ in range(n):
        token, _ = verify(sampler, [], rows.copy(), draft(proposals), 0)
        counts[token] += 1
    return counts


@pytest.mark.parametrize("proposed", [0, 3])
def test_a_kept_or_replaced_lookup_token_has_the_model_distribution(proposed: int) -> None:
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    counts = draws(p, lambda _: Draft([proposed]), 20_000, seed=1)
    assert fits(counts, p * counts.sum())


def test_a_draft_model_token_kept_or_replaced_has_the_model_distribution() -> None:
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.05, 0.1, 0.15, 0.2, 0.5])  # a draft that is wrong about everything
    counts = draws(p, lambda rng: Draft([int(rng.choice(5, p=q))], [(np.arange(5), q)]), 20_000, seed=7)
    assert fits(counts, p * counts.sum())
    # negative control: keeping every draft token would give q, which the test tells apart
    assert not fits(q * counts.sum(), p * counts.sum())


def test_sampled_lookup_keeps_the_distribution_of_plain_sampling(engine: LlamaCppEngine) -> None:
    """End to end on SmolLM2: the third generated token over 300 seeds (top-k 4, so few categories), plain
    and speculative (the copy prompt, so drafts are proposed and mostly kept): the same distribution by a
    chi-square test of homogeneity. Each run starts from a fork of the prompt's KV cache."""
    prompt = chat_tokens(engine, COPY)
    params = GenerationParams(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0, max_tokens=3)
    base = engine.new_sequence()
    engine.evaluate([(base, prompt[:-1])])

    def third(seed: int, proposer: Proposer | None) -> tuple[int, int]:
        with Generator(engine, params.replace(seed=seed), sequence=(engine.fork(base), prompt[:-1]),
                       proposer=proposer) as gen:
            gen.append_tokens(prompt[-1:])
            while not gen.is_done():
                gen.generate_next_token()
            return gen.tokens[len(prompt) + 2], gen.speculation.proposed

    plain, fast = Counter(), Counter()
    proposed = 0
    try:
        for seed in range(300):
            plain[third(seed, None)[0]] += 1
            token, drafted = third(10_000 + seed, PromptLookup(4, min_ngram=1))  # drafts from the first tokens on
            fast[token] += 1
            proposed += drafted
    finally:
        engine.free(base)
    assert proposed > 100  # drafts were checked on the way to the position counted
    keys = sorted(set(plain) | set(fast))
    table = np.array([[plain[k] for k in keys], [fast[k] for k in keys]])
    table = table[:, table.sum(axis=0) >= 10]  # chi-square needs no near-empty column
    assert table.shape[1] >= 2 and same_distribution(table)


# --- the rest of the loop ---------------------------------------------------------------------------


def test_a_stop_string_inside_a_step_ends_the_text_and_the_count_there(model: slm.Model) -> None:
    plain = model.chat(COPY, temperature=0, max_tokens=60, stop=["library"])
    fast = model.chat(COPY, temperature=0, max_tokens=60, stop=["library"], lookup=10)
    assert fast.text == plain.text and fast.text.endswith("visited the ")
    assert fast.usage.completion_tokens == plain.usage.completion_tokens
    assert fast.timings.draft_tokens > 0


def test_logprobs_and_max_tokens_are_plain_decodings(model: slm.Model) -> None:
    plain = model.chat(COPY, temperature=0, max_tokens=13, logprobs=True, top_logprobs=2)
    fast = model.chat(COPY, temperature=0, max_tokens=13, logprobs=True, top_logprobs=2, lookup=8)
    assert fast.tokens == plain.tokens and len(fast.tokens) == 13 and fast.finish_reason == "length"
    assert [lp.token for lp in fast.logprobs] == [lp.token for lp in plain.logprobs]
    for a, b in zip(fast.logprobs, plain.logprobs, strict=True):
        assert abs(a.logprob - b.logprob) < 0.05 and [t for t, _ in a.top] == [t for t, _ in b.top]


def test_a_grammar_holds_under_speculation(model: slm.Model) -> None:
    choices = ["Alice met Bob", "Bob met Alice"]
    plain = model.chat(COPY, temperature=0, max_tokens=20, choices=choices)
    fast = model.chat(COPY, temperature=0, max_tokens=20, choices=choices, lookup=8)
    assert fast.text == plain.text and fast.text in choices


def test_eight_requests_batched_in_the_scheduler_equal_each_alone(engine: LlamaCppEngine) -> None:
    """Up to near-ties: in a batch of other sequences' drafts, llama.cpp's logits of a position move by up to
    0.5 (seen: 0.125 apart at a flip on the poem), as they do in any batch, speculative or not."""
    prompts = [chat_tokens(engine, COPY), chat_tokens(engine, FREE)] * 4
    lookups = [GREEDY.replace(lookup=k) for k in (3, 5, 8, 10, 3, 5, 8, 10)]
    alone = [answer(engine, p, GREEDY)[0] for p in prompts[:2]] * 4
    scheduler = Scheduler(engine, max_running=8, max_batch_tokens=96, prefix_cache_bytes=0)
    try:
        got = run_together(scheduler, list(zip(prompts, lookups, strict=True)))
        assert scheduler.counters["draft_tokens_accepted"] > 0
    finally:
        scheduler.stop(timeout=60)
    for prompt, tokens, plain in zip(prompts, got, alone, strict=True):
        assert first_difference_is_a_near_tie(engine, prompt, tokens, plain, 0.5)
    assert got[0] == alone[0]  # the copy, drafted most, has no tie


def test_the_text_stream_of_a_speculative_step_is_one_chunk_per_token(model: slm.Model) -> None:
    chunks = list(model.chat_stream(COPY, temperature=0, max_tokens=30, lookup=8))
    assert len(chunks) == 30 and all(c.token is not None for c in chunks)
    assert "".join(c.text for c in chunks) == model.chat(COPY, temperature=0, max_tokens=30).text
    assert [c.finish_reason for c in chunks][-2:] == [None, "length"]


def test_text_stream_push_takes_back_what_follows_a_stop_inside_a_step(engine: LlamaCppEngine) -> None:
    prompt = chat_tokens(engine, COPY)
    params = GREEDY.replace(stop=("train",))
    with Generator(engine, params, proposer=PromptLookup(10)) as gen:
        text = TextStream(engine, params, len(prompt))
        gen.append_tokens(prompt)
        chunks = []
        while not gen.is_done():
            gen.generate_next_token()
            chunks += text.push(gen)
        assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == gen.generated == len(gen.tokens) - len(prompt)
        assert engine.sequence_length(gen.seq) <= len(gen.tokens)


# --- what is refused --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 33, 2.5, True])
def test_a_lookup_outside_its_range_is_refused_by_name(value: object) -> None:
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams(lookup=value)  # type: ignore[arg-type]
    assert caught.value.field == "lookup"


def test_a_draft_model_of_another_vocabulary_or_no_smaller_is_refused(qwen05_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_HOME", str(qwen05_path.parent.parent))
    with pytest.raises(InvalidParameter, match="vocabulary") as caught:
        slm.load("qwen2.5-coder:0.5b", n_ctx=512, draft="smollm2")
    assert caught.value.field == "draft"
    with pytest.raises(InvalidParameter, match="no fewer than the model's"):
        slm.load("qwen2.5-coder:0.5b", n_ctx=512, draft="qwen2.5-coder:0.5b")


# --- the command line and the server -------------------------------------------------------------------


def test_the_cli_drafts_with_lookup_and_says_so_and_refuses_bad_flags_in_one_line() -> None:
    from test_cli import GREEDY as CLI_GREEDY
    from test_cli import ok, show, slm_cmd

    ask = ["run", "smollm2", *CLI_GREEDY, "--max-tokens", "24", f"Repeat this text exactly:\n\n{DOCUMENT}"]
    plain = json.loads(ok(slm_cmd(*ask, "--json")).stdout)
    fast = json.loads(ok(slm_cmd(*ask, "--json", "--lookup", "8")).stdout)
    assert fast["text"] == plain["text"] and fast["timings"]["draft_tokens_accepted"] > 0
    verbose = ok(slm_cmd(*ask, "--lookup", "8", "-v"))
    assert "drafts:" in verbose.stderr and "tokens kept" in verbose.stderr
    for flags, field in ((["--lookup", "99"], "--lookup"), (["--draft", "smollm2"], "--draft")):
        bad = slm_cmd(*ask, *flags)
        assert bad.returncode == 2 and field in bad.stderr, show(bad)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr, show(bad)


def test_a_server_with_lookup_answers_as_without_and_counts_drafts(tmp_path_factory: pytest.TempPathFactory) -> None:
    import httpx
    from openai import OpenAI

    question = [{"role": "user", "content": f"Repeat this text exactly:\n\n{DOCUMENT}"}]
    answers = []
    for args in ((), ("--lookup", "8")):
        with Server(tmp_path_factory.mktemp("lookup"), "smollm2", *SERVE_ARGS, *args) as server:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
            reply = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=24)
            answers.append(reply.choices[0].message.content)
            metrics = httpx.get(f"{server.url}/metrics").text
            drafted = next(line for line in metrics.splitlines() if line.startswith("slm_draft_tokens_accepted_total"))
            assert (float(drafted.split()[-1]) > 0) == bool(args)
            beams = client.chat.completions.create(model="smollm2", messages=question, max_tokens=4, n=2,
                                                   extra_body={"use_beam_search": True, "best_of": 2})
            answers.append([c.message.content for c in beams.choices])  # beams do not draft: no lookup for them
    assert answers[0] == answers[2] and answers[1] == answers[3]


SERVED_PROMPTS = [
    COPY[0]["content"],
    "Correct the spelling and change nothing else: Evry morning the old fishermen walkd down to the harbour, "
    "chekced their nets and sailed out before the sun rose over the hills.",
    "Rewrite this list with one item per line, in the same order: apples, pears, plums, cherries, grapes, "
    "lemons, oranges, peaches, apricots.",
    "Add type hints to this Python function and change nothing else:\n\ndef area(width, height):\n"
    "    return width * height\n",
    FREE[0]["content"],
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for learning to cook.",
    "Explain to a child what a computer processor does.",
]
"""Eight requests for a server at once: four whose answers copy their prompt (lookup drafts are kept), four
free."""


@dataclass(frozen=True)
class Served:
    """SmolLM2 as ``slm serve`` runs it on one engine, and a model to draft for it."""

    model: str
    """A path whose format picks the engine."""
    draft: str
    noise: float
    """How far two runs' logits may move apart at a position where their greedy answers part (see
    ``assert_same_up_to_near_ties``)."""


@pytest.fixture(scope="module", params=["llamacpp", "transformers", "onnx"])
def served(request: pytest.FixtureRequest) -> Served:
    """The GGUF on llama.cpp, the Hugging Face folder on transformers, the float32 ONNX folder on ONNX Runtime
    GenAI (each engine's pick for its format). There is no smaller model of SmolLM2's vocabulary to draft, and
    ``check_draft_model`` compares sizes only where both engines know them (an ONNX folder does not record
    its size): so SmolLM2 drafts for itself from another format, the int4 ONNX build for llama.cpp and
    transformers, the GGUF for ONNX.

    llama.cpp's batched kernels sum in an order that depends on the batch, so a request in another batch may
    take the other side of a near-tie, with or without speculation. Measured at 20 tokens against one plain
    run: three more plain runs answered up to three of these eight prompts otherwise, eight speculative runs
    up to four, each parting where the two runs' logits were 0.04-0.71 apart. The float32 engines read a
    position the same in any batch within 1e-3 (test_engines.py's TOLERANCE)."""
    int4 = str(request.getfixturevalue("smollm2_onnx_int4_path"))
    gguf = str(request.getfixturevalue("smollm2_path"))
    if request.param == "llamacpp":
        return Served(gguf, int4, noise=1.0)
    if request.param == "transformers":
        return Served(str(request.getfixturevalue("smollm2_hf_path")), int4, noise=2e-3)
    return Served(str(request.getfixturevalue("smollm2_onnx_fp32_path")), gguf, noise=2e-3)


def ask_at_once(server: Server) -> list[Any]:
    """The greedy answers (choices with their top logprobs) to ``SERVED_PROMPTS``, all eight sent at once
    through the OpenAI SDK."""
    from openai import OpenAI

    (model,) = server.models()
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)

    def ask(prompt: str) -> Any:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=16, logprobs=True, top_logprobs=5
                                              ).choices[0]

    with ThreadPoolExecutor(len(SERVED_PROMPTS)) as pool:
        return list(pool.map(ask, SERVED_PROMPTS))


def serve_at_once(workdir: Path, model: str, *flags: str) -> tuple[list[Any], float]:
    """``ask_at_once`` a server of ``model`` with ``flags`` that runs all eight requests together; the answers,
    and how many drafted tokens it kept (``/metrics``)."""
    with Server(workdir, model, *SERVE_ARGS, "--parallel", str(len(SERVED_PROMPTS)), *flags) as server:
        answers = ask_at_once(server)
        ((name, stats),) = server.models().items()
        kept = server.metric(f'slm_draft_tokens_accepted_total{{model="{name}"}}')
        assert_no_traceback(server)
    assert stats["steps"] < stats["generated_tokens"] / 2  # the requests really shared engine steps
    return answers, kept


@pytest.fixture(scope="module")
def plain_served(served: Served, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The answers of a server of ``served.model`` without speculation."""
    answers, kept = serve_at_once(tmp_path_factory.mktemp("plain"), served.model)
    assert kept == 0
    return answers


@pytest.mark.parametrize("speculation", ["lookup", "draft"])
def test_eight_greedy_requests_at_once_to_a_speculative_server_answer_as_a_plain_one_on_every_engine(
        served: Served, plain_served: list[Any], speculation: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``slm serve --lookup 8`` and ``slm serve --draft MODEL``, eight greedy requests at once in the
    scheduler's batches: every answer is the plain server's (up to llama.cpp's near-ties; the copy, drafted
    most, has none), and drafts were kept."""
    flags = ["--lookup", "8"] if speculation == "lookup" else ["--draft", served.draft]
    answers, kept = serve_at_once(tmp_path_factory.mktemp(speculation), served.model, *flags)
    assert kept > 0
    assert answers[0].message.content == plain_served[0].message.content
    for prompt, plain, fast in zip(SERVED_PROMPTS, plain_served, answers, strict=True):
        assert_same_up_to_near_ties(prompt[:40], plain, fast, served.noise)
