"""What clients written for other local servers send (issue: speak every API local clients use): OpenAI paths
without /v1, llama.cpp's tokenizer endpoints and request fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serving import SERVE_ARGS, Server, assert_no_traceback


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
