"""The Python API end to end: chat, streaming, stop strings, limits, usage, and the errors a user can cause."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

import slm
from slm.errors import ContextOverflow, InvalidModelFile, InvalidParameter, ModelNotFound

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
STORY = "Once upon a time"
FACT = "The capital of France is"


@pytest.fixture(scope="module")
def chat_answer(model: slm.Model) -> slm.Completion:
    """One greedy chat turn, shared by the tests that look at it."""
    return model.chat(QUESTION, temperature=0, max_tokens=200)


@pytest.fixture(scope="module")
def small_model(smollm2_path: Path) -> Iterator[slm.Model]:
    """SmolLM2 in a 256-token context, to overflow cheaply."""
    with slm.load(str(smollm2_path), n_ctx=256, max_sequences=1) as m:
        yield m


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[slm.Model]:
    with slm.load(str(gemma_path), n_ctx=1024) as m:
        yield m


# --- chat ---------------------------------------------------------------------------------------


def test_chat_stops_on_end_of_turn(model: slm.Model, chat_answer: slm.Completion) -> None:
    assert chat_answer.finish_reason == "stop"
    assert len(chat_answer.tokens) < 200
    assert chat_answer.tokens[-1] in model.info.special.end_of_generation
    assert chat_answer.text.strip()
    assert "4" in chat_answer.text
    assert "<|im_end|>" not in chat_answer.text
    assert "<|im_start|>" not in chat_answer.text
    # The text is exactly the tokens before the end-of-turn token.
    assert chat_answer.text == model.detokenize(chat_answer.tokens[:-1])


def test_chat_usage(model: slm.Model, chat_answer: slm.Completion) -> None:
    usage = chat_answer.usage
    assert usage.prompt_tokens == len(model.chat_tokens(QUESTION))
    assert usage.completion_tokens == len(chat_answer.tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_tokens_are_the_rendered_template(model: slm.Model) -> None:
    text = model.apply_chat_template(QUESTION)
    assert text.endswith("<|im_start|>assistant\n")
    ids = model.chat_tokens(QUESTION)
    assert ids == model.tokenize(text, add_special=False)
    assert ids.count(model.tokenize("<|im_start|>", add_special=False)[0]) == 3  # system, user, assistant


def test_timings_are_positive(model: slm.Model) -> None:
    out = model.generate(STORY, temperature=0, max_tokens=8)
    assert out.finish_reason == "length"
    t = out.timings
    assert t.time_to_first_token > 0
    assert t.decode_seconds > 0
    assert t.prompt_tokens_per_second > 0
    assert t.decode_tokens_per_second > 0
    assert t.decode_tokens_per_second == pytest.approx(7 / t.decode_seconds)


def test_chat_stream_joins_to_chat(model: slm.Model) -> None:
    messages = [{"role": "user", "content": "Tell me about cats."}]
    params = slm.GenerationParams(temperature=0.8, seed=42, max_tokens=24)
    whole = model.chat(messages, params)
    chunks = list(model.chat_stream(messages, params))
    assert "".join(c.text for c in chunks) == whole.text
    assert [c.token for c in chunks] == whole.tokens
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason == whole.finish_reason
    assert last.usage == whole.usage
    assert last.timings is not None


def test_stream_joins_to_generate(model: slm.Model) -> None:
    chunks = list(model.stream(STORY, temperature=0, max_tokens=12))
    whole = model.generate(STORY, temperature=0, max_tokens=12)
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length"


# --- stopping -----------------------------------------------------------------------------------


def test_stop_string_cuts_the_text(model: slm.Model) -> None:
    full = model.generate(FACT, temperature=0, max_tokens=32)
    assert full.finish_reason == "length"
    # A stop string from the middle of the greedy text, straddling whatever token boundary is there.
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 5]
    assert stop.strip()
    expected = full.text[: full.text.find(stop)]
    out = model.generate(FACT, temperature=0, max_tokens=32, stop=["never-appears-xyz", stop])
    assert out.finish_reason == "stop"
    assert out.text == expected
    assert stop not in out.text
    assert len(out.tokens) < len(full.tokens)
    assert out.tokens == full.tokens[: len(out.tokens)]


def test_stop_string_that_never_appears(model: slm.Model) -> None:
    full = model.generate(FACT, temperature=0, max_tokens=16)
    out = model.generate(FACT, temperature=0, max_tokens=16, stop="never-appears-xyz")
    assert out.finish_reason == "length"
    assert out.text == full.text


def test_max_tokens_finishes_with_length(model: slm.Model) -> None:
    out = model.generate(STORY, temperature=0, max_tokens=5)
    assert out.finish_reason == "length"
    assert len(out.tokens) == 5
    assert out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == len(model.tokenize(STORY))


# --- prompts that do not fit --------------------------------------------------------------------


def test_prompt_longer_than_context(small_model: slm.Model) -> None:
    prompt = "hello world " * 200
    n = len(small_model.tokenize(prompt))
    assert n > small_model.info.context_length == 256
    with pytest.raises(ContextOverflow) as excinfo:
        small_model.generate(prompt, temperature=0, max_tokens=4)
    message = str(excinfo.value)
    assert str(n) in message
    assert "256" in message
    assert excinfo.value.field == "prompt"
    assert isinstance(excinfo.value, InvalidParameter)

    out = small_model.generate(prompt, temperature=0, max_tokens=4, truncate=True)
    assert out.usage.prompt_tokens == 256 - 4
    assert 1 <= len(out.tokens) <= 4
    assert out.finish_reason in ("length", "stop")


def test_max_tokens_beyond_context(small_model: slm.Model) -> None:
    with pytest.raises(ContextOverflow, match="256"):
        small_model.generate(STORY, temperature=0, max_tokens=1000)


@pytest.mark.parametrize("prompt", ["", "   \n\t", []], ids=["empty", "blank", "no-ids"])
def test_empty_prompt_is_refused(model: slm.Model, prompt: str | list[int]) -> None:
    with pytest.raises(InvalidParameter) as excinfo:
        model.generate(prompt, temperature=0, max_tokens=4)
    assert excinfo.value.field == "prompt"


def test_empty_conversation_is_refused(model: slm.Model) -> None:
    with pytest.raises(InvalidParameter) as excinfo:
        model.chat([], temperature=0, max_tokens=4)
    assert excinfo.value.field == "messages"


def test_bad_generation_parameter_names_the_field(model: slm.Model) -> None:
    with pytest.raises(InvalidParameter) as excinfo:
        model.generate(STORY, temperature=-1)
    assert excinfo.value.field == "temperature"
    with pytest.raises(InvalidParameter) as excinfo:
        model.generate(STORY, no_such_option=1)
    assert excinfo.value.field == "no_such_option"


# --- loading ------------------------------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ModelNotFound) as excinfo:
        slm.load(str(missing))
    assert str(missing) in str(excinfo.value)


def test_load_truncated_gguf(tmp_path: Path, smollm2_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    assert truncated.read_bytes()[:4] == b"GGUF"  # a real GGUF header: only llama.cpp can tell it is cut short
    with pytest.raises(InvalidModelFile) as excinfo:
        slm.load(str(truncated))
    assert str(truncated) in str(excinfo.value)


@pytest.mark.parametrize(
    "content", [b"this is not a model, just some text\n" * 10, b"GG"], ids=["text", "tiny"]
)
def test_load_non_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidModelFile) as excinfo:
        slm.load(str(path))
    assert str(path) in str(excinfo.value)
    assert "GGUF" in str(excinfo.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="directory"):
        slm.load(str(tmp_path))


def test_load_misspelled_alias_suggests() -> None:
    with pytest.raises(ModelNotFound) as excinfo:
        slm.load("smolm2")
    assert "smollm2" in str(excinfo.value)
    assert "'smolm2'" in str(excinfo.value)


# --- Gemma 3 270M -------------------------------------------------------------------------------


def test_gemma_chat_prompt_has_one_bos(gemma: slm.Model) -> None:
    # The PyPI file is Gemma 3 270M's pretrained base model (converted from google/gemma-3-270m), which
    # was not tuned to end its turns: check the prompt and the generation, not that it stops by itself.
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = gemma.chat_tokens(messages)
    bos = gemma.info.special.bos_id
    assert ids[0] == bos
    assert ids[1] != bos, "the template writes <bos> itself; it must not be added a second time"
    out = gemma.chat(messages, temperature=0, max_tokens=16)
    assert out.usage.prompt_tokens == len(ids)
    assert out.text.strip()
    assert "<end_of_turn>" not in out.text


def test_gemma_raw_completion(gemma: slm.Model) -> None:
    prompt = "The Eiffel Tower is in the city of"
    ids = gemma.tokenize(prompt)
    assert ids[0] == gemma.info.special.bos_id and ids[1] != ids[0]  # the tokenizer adds BOS once
    out = gemma.generate(prompt, temperature=0, max_tokens=8)
    assert out.usage.prompt_tokens == len(ids)
    assert "Paris" in out.text


# Enough of Gemma's template to show where BOS comes from: written by the template, or not.
TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEMPLATE_WITHOUT_BOS = TEMPLATE_WITH_BOS.removeprefix("{{ bos_token }}")


@pytest.mark.parametrize("template", [TEMPLATE_WITH_BOS, TEMPLATE_WITHOUT_BOS], ids=["template-bos", "no-bos"])
def test_chat_tokens_have_exactly_one_bos(gemma_path: Path, template: str) -> None:
    with slm.load(str(gemma_path), n_ctx=256, max_sequences=1) as m:
        assert m.info.special.add_bos
        # The real engine, with a chat template in place of the one its file lacks.
        m.engine.info = dataclasses.replace(m.info, chat_template=template)
        ids = m.chat_tokens(QUESTION)
        bos = m.info.special.bos_id
        assert ids[0] == bos
        assert ids.count(bos) == 1
        body = m.apply_chat_template(QUESTION).removeprefix("<bos>")
        assert body.startswith("<start_of_turn>user\nWhat is 2 + 2?")
        assert ids[1:] == m.tokenize(body, add_special=False)
