"""The OpenAI-compatible API, through the official `openai` SDK against a real `slm serve` subprocess."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import slm
from serving import SERVE_ARGS, Server, assert_no_traceback, module_server
from slm.server.app import MAX_BODY_BYTES

MODEL = "smollm2"
ASK = [{"role": "user", "content": "What is 2 + 2?"}]
FACT = "The capital of France is"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, "openai")


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", ASK), **{**GREEDY, **kwargs})


def stream_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


def assert_serves(client: openai.OpenAI) -> None:
    """The server still answers a good request after a bad one."""
    reply = chat(client, max_tokens=4)
    assert reply.choices[0].message.content


# --- chat ---------------------------------------------------------------------------------------


def test_chat(client: openai.OpenAI) -> None:
    reply = chat(client)
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.system_fingerprint
    assert reply.created > 0
    [choice] = reply.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert "4" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= GREEDY["max_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_equals_one_shot(client: openai.OpenAI) -> None:
    one = chat(client)
    chunks = list(chat(client, stream=True))
    assert stream_text(chunks) == one.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == one.choices[0].finish_reason
    assert all(c.finish_reason is None for chunk in chunks[:-1] for c in chunk.choices)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(client: openai.OpenAI) -> None:
    one = chat(client, max_tokens=8)
    chunks = list(chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump() == one.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert stream_text(chunks) == one.choices[0].message.content


def test_stop_string(client: openai.OpenAI) -> None:
    full = chat(client).choices[0].message.content
    assert " math" in full
    cut = chat(client, stop=[" math"]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(" math")]


def test_seed_reproduces_sampling(client: openai.OpenAI) -> None:
    texts = {chat(client, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)}
    assert len(texts) == 1


def test_top_k_one_is_greedy(client: openai.OpenAI) -> None:
    """The extension fields (top_k, min_p, typical_p, repetition_penalty) reach the sampler."""
    greedy = chat(client).choices[0].message.content
    top1 = chat(client, temperature=1.0, seed=3, extra_body={"top_k": 1, "min_p": 0.0, "typical_p": 1.0})
    assert top1.choices[0].message.content == greedy


def test_every_sampling_field_is_accepted(client: openai.OpenAI) -> None:
    reply = chat(client, temperature=0.7, top_p=0.9, frequency_penalty=1.0, presence_penalty=0.5, seed=1,
                 stop=["\n\n"], user="tester", max_completion_tokens=8,
                 extra_body={"top_k": 20, "min_p": 0.1, "typical_p": 0.9, "repetition_penalty": 1.2})
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 8  # max_completion_tokens wins over max_tokens


def test_logit_bias_bans_a_token(client: openai.OpenAI, model: slm.Model) -> None:
    reply = chat(client, max_tokens=1)
    first = reply.choices[0].message.content
    [token] = model.tokenize(first, add_special=False)
    other = chat(client, max_tokens=1, logit_bias={str(token): -100}).choices[0].message.content
    assert other != first


def test_logprobs(client: openai.OpenAI) -> None:
    reply = chat(client, max_tokens=8, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert len(content) == reply.usage.completion_tokens - (choice.finish_reason == "stop")
    for t in content:
        assert t.logprob <= 0
        assert t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def test_logprob_bytes_are_the_tokens_own_even_when_it_splits_a_character(client: openai.OpenAI) -> None:
    with slm.load(MODEL) as model:
        engine = model.engine
        split = next(t for t in range(engine.info.vocab_size) if _splits_a_character(engine.token_bytes(t)))
        raw = engine.token_bytes(split)
    reply = chat(client, max_tokens=1, logprobs=True, top_logprobs=2, logit_bias={str(split): 100})
    [entry] = reply.choices[0].logprobs.content
    assert entry.bytes == list(raw)  # not the replacement character that decoding it alone gives
    assert entry.top_logprobs[0].bytes == list(raw)


def _splits_a_character(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return bool(raw)
    return False


def test_streamed_logprobs(client: openai.OpenAI) -> None:
    one = chat(client, max_tokens=8, logprobs=True)
    chunks = list(chat(client, max_tokens=8, logprobs=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in one.choices[0].logprobs.content]


def test_n_choices(client: openai.OpenAI) -> None:
    single = chat(client, max_tokens=12)
    reply = chat(client, max_tokens=12, n=2, temperature=1.0, seed=11)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert reply.usage.completion_tokens <= 2 * 12
    # Streamed, each choice has its own deltas and its own finish.
    chunks = list(chat(client, max_tokens=12, n=2, stream=True))
    for index in (0, 1):
        assert stream_text(chunks, index) == single.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == index]
        assert finishes[-1] is not None


def test_beam_search_through_the_sdk(client: openai.OpenAI, model: slm.Model) -> None:
    """vLLM's names: `use_beam_search` with `best_of` beams, the `n` best returned ranked; the same beams as
    the Python API's. Streamed, each choice is one chunk, its whole text, once the search has ended."""
    beams = {"use_beam_search": True, "best_of": 4}
    reply = chat(client, max_tokens=12, n=2, extra_body=beams)
    expected = model.chat(ASK, num_beams=4, num_return_sequences=2, max_tokens=12)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [b.text for b in expected.beams]
    assert [c.finish_reason for c in reply.choices] == [b.finish_reason for b in expected.beams]
    assert reply.usage.completion_tokens == sum(len(b.tokens) for b in expected.beams)
    chunks = list(chat(client, max_tokens=12, n=2, stream=True, extra_body=beams))
    for index in (0, 1):
        assert stream_text(chunks, index) == reply.choices[index].message.content
    text = client.completions.create(model=MODEL, prompt=FACT, max_tokens=8, n=2, best_of=3,
                                     extra_body={"use_beam_search": True, "length_penalty": 0.5,
                                                 "early_stopping": True})
    expected = model.generate(FACT, num_beams=3, num_return_sequences=2, max_tokens=8, length_penalty=0.5,
                              early_stopping=True)
    assert [c.text for c in text.choices] == [b.text for b in expected.beams]


def test_developer_role_and_content_parts(client: openai.OpenAI) -> None:
    messages = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]},
    ]
    assert chat(client, messages=messages).choices[0].message.content


# --- completions and models ---------------------------------------------------------------------


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=FACT, **GREEDY)
    assert reply.id.startswith("cmpl-")
    assert reply.object == "text_completion"
    assert reply.model == MODEL
    [choice] = reply.choices
    assert "Paris" in choice.text
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= GREEDY["max_tokens"]
    chunks = list(client.completions.create(model=MODEL, prompt=FACT, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_completions_of_token_ids_and_several_prompts(client: openai.OpenAI, model: slm.Model) -> None:
    text = client.completions.create(model=MODEL, prompt=FACT, **GREEDY).choices[0].text
    from_ids = client.completions.create(model=MODEL, prompt=model.tokenize(FACT), **GREEDY)
    assert from_ids.choices[0].text == text
    both = client.completions.create(model=MODEL, prompt=[FACT, "1, 2, 3,"], **GREEDY)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == text


def test_completion_logprobs(client: openai.OpenAI) -> None:
    choice = client.completions.create(model=MODEL, prompt=FACT, logprobs=2, temperature=0, max_tokens=6).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2
        assert max(top.values()) == pytest.approx(logprob)
        assert top[token] == pytest.approx(logprob)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# --- errors: each names the problem, and the next good request succeeds ---------------------------

TOO_LONG = [{"role": "user", "content": "word " * 3000}]

BAD_CHATS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("empty messages", {"messages": []}, "messages"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("temperature a string", {"temperature": "hot"}, "temperature"),
    ("temperature negative", {"temperature": -1}, "temperature"),
    ("max_tokens a string", {"extra_body": {"max_tokens": "10"}}, "max_tokens"),
    ("max_tokens beyond the context", {"max_tokens": 1_000_000}, "max_tokens"),
    ("max_tokens zero", {"max_tokens": 0}, "max_tokens"),
    ("n too large", {"n": 100}, "n"),
    ("n zero", {"n": 0}, "n"),
    ("logit_bias unknown token", {"logit_bias": {"99999999": 5}}, "logit_bias"),
    ("logit_bias not a token id", {"logit_bias": {"abc": 5}}, "logit_bias"),
    ("logit_bias out of range", {"logit_bias": {"1": 500}}, "logit_bias[1]"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs too many", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("top_p zero", {"top_p": 0}, "top_p"),
    ("stop not strings", {"extra_body": {"stop": [1, 2]}}, "stop"),
    ("seed negative", {"seed": -5}, "seed"),
    ("prompt beyond the context", {"messages": TOO_LONG}, "prompt"),
    ("prompt beyond the context, streamed", {"messages": TOO_LONG, "stream": True}, "prompt"),
    ("tool not a function", {"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ("response_format of no known type", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("beams: n above best_of", {"n": 3, "extra_body": {"use_beam_search": True, "best_of": 2}}, "n"),
    ("beams: best_of one", {"extra_body": {"use_beam_search": True, "best_of": 1}}, "best_of"),
    ("beams: more than the sequences", {"extra_body": {"use_beam_search": True, "best_of": 5}}, "best_of"),
    ("beams: sampled", {"temperature": 0.7, "extra_body": {"use_beam_search": True, "best_of": 2}}, "temperature"),
    ("beams: top_p", {"top_p": 0.5, "extra_body": {"use_beam_search": True, "best_of": 2}}, "top_p"),
    ("beams: stop", {"stop": ["."], "extra_body": {"use_beam_search": True, "best_of": 2}}, "stop"),
    ("beams: logprobs", {"logprobs": True, "extra_body": {"use_beam_search": True, "best_of": 2}}, "logprobs"),
    ("beams: early_stopping", {"extra_body": {"use_beam_search": True, "best_of": 2, "early_stopping": "x"}},
     "early_stopping"),
    ("length_penalty without beams", {"extra_body": {"length_penalty": 0.5}}, "length_penalty"),
    ("best_of without beams", {"extra_body": {"best_of": 3}}, "best_of"),
]


@pytest.mark.parametrize(("case", "kwargs", "field"), BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_bad_chat_request(client: openai.OpenAI, case: str, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, **kwargs)
    error = caught.value
    assert error.status_code == 400
    assert error.param == field
    assert field in str(error)
    assert error.type == "invalid_request_error"
    assert_serves(client)


def test_context_overflow_says_so(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, messages=TOO_LONG)
    assert caught.value.code == "context_length_exceeded"
    assert "context of 2048" in str(caught.value)


def test_missing_or_malformed_body_fields(client: openai.OpenAI) -> None:
    for body, field in [({"model": MODEL}, "messages"), ({"messages": ASK}, "model"),
                        ({"model": MODEL, "messages": "hi"}, "messages")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.post("/chat/completions", body=body, cast_to=object)
        assert caught.value.param == field
        assert field in str(caught.value)
        assert_serves(client)


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=ASK)
    assert "gpt-4" in str(caught.value)
    assert caught.value.code == "model_not_found"
    assert_serves(client)


BAD_COMPLETIONS: list[tuple[str, dict[str, Any], str]] = [
    ("echo", {"echo": True}, "echo"),
    ("suffix", {"suffix": "The end."}, "suffix"),
    ("token id beyond the vocabulary", {"prompt": [1, 2, 10**9]}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt of the wrong type", {"prompt": 5}, "prompt"),
    ("logprobs too many", {"logprobs": 50}, "logprobs"),
    ("best_of", {"best_of": 3}, "best_of"),
    ("beams: n above best_of", {"n": 3, "best_of": 2, "extra_body": {"use_beam_search": True}}, "n"),
]


@pytest.mark.parametrize(("case", "kwargs", "field"), BAD_COMPLETIONS, ids=[c[0] for c in BAD_COMPLETIONS])
def test_bad_completion_request(client: openai.OpenAI, case: str, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, **{"prompt": FACT, "max_tokens": 4, **kwargs})
    assert caught.value.param == field
    assert field in str(caught.value)
    assert client.completions.create(model=MODEL, prompt=FACT, max_tokens=2).choices[0].text


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"model": "smollm2", "messages": [', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_malformed_json(server: Server, client: openai.OpenAI, body: bytes, needle: str) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert_serves(client)


def test_body_over_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, messages=[{"role": "user", "content": "word " * (MAX_BODY_BYTES // 5 + 1000)}])
    assert caught.value.status_code == 413
    assert "larger than" in str(caught.value)
    assert_serves(client)


def test_unknown_route_is_a_json_404(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/nothing")
    assert response.status_code == 404
    assert "/v1/nothing" in response.json()["error"]["message"]
    response = httpx.get(f"{server.url}/v1/chat/completions")
    assert response.status_code == 405


# --- API key --------------------------------------------------------------------------------------

KEY = "test-key-123"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """With an API key from the environment, one request at a time and a queue of one."""
    workdir = tmp_path_factory.mktemp("openai-key")
    with Server(workdir, MODEL, *SERVE_ARGS, "--parallel", "1", "--max-queue", "1", env={"SLM_API_KEY": KEY}) as s:
        yield s
        assert_no_traceback(s)


def test_api_key_required(keyed_server: Server) -> None:
    url = f"{keyed_server.url}/v1"
    wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401
    assert "API key" in str(caught.value)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    # No Authorization header at all.
    response = httpx.post(f"{url}/chat/completions", json={"model": MODEL, "messages": ASK})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{keyed_server.url}/api/tags").status_code == 401
    keyed = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert [m.id for m in keyed.models.list().data] == [MODEL]
    assert keyed.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4).choices[0].message.content


def test_health_is_open(keyed_server: Server) -> None:
    response = httpx.get(f"{keyed_server.url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_no_key_needed_without_one(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/models")
    assert response.status_code == 200


def test_queue_full_is_503_with_retry_after(keyed_server: Server) -> None:
    # One running and one waiting at most: the third and fourth choices of n=4 find the queue full.
    body = {"model": MODEL, "messages": ASK, "n": 4, "max_tokens": 32, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{keyed_server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()
    assert response.json()["error"]["code"] == "queue_full"
    keyed = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        keyed.chat.completions.create(model=MODEL, messages=ASK, n=4, max_tokens=32)
    assert caught.value.status_code == 503
    # The submitted choices were withdrawn: the next request runs at once.
    assert keyed.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4).choices[0].message.content
    stats = keyed_server.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_error_body_is_json_everywhere(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", content=b"nope")
    assert response.status_code == 400
    assert json.loads(response.text)["error"]["type"] == "invalid_request_error"


def test_models_created_is_the_file_time(client: openai.OpenAI) -> None:
    created = client.models.retrieve(MODEL).created
    assert created == int(Path(slm.store.catalog.resolve(MODEL).path).stat().st_mtime)
