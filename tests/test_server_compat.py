"""What clients written for other local servers send (issue: speak every API local clients use): OpenAI paths
without /v1, llama.cpp's tokenizer endpoints and request fields."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from serving import SERVE_ARGS, SLM, InProcess, Server, assert_no_traceback
from slm.server import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("compat"), "smollm2", str(gemma_path), *SERVE_ARGS) as s:
        yield s
        assert_no_traceback(s)


@pytest.fixture(scope="module")
def gemma(server: Server) -> str:
    return str(httpx.get(f"{server.url}/v1/models").json()["data"][1]["id"])


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_the_openai_sdk_works_with_a_base_url_without_v1(server: Server) -> None:
    bare = openai.OpenAI(base_url=server.url, api_key="-")
    versioned = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12,
           "temperature": 0}
    assert bare.chat.completions.create(**ask).choices[0].message.content == \
        versioned.chat.completions.create(**ask).choices[0].message.content
    assert [m.id for m in bare.models.list()] == [m.id for m in versioned.models.list()]
    assert bare.models.retrieve("smollm2").id == "smollm2"
    text = bare.completions.create(model="smollm2", prompt="One, two,", max_tokens=4, temperature=0)
    assert text.choices[0].text
    streamed = "".join(c.choices[0].delta.content or "" for c in bare.chat.completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == versioned.chat.completions.create(**ask).choices[0].message.content
    assert bare.responses.create(model="smollm2", input="Hi", max_output_tokens=4).output_text
    missing = httpx.post(f"{server.url}/chat/completion", json=ask)  # a typo stays a 404
    assert missing.status_code == 404


@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_tokenize_then_detokenize_round_trips_special_tokens_included(server: Server, gemma: str,
                                                                       which: str) -> None:
    model = "smollm2" if which == "smollm2" else gemma
    special = "<|im_start|>" if which == "smollm2" else "<start_of_turn>"
    text = f"{special}user\nHello, wörld! 日本語 🙂{special}"
    tokens = post(server, "/tokenize", {"content": text, "model": model}).json()["tokens"]
    assert all(isinstance(t, int) for t in tokens)
    assert post(server, "/detokenize", {"tokens": tokens, "model": model}).json() == {"content": text}
    # the special token is one token (parse_special, the default), several when read as plain text
    plain = post(server, "/tokenize", {"content": text, "model": model, "parse_special": False}).json()["tokens"]
    assert len(plain) > len(tokens)
    with_bos = post(server, "/tokenize", {"content": "Hi", "model": model, "add_special": True}).json()["tokens"]
    without = post(server, "/tokenize", {"content": "Hi", "model": model}).json()["tokens"]
    assert with_bos[-len(without):] == without
    assert len(with_bos) == len(without) + (1 if which == "gemma" else 0)  # Gemma adds <bos>; SmolLM2 none


def test_tokenize_with_pieces(server: Server) -> None:
    pieces = post(server, "/tokenize", {"content": "Hello𝄞", "with_pieces": True}).json()["tokens"]
    ids = post(server, "/tokenize", {"content": "Hello𝄞"}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    assert pieces[0]["piece"] == "Hello"
    # the symbol's four bytes are split over byte tokens: pieces that are not whole UTF-8 come as byte lists
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined == "Hello𝄞".encode()
    assert any(isinstance(p["piece"], list) for p in pieces)


@pytest.mark.parametrize(("path", "body", "named"), [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 3}, "content"),
    ("/tokenize", {"content": "a", "model": "nope"}, "nope"),
    ("/tokenize", {"content": "a", "add_special": "yes"}, "add_special"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
    ("/detokenize", {"tokens": "12"}, "tokens"),
])
def test_tokenizer_endpoints_refuse_bad_input_by_name(server: Server, path: str, body: dict[str, Any],
                                                      named: str) -> None:
    response = post(server, path, body)
    assert 400 <= response.status_code < 500
    assert named in response.json()["error"]["message"]
    assert post(server, "/tokenize", {"content": "ok"}).status_code == 200


# --- llama.cpp's request fields -------------------------------------------------------------------

STORY = [{"role": "user", "content": "Tell me a story about a cat who likes the sea."}]


def chat(server: Server, **fields: Any) -> httpx.Response:
    return post(server, "/v1/chat/completions", {"model": "smollm2", "messages": STORY, "max_tokens": 24,
                                                 "temperature": 0, **fields})


def answer(server: Server, **fields: Any) -> str:
    response = chat(server, **fields)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_llamacpp_fields_are_honoured(server: Server) -> None:
    greedy = answer(server)
    counted = chat(server, n_predict=5).json()  # n_predict wins over max_tokens, as in llama.cpp
    assert counted["usage"]["completion_tokens"] == 5
    assert answer(server, grammar='root ::= "yes" | "no"') in ("yes", "no")
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert isinstance(json.loads(answer(server, json_schema=schema))["age"], int)
    penalized = answer(server, repeat_penalty=1.8)
    assert penalized == answer(server, repetition_penalty=1.8) and penalized != greedy
    assert len(chat(server, n_cmpl=2, temperature=0.9, seed=1).json()["choices"]) == 2
    # samplers: with top-k 1 in the order, sampling is greedy; left out, it samples at temperature 1.5
    assert answer(server, samplers=["top_k", "temperature"], top_k=1, temperature=1.5, seed=7) == greedy
    assert answer(server, samplers="t", top_k=1, temperature=1.5, seed=7) != greedy
    # ignore_eos: past the end-of-generation token, to max_tokens
    short = {"messages": [{"role": "user", "content": "Reply with one word: yes or no?"}], "max_tokens": 40}
    ended = chat(server, **short).json()
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] < 40
    longer = chat(server, **short, ignore_eos=True).json()
    assert longer["choices"][0]["finish_reason"] == "length" and longer["usage"]["completion_tokens"] == 40
    # no effect on the answer: taken as they are
    assert answer(server, cache_prompt=False, id_slot=3, n_keep=10, repeat_last_n=64) == greedy
    # llama.cpp's web UI sends every sampler at its "off" value: all taken
    off = {"dry_multiplier": 0, "dry_base": 1.75, "xtc_probability": 0, "xtc_threshold": 0.1, "mirostat": 0,
           "dynatemp_range": 0, "top_n_sigma": -1, "min_keep": 0, "timings_per_token": False, "n_probs": 0,
           "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                        "temperature"], "repeat_penalty": 1.0, "repeat_last_n": 64}
    assert answer(server, **off) == greedy


@pytest.mark.parametrize(("fields", "named"), [
    ({"dry_multiplier": 0.8}, "dry_multiplier"),
    ({"xtc_probability": 0.5}, "xtc_probability"),
    ({"mirostat": 2}, "mirostat"),
    ({"dynatemp_range": 0.5}, "dynatemp_range"),
    ({"top_n_sigma": 1.0}, "top_n_sigma"),
    ({"n_probs": 5}, "n_probs"),
    ({"timings_per_token": True}, "timings_per_token"),
    ({"return_tokens": True}, "return_tokens"),
    ({"post_sampling_probs": True}, "post_sampling_probs"),
    ({"lora": [{"id": 0, "scale": 1.0}]}, "lora"),
    ({"response_fields": ["content"]}, "response_fields"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ({"repeat_penalty": 1.1, "repeat_last_n": 64}, "repeat_last_n"),
    ({"repeat_penalty": 1.1, "repetition_penalty": 1.2}, "repeat_penalty"),
    ({"n_predict": 0}, "n_predict"),
    ({"n_predict": -5}, "n_predict"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
    ({"grammar": "root ::= missing"}, "grammar"),
    ({"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, "json_schema"),
    ({"samplers": ["top_k", "bogus"]}, "samplers[1]"),
    ({"samplers": "kq"}, "samplers[1]"),
    ({"samplers": ["infill"]}, "samplers[0]"),
    ({"samplers": ["top_k", "penalties"], "repeat_penalty": 1.2}, "samplers"),
    ({"n_cmpl": 2, "n": 3}, "n_cmpl"),
])
def test_llamacpp_fields_slm_cannot_honour_are_refused_by_name(server: Server, fields: dict[str, Any],
                                                               named: str) -> None:
    response = chat(server, **fields)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]


# --- details clients rely on ------------------------------------------------------------------------


def test_a_chat_stream_opens_with_the_role_and_empty_content(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    chunks = list(client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=4, stream=True))
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    streamed = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=4, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=4,
                                                  temperature=0).choices[0].message.content


def test_a_prompt_beyond_the_context_reports_its_size_and_the_context(server: Server) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    response = post(server, "/v1/chat/completions", {"model": "smollm2", "messages": long, "max_tokens": 4})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["n_ctx"] == 2048 and error["n_prompt_tokens"] > 2048  # SERVE_ARGS: --ctx-size 2048
    assert str(error["n_prompt_tokens"]) in error["message"]


@pytest.mark.parametrize("credentials", [False, True])
def test_cors_echoes_an_allowed_origin_and_sends_credentials_when_asked(credentials: bool) -> None:
    app = create_app(["smollm2"], preload=False, cors_origins=["http://app.local"], cors_credentials=credentials)
    with InProcess(app) as server:
        preflight = httpx.options(f"{server.url}/v1/responses/resp_1", headers={
            "Origin": "http://app.local", "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.local"
        assert "DELETE" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers.get("access-control-allow-credentials") == ("true" if credentials else None)
        call = httpx.get(f"{server.url}/v1/models", headers={"Origin": "http://app.local", "Cookie": "a=b"})
        assert call.headers["access-control-allow-origin"] == "http://app.local"
        assert call.headers.get("access-control-allow-credentials") == ("true" if credentials else None)
        other = httpx.options(f"{server.url}/v1/models", headers={
            "Origin": "http://elsewhere.local", "Access-Control-Request-Method": "GET"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_any_model_name_reaches_the_one_model_served(tmp_path: Path) -> None:
    with Server(tmp_path, "smollm2", *SERVE_ARGS, "--any-model-name") as single:
        client = openai.OpenAI(base_url=f"{single.url}/v1", api_key="-")
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=STORY, max_tokens=8, temperature=0)
        same = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=8, temperature=0)
        assert reply.model == "smollm2" and reply.choices[0].message.content == same.choices[0].message.content
        assert client.completions.create(model="davinci-002", prompt="One, two,", max_tokens=3).model == "smollm2"
        ollama_reply = ollama.Client(host=single.url).chat(
            model="llama3.2", messages=STORY, options={"num_predict": 4})
        assert ollama_reply["message"]["content"]
        assert ollama_reply["model"] == "llama3.2"  # Ollama's API names the model as the request did


def test_without_any_model_name_an_unknown_name_is_a_404_listing_the_served_ones(server: Server) -> None:
    response = post(server, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": STORY, "max_tokens": 2})
    assert response.status_code == 404 and "smollm2" in response.json()["error"]["message"]


def test_any_model_name_is_refused_for_a_server_of_several_models(tmp_path: Path, gemma_path: Path) -> None:
    done = subprocess.run([str(SLM), "serve", "smollm2", str(gemma_path), "--any-model-name", "--port", "0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "SLM_HOME": str(tmp_path)})
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if line.strip()]
    assert "--any-model-name" in error[-1] and "has 2" in error[-1] and "Traceback" not in done.stderr
