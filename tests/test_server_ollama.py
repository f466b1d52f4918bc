"""The Ollama API, through the `ollama` client against a real `slm serve` subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest

import slm
from serving import Server, module_server

MODEL = "smollm2"
ASK = [{"role": "user", "content": "What is 2 + 2?"}]
FACT = "The capital of France is"
GREEDY: dict[str, Any] = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, "ollama")


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def assert_serves(client: ollama.Client) -> None:
    assert client.chat(MODEL, ASK, options={"num_predict": 4}).message.content


def assert_stats(reply: Any, limit: int) -> None:
    """The final object's counts and durations (nanoseconds) are there and consistent."""
    assert reply.done is True
    assert reply.done_reason in ("stop", "length")
    assert reply.model == MODEL
    assert reply.created_at
    assert reply.prompt_eval_count > 0
    assert 0 < reply.eval_count <= limit
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration > 0
    assert reply.load_duration >= 0


# --- chat and generate ----------------------------------------------------------------------------


def test_chat(client: ollama.Client) -> None:
    reply = client.chat(MODEL, ASK, options=GREEDY)
    assert reply.message.role == "assistant"
    assert "4" in reply.message.content
    assert_stats(reply, GREEDY["num_predict"])


def test_chat_streamed_equals_one_shot(client: ollama.Client) -> None:
    one = client.chat(MODEL, ASK, options=GREEDY)
    parts = list(client.chat(MODEL, ASK, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == one.message.content
    assert all(not p.done for p in parts[:-1])
    last = parts[-1]
    assert last.message.content == ""
    assert last.done_reason == one.done_reason
    assert last.eval_count == one.eval_count
    assert last.prompt_eval_count == one.prompt_eval_count
    assert_stats(last, GREEDY["num_predict"])


def test_generate(client: ollama.Client) -> None:
    reply = client.generate(MODEL, FACT, raw=True, options=GREEDY)
    assert "Paris" in reply.response
    assert_stats(reply, GREEDY["num_predict"])
    assert reply.context  # the conversation so far, to continue it
    parts = list(client.generate(MODEL, FACT, raw=True, options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == reply.response
    assert parts[-1].done and parts[-1].context == reply.context


def test_generate_uses_the_chat_template_unless_raw(client: ollama.Client) -> None:
    templated = client.generate(MODEL, "What is 2 + 2?", options=GREEDY)
    chatted = client.chat(MODEL, ASK, options=GREEDY)
    assert templated.response == chatted.message.content
    system = "Answer in French."
    with_system = client.generate(MODEL, "What is 2 + 2?", system=system, options=GREEDY)
    chatted = client.chat(MODEL, [{"role": "system", "content": system}, *ASK], options=GREEDY)
    assert with_system.response == chatted.message.content
    assert with_system.prompt_eval_count == chatted.prompt_eval_count


def test_num_predict_limits_eval_count(client: ollama.Client) -> None:
    reply = client.generate(MODEL, "Once upon a time", raw=True, options={"num_predict": 5, "temperature": 0})
    assert reply.eval_count == 5
    assert reply.done_reason == "length"
    unlimited = client.chat(MODEL, ASK, options={"num_predict": -1, "temperature": 0})
    assert unlimited.done_reason == "stop"


def test_options_are_mapped(client: ollama.Client) -> None:
    greedy = client.chat(MODEL, ASK, options=GREEDY).message.content
    # top_k 1 at temperature 1 is greedy: top_k reaches the sampler.
    top1 = client.chat(MODEL, ASK, options={"temperature": 1.0, "top_k": 1, "num_predict": 24, "seed": 3})
    assert top1.message.content == greedy
    seeded = {client.chat(MODEL, ASK, options={"temperature": 1.0, "seed": 5, "num_predict": 16}).message.content
              for _ in range(2)}
    assert len(seeded) == 1
    cut = client.chat(MODEL, ASK, options={**GREEDY, "stop": [" math"]})
    assert cut.message.content == greedy[: greedy.index(" math")]
    assert cut.done_reason == "stop"
    every = {"top_p": 0.9, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.1, "presence_penalty": 0.5,
             "frequency_penalty": 0.5, "num_ctx": 4096, "mirostat": 0}  # the last two are ignored, as Ollama would
    assert client.chat(MODEL, ASK, options={**GREEDY, **every}, keep_alive="5m").message.content


def test_logprobs(client: ollama.Client) -> None:
    reply = client.chat(MODEL, ASK, options={"temperature": 0, "num_predict": 6}, logprobs=True, top_logprobs=2)
    assert reply.logprobs
    assert "".join(lp.token for lp in reply.logprobs) == reply.message.content
    for lp in reply.logprobs:
        assert lp.logprob <= 0
        assert lp.top_logprobs[0].token == lp.token


BEAMS: dict[str, Any] = {"num_beams": 4, "num_predict": 12}


def test_beam_search_options_answer_the_best_beam(client: ollama.Client, model: slm.Model) -> None:
    """slm's extension of ``options``: the Python API's best beam. Streamed, the answer is one line, its whole
    text, once the search has ended, then the last line with the counts."""
    expected = model.chat(ASK, num_beams=4, max_tokens=12)
    reply = client.chat(MODEL, ASK, options=BEAMS)
    assert reply.message.content == expected.text
    assert reply.done_reason == expected.finish_reason and reply.eval_count == len(expected.tokens)
    parts = list(client.chat(MODEL, ASK, options=BEAMS, stream=True))
    assert [(p.message.content, p.done) for p in parts] == [(expected.text, False), ("", True)]
    assert parts[-1].done_reason == reply.done_reason and parts[-1].eval_count == reply.eval_count


def test_every_beam_option_reaches_the_search(client: ollama.Client, model: slm.Model) -> None:
    """Settings under which length_penalty, no_repeat_ngram_size and min_new_tokens each change the best beam
    (early_stopping changes none this short; it is sent to show it is taken). On /api/generate, whose
    ``context`` (prompt and answer tokens) a stream must carry too."""
    settings = {"num_beams": 4, "num_predict": 12, "length_penalty": -1.0, "early_stopping": "never",
                "no_repeat_ngram_size": 3, "min_new_tokens": 4}
    expected = model.chat(ASK, num_beams=4, max_tokens=12, length_penalty=-1.0, early_stopping="never",
                          no_repeat_ngram_size=3, min_new_tokens=4)
    question = ASK[0]["content"]
    reply = client.generate(MODEL, question, options=settings)
    assert reply.response == expected.text
    assert reply.context == [*model.chat_tokens(ASK), *expected.tokens]
    parts = list(client.generate(MODEL, question, options=settings, stream=True))
    assert "".join(p.response for p in parts) == reply.response
    assert parts[-1].done and parts[-1].context == reply.context
    for option, other in (("length_penalty", 1.0), ("no_repeat_ngram_size", 0), ("min_new_tokens", 8)):
        assert client.generate(MODEL, question, options={**settings, option: other}).response != reply.response


def test_empty_request_loads_the_model(client: ollama.Client) -> None:
    reply = client.generate(MODEL)
    assert reply.done and reply.done_reason == "load"
    assert client.chat(MODEL, []).done_reason == "load"


# --- listing --------------------------------------------------------------------------------------


def test_tags(client: ollama.Client) -> None:
    [model] = client.list().models
    assert model.model == f"{MODEL}:latest"
    assert model.size > 1_000_000
    assert model.digest
    assert model.modified_at is not None
    assert model.details.format == "gguf"
    assert model.details.parameter_size == "135M"
    assert model.details.quantization_level == "Q4_1"


def test_ps(client: ollama.Client) -> None:
    [model] = client.ps().models
    assert model.model == f"{MODEL}:latest"
    assert model.context_length == 2048
    assert model.expires_at is not None


def test_show(client: ollama.Client) -> None:
    info = client.show(MODEL)
    assert "<|im_start|>" in info.template
    assert info.details.family == "llama"
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["general.parameter_count"] > 100_000_000
    assert "completion" in info.capabilities
    assert client.show(f"{MODEL}:latest").template == info.template


def test_version(server: Server) -> None:
    assert httpx.get(f"{server.url}/api/version").json()["version"]


# --- errors ---------------------------------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("temperature a string", {"options": {"temperature": "hot"}}, "options.temperature"),
    ("negative repeat_penalty", {"options": {"repeat_penalty": -1}}, "options.repeat_penalty"),
    ("num_predict zero", {"options": {"num_predict": 0}}, "options.num_predict"),
    ("num_predict beyond the context", {"options": {"num_predict": 10**6}}, "options.num_predict"),
    ("stop not a list", {"options": {"stop": "x"}}, "options.stop"),
    ("images", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
    ("format neither json nor a schema", {"format": "xml"}, "format"),
    ("tool not a function", {"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ("prompt beyond the context", {"messages": [{"role": "user", "content": "word " * 3000}]}, "context"),
    ("stream a string", {"stream": "yes"}, "stream"),
    ("num_beams zero", {"options": {"num_beams": 0}}, "options.num_beams"),
    ("num_beams beyond the sequences", {"options": {"num_beams": 64}}, "options.num_beams"),
    ("num_beams with temperature", {"options": {"num_beams": 4, "temperature": 0.7}}, "options.temperature"),
    ("num_beams with top_p", {"options": {"num_beams": 4, "top_p": 0.5}}, "options.top_p"),
    ("num_beams with stop", {"options": {"num_beams": 4, "stop": ["x"]}}, "options.stop"),
    ("num_beams with logprobs", {"options": {"num_beams": 4}, "logprobs": True}, "logprobs"),
    ("num_return_sequences", {"options": {"num_beams": 4, "num_return_sequences": 2}},
     "options.num_return_sequences"),
    ("length_penalty without beams", {"options": {"length_penalty": 0.5}}, "options.length_penalty"),
    ("early_stopping neither true, false nor never", {"options": {"num_beams": 2, "early_stopping": "soon"}},
     "options.early_stopping"),
    ("min_new_tokens without beams", {"options": {"min_new_tokens": 2}}, "options.min_new_tokens"),
    ("no_repeat_ngram_size negative", {"options": {"no_repeat_ngram_size": -1}}, "options.no_repeat_ngram_size"),
]


@pytest.mark.parametrize(("case", "fields", "needle"), BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat(server: Server, client: ollama.Client, case: str, fields: dict[str, Any], needle: str,
                  stream: bool) -> None:
    # Raw requests: the client would refuse some of these itself. The answer is Ollama's error shape.
    body = {"model": MODEL, "messages": ASK, "stream": stream, **fields}
    response = httpx.post(f"{server.url}/api/chat", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]
    assert_serves(client)


def test_client_raises_response_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat("nope", ASK)
    assert caught.value.status_code == 404
    assert "nope" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.chat("nope", ASK, stream=True))
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(MODEL, ASK, options={"temperature": -1})
    assert caught.value.status_code == 400
    assert "options.temperature" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(MODEL, "hi", suffix="bye")
    assert caught.value.status_code == 400
    assert "suffix" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nope")
    assert caught.value.status_code == 404
    assert_serves(client)


def test_malformed_json(server: Server, client: ollama.Client) -> None:
    for body in (b'{"model": ', b"[]", b""):
        response = httpx.post(f"{server.url}/api/generate", content=body)
        assert response.status_code == 400
        assert isinstance(response.json()["error"], str)
    response = httpx.post(f"{server.url}/api/show", json={})
    assert response.status_code == 400
    assert "model" in response.json()["error"]
    response = httpx.get(f"{server.url}/api/nothing")
    assert response.status_code == 404
    assert isinstance(response.json()["error"], str)
    assert_serves(client)
