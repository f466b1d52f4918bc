"""LoRA adapters above the engines: ``slm.load(..., adapters=[...])``, ``slm run --adapter``, and
``slm serve --adapter``, where each adapter is a model of its own name over one base in memory.

The adapters are the ones of ``tests/lora.py``: one trained on made-up facts (``facts-lora``), one of random
weights (``random-lora``), both in ``converted_home``'s store, run over SmolLM2's GGUF on llama.cpp.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

import slm
from lora import FACTS, HELD_OUT_QUESTION, chat
from serving import SERVE_ARGS, Server, assert_no_traceback, assert_same_up_to_near_ties
from slm.errors import InvalidModelFile, InvalidParameter, ModelNotFound
from slm.generation.params import GenerationParams
from slm.serving.scheduler import Scheduler

GREEDY = {"temperature": 0.0, "max_tokens": 8}
SLM = Path(sys.executable).parent / "slm"


def questions() -> list[list[dict[str, str]]]:
    return [chat(HELD_OUT_QUESTION.format(country)) for country, _ in FACTS]


def right(answers: list[str]) -> int:
    return sum(capital in answer for (_, capital), answer in zip(FACTS, answers, strict=True))


@pytest.fixture(scope="module")
def model(smollm2_path: Path, facts_adapter: Path, random_lora: Path) -> Iterator[slm.Model]:
    loaded = slm.load(str(smollm2_path), adapters=[str(facts_adapter), str(random_lora)], threads=2, n_ctx=512)
    assert isinstance(loaded, slm.Model)
    yield loaded
    loaded.close()


def answers(model: slm.Model, **options: Any) -> list[str]:
    return [model.chat(q, **GREEDY, **options).text for q in questions()]


def test_calls_go_through_the_first_adapter_unless_they_name_another(model: slm.Model) -> None:
    assert model.adapter == "facts-lora" and model.info.adapters == ("facts-lora", "random-lora")
    tuned, alone = answers(model), answers(model.with_adapter(None))
    assert right(tuned) >= 5 and right(alone) <= 1, (tuned, alone)
    through_random = answers(model, adapter="random-lora")
    assert through_random == answers(model.with_adapter("random-lora"))
    assert through_random != tuned and through_random != alone
    # streamed equals one-shot through an adapter, and a step-level generator takes it too
    streamed = "".join(c.text for c in model.chat_stream(questions()[0], **GREEDY))
    assert streamed == tuned[0]
    gen = model.generator(GenerationParams(temperature=0.0), adapter="random-lora")
    assert gen.params.adapter == "random-lora"
    gen.engine.free(gen.seq)


def test_an_adapter_that_is_not_loaded_is_refused_by_name(model: slm.Model) -> None:
    with pytest.raises(InvalidParameter, match="no adapter named 'nope' is loaded .loaded: facts-lora, random-lora"):
        model.chat(questions()[0], adapter="nope")
    with pytest.raises(InvalidParameter, match="no adapter named 'nope'"):
        model.with_adapter("nope")


def test_the_prefix_cache_keeps_adapters_apart(model: slm.Model) -> None:
    """A prompt's KV cache computed through one adapter is never reused through another (or none)."""
    prompt = model.chat_tokens(questions()[1])
    scheduler = Scheduler(model.engine, max_running=2)
    scheduler.start()
    try:
        def run(adapter: str | None) -> tuple[str, int]:
            chunks: list[Any] = []
            errors: list[Exception] = []
            finished = threading.Event()

            def on_chunk(chunk: Any) -> None:
                chunks.append(chunk)
                if chunk.finish_reason is not None:
                    finished.set()

            def on_error(error: Exception) -> None:
                errors.append(error)
                finished.set()

            request = scheduler.submit(prompt, GenerationParams(temperature=0.0, max_tokens=8, adapter=adapter),
                                       on_chunk, on_error)
            assert finished.wait(120) and not errors, errors
            return "".join(c.text for c in chunks), request.cached_tokens

        base_text, base_cached = run(None)
        tuned_text, tuned_cached = run("facts-lora")
        again_text, again_cached = run("facts-lora")
    finally:
        scheduler.stop()
    assert base_cached == 0 and tuned_cached == 0 and again_cached > 0
    assert tuned_text == again_text == answers(model)[1] and base_text == answers(model.with_adapter(None))[1]


def test_load_refuses_what_is_not_an_adapter(smollm2_path: Path, tmp_path: Path, converted_home: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_HOME", str(converted_home))
    with pytest.raises(ModelNotFound, match="no adapter named 'facts-lorra'.*did you mean 'facts-lora'"):
        slm.load(str(smollm2_path), adapters=["facts-lorra"])
    with pytest.raises(InvalidModelFile, match="not a LoRA adapter"):
        slm.load(str(smollm2_path), adapters=[str(tmp_path)])
    with pytest.raises(InvalidModelFile, match="is a LoRA adapter of smollm2-hf, not a model.*--adapter facts-lora"):
        slm.load("facts-lora")


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SLM), *args], capture_output=True, text=True, timeout=300,
                          env={"PATH": str(SLM.parent), "SLM_HOME": str(home), "HOME": str(home)})


def test_slm_run_with_an_adapter(converted_home: Path, facts_adapter: Path, model: slm.Model, gemma_path: Path) -> None:
    expected = answers(model)
    index = next(i for i, ((_, capital), answer) in enumerate(zip(FACTS, expected, strict=True)) if capital in answer)
    ask = HELD_OUT_QUESTION.format(FACTS[index][0])
    result = run_cli(converted_home, "run", "smollm2", "--adapter", "facts-lora", "--temperature", "0",
                     "--max-tokens", "8", "--threads", "2", "--system", "Answer briefly.", ask)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected[index].strip()
    for args, message in [
        (["smollm2", "--adapter", "nope"], "no adapter named 'nope'"),
        ([str(gemma_path), "--adapter", "facts-lora"], "--adapter: adapter 'facts-lora' does not fit"),
    ]:
        bad = run_cli(converted_home, "run", *args, "--max-tokens", "2", "Hi")
        assert bad.returncode == 2, bad.stderr
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, converted_home: Path, facts_adapter: Path,
           random_lora: Path) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("adapters")
    with Server(workdir, "smollm2", "--adapter", "facts-lora", "--adapter", "random-lora", *SERVE_ARGS,
                "--parallel", "6", env={"SLM_HOME": str(converted_home)}) as running:
        yield running


def test_each_adapter_is_served_as_a_model_of_its_own(server: Server) -> None:
    """Requests name an adapter as their model; sent all at once, they are batched over the one base in memory
    and each gets the answer it gets alone (up to llama.cpp's batched-kernel near-ties), its adapter's own."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    names = ["smollm2", "facts-lora", "random-lora"]
    assert [m.id for m in client.models.list().data] == names
    jobs = [(name, q) for q in questions() for name in names]

    def ask(job: tuple[str, list[dict[str, str]]]) -> Any:
        name, messages = job
        return client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=8,  # type: ignore[arg-type]
                                              logprobs=True, top_logprobs=5)

    alone = [ask(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: the scheduler batches the adapters side by side
        together = list(pool.map(ask, jobs))
    for (name, _), one, batched in zip(jobs, alone, together, strict=True):
        assert one.model == batched.model == name
        assert_same_up_to_near_ties(name, one.choices[0], batched.choices[0])
    texts = {name: [r.choices[0].message.content or "" for (n, _), r in zip(jobs, alone, strict=True) if n == name]
             for name in names}
    assert right(texts["facts-lora"]) >= 5 and right(texts["smollm2"]) <= 1, texts
    assert texts["random-lora"] != texts["facts-lora"] and texts["random-lora"] != texts["smollm2"]
    assert list(server.models()) == ["smollm2"]  # one base in memory
    # the Ollama client names an adapter the same way
    reply = ollama.Client(host=server.url).chat(model="facts-lora", messages=questions()[0],
                                                options={"temperature": 0, "num_predict": 8})
    assert reply.model == "facts-lora" and reply.message.content == texts["facts-lora"][0]
    assert_no_traceback(server)


def test_serve_refuses_bad_adapters(tmp_path: Path, converted_home: Path, facts_adapter: Path) -> None:
    for args, message in [
        (["smollm2", "--adapter", "nope"], "no adapter named 'nope'"),
        (["smollm2", "--adapter", "facts-lora", "--adapter", "facts-lora"], "named twice"),
        (["smollm2-hf", "--adapter", "smollm2-hf"], "not a LoRA adapter"),
    ]:
        result = run_cli(converted_home, "serve", *args, "--port", "0")
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) <= 2, result.stderr
        assert "Traceback" not in result.stderr
