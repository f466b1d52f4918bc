"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), through the official `anthropic` SDK against
a real `slm serve` subprocess behind an API key (the SDK sends it as x-api-key, with anthropic-version)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from serving import SERVE_ARGS, Server, assert_no_traceback, module_server

MODEL = "smollm2"
KEY = "anthropic-test-key"
TOKENS = 24
GREEDY: dict[str, Any] = {"max_tokens": TOKENS, "extra_body": {"temperature": 0}}
"""The SDK takes the sampling fields (temperature, top_p, top_k) only in ``extra_body`` now; the API still has them."""
ASK = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = "You are a pirate. Answer every question as a pirate would."
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, "anthropic", "--api-key", KEY)


@pytest.fixture(scope="module")
def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(**kwargs: Any) -> dict[str, Any]:
    """``GREEDY`` with ``kwargs`` over it (their ``extra_body`` merged into its)."""
    return {**GREEDY, **kwargs, "extra_body": {**GREEDY["extra_body"], **kwargs.get("extra_body", {})}}


def create(client: anthropic.Anthropic, messages: Any = None, **kwargs: Any) -> Any:
    return client.messages.create(model=MODEL, messages=messages or ASK, **greedy(**kwargs))


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def prompt_tokens(usage: Any) -> int:
    """Every token of the prompt: Anthropic counts those read from the cache apart from ``input_tokens``."""
    return int(usage.input_tokens + (usage.cache_read_input_tokens or 0))


def test_message(client: anthropic.Anthropic) -> None:
    message = create(client)
    assert message.id.startswith("msg_")
    assert (message.type, message.role, message.model) == ("message", "assistant", MODEL)
    [block] = message.content
    assert block.type == "text" and block.text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert 0 < message.usage.output_tokens <= TOKENS
    counted = client.messages.count_tokens(model=MODEL, messages=ASK)  # type: ignore[arg-type]
    assert counted.input_tokens == prompt_tokens(message.usage)


def test_a_system_prompt_is_the_chat_routes_system_message(client: anthropic.Anthropic, oai: openai.OpenAI) -> None:
    message = create(client, system=SYSTEM)
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *ASK],  # type: ignore[list-item]
                                       max_tokens=TOKENS, temperature=0)
    assert text_of(message) == chat.choices[0].message.content
    assert chat.usage is not None and prompt_tokens(message.usage) == chat.usage.prompt_tokens
    assert text_of(message) != text_of(create(client))  # it has an effect
    # As text blocks, the same prompt.
    blocks = create(client, system=[{"type": "text", "text": SYSTEM}])
    assert text_of(blocks) == text_of(message)
    counted = client.messages.count_tokens(model=MODEL, messages=ASK, system=SYSTEM)  # type: ignore[arg-type]
    assert counted.input_tokens == chat.usage.prompt_tokens


def test_streamed_equals_one_shot(client: anthropic.Anthropic) -> None:
    whole = create(client)
    with client.messages.stream(model=MODEL, messages=ASK, **GREEDY) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == text_of(whole) == text_of(final)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert prompt_tokens(final.usage) == prompt_tokens(whole.usage)
    events = list(create(client, stream=True))
    kinds = " ".join(e.type for e in events)
    assert re.fullmatch(r"message_start content_block_start (content_block_delta )+content_block_stop message_delta "
                        r"message_stop", kinds), kinds
    assert all(e.index == 0 for e in events if e.type.startswith("content_block"))
    assert events[-2].delta.stop_reason == whole.stop_reason


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    free = text_of(create(client))
    word = free.split()[2]
    message = create(client, stop_sequences=["never-said-xyz", word])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert text_of(message) == free[: free.index(word)]
    events = list(create(client, stop_sequences=[word], stream=True))
    delta = events[-2].delta
    assert (delta.stop_reason, delta.stop_sequence) == ("stop_sequence", word)


def test_max_tokens(client: anthropic.Anthropic) -> None:
    message = create(client, max_tokens=3)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3
    events = list(create(client, max_tokens=3, stream=True))
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 3


def test_tool_use_round_trip(client: anthropic.Anthropic, oai: openai.OpenAI) -> None:
    """A forced call is a ``tool_use`` block (streamed as one too); its ``tool_result`` sent back is the prompt
    the chat route makes of the same conversation."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = create(client, ask, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=60)
    [call] = message.content
    assert call.type == "tool_use" and call.name == "get_weather" and set(call.input) == {"city"}
    assert call.id.startswith("toolu_")
    assert message.stop_reason == "tool_use"
    events = list(create(client, ask, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=60, stream=True))
    assert [e.type for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                        "content_block_stop", "message_delta", "message_stop"]
    assert events[1].content_block.type == "tool_use" and events[2].delta.type == "input_json_delta"
    with client.messages.stream(model=MODEL, messages=ask, tools=[WEATHER], tool_choice={"type": "any"},  # type: ignore[arg-type, list-item]
                                **greedy(max_tokens=60)) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", call.name, call.input)]
    result = [*ask, {"role": "assistant", "content": [call.model_dump()]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}]}]
    answer = create(client, result, tools=[WEATHER], tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens") and text_of(answer)
    arguments = json.dumps(call.input)
    chat = oai.chat.completions.create(model=MODEL, tools=[{"type": "function", "function": {
        "name": WEATHER["name"], "description": WEATHER["description"], "parameters": WEATHER["input_schema"]}}],
        tool_choice="none", max_tokens=TOKENS, temperature=0, messages=[  # type: ignore[list-item]
        *ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert text_of(answer) == chat.choices[0].message.content
    assert chat.usage is not None and prompt_tokens(answer.usage) == chat.usage.prompt_tokens
    counted = client.messages.count_tokens(model=MODEL, messages=result, tools=[WEATHER],  # type: ignore[arg-type, list-item]
                                           tool_choice={"type": "none"})
    assert counted.input_tokens == chat.usage.prompt_tokens
    offered = client.messages.count_tokens(model=MODEL, messages=result, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    assert offered.input_tokens > counted.input_tokens  # tools the model may call are written into the prompt


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory, qwen05_path: Path) -> Iterator[tuple[anthropic.Anthropic, str]]:
    """Qwen2.5-Coder-0.5B-Instruct (it decides for itself when to call a tool), served by its path."""
    with Server(tmp_path_factory.mktemp("anthropic-qwen"), str(qwen05_path), *SERVE_ARGS) as server:
        name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        yield anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120), name
        assert_no_traceback(server)


def test_a_model_that_decides_to_call_then_answers_with_the_result(qwen: tuple[anthropic.Anthropic, str]) -> None:
    client, name = qwen
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = client.messages.create(model=name, messages=ask, tools=[WEATHER], **greedy(max_tokens=80))  # type: ignore[arg-type, list-item]
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and all(c.name == "get_weather" and c.input == {"city": "Paris"} for c in calls)
    with client.messages.stream(model=name, messages=ask, tools=[WEATHER], **greedy(max_tokens=80)) as stream:  # type: ignore[arg-type, list-item]
        streamed = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == \
        [(b.type, getattr(b, "input", None)) for b in message.content]
    assert streamed.stop_reason == "tool_use"
    results = [{"type": "tool_result", "tool_use_id": c.id, "content": [{"type": "text", "text": "sunny, 21 C"}]}
               for c in calls]
    history = [*ask, {"role": "assistant", "content": [b.model_dump() for b in message.content]},
               {"role": "user", "content": results}]
    answer = client.messages.create(model=name, messages=history, tools=[WEATHER], tool_choice={"type": "none"},  # type: ignore[arg-type, list-item]
                                    **greedy(max_tokens=80))
    assert answer.stop_reason == "end_turn" and [b.type for b in answer.content] == ["text"]
    assert "sunny" in text_of(answer).lower() or "21" in text_of(answer)


def user(*blocks: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(blocks)}]


TEXT = {"type": "text", "text": "Hi"}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
BMP = {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG}}
BAD: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("unknown model", {"model": "no-such-model"}, anthropic.NotFoundError, "no-such-model"),
    ("max_tokens 0", {"max_tokens": 0}, anthropic.BadRequestError, "max_tokens"),
    ("temperature above 1", {"extra_body": {"temperature": 1.5}}, anthropic.BadRequestError, "temperature"),
    ("temperature a string", {"extra_body": {"temperature": "hot"}}, anthropic.BadRequestError, "temperature"),
    ("top_k negative", {"extra_body": {"top_k": -1}}, anthropic.BadRequestError, "top_k"),
    ("no messages", {"messages": []}, anthropic.BadRequestError, "messages"),
    ("a system role", {"messages": [{"role": "system", "content": "Hi"}]}, anthropic.BadRequestError,
     "messages[0].role"),
    ("a document block", {"messages": user(TEXT, {"type": "document", "source": {}})}, anthropic.BadRequestError,
     "messages[0].content[1].type"),
    ("a prefilled answer", {"messages": [*ASK, {"role": "assistant", "content": "The capital"}]},
     anthropic.BadRequestError, "messages[1].role"),
    ("an image to a text model", {"system": "Be brief.", "messages": user(TEXT, IMAGE)}, anthropic.BadRequestError,
     "messages[0].content[1]"),
    ("an image of another type", {"messages": user(BMP)},
     anthropic.BadRequestError, "messages[0].content[0].source.media_type"),
    ("extended thinking", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, anthropic.BadRequestError,
     "thinking"),
    ("MCP servers", {"extra_body": {"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}},
     anthropic.BadRequestError, "mcp_servers"),
    ("a service tier", {"service_tier": "priority"}, anthropic.BadRequestError, "service_tier"),
    ("fast", {"speed": "fast"}, anthropic.BadRequestError, "speed"),
    ("effort", {"output_config": {"effort": "high"}}, anthropic.BadRequestError, "output_config.effort"),
    ("a bad output schema", {"output_config": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}},
     anthropic.BadRequestError, "output_config.format"),
    ("an empty stop sequence", {"stop_sequences": [""]}, anthropic.BadRequestError, "stop_sequences"),
    ("a server tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, anthropic.BadRequestError,
     "tools[0].type"),
    ("a tool without a schema", {"tools": [{"name": "f"}]}, anthropic.BadRequestError, "tools[0].input_schema"),
    ("a choice of no tool", {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
     anthropic.BadRequestError, "tool_choice"),
    ("a result of no call", {"messages": user({"type": "tool_result", "tool_use_id": "toolu_x", "content": "sunny"})},
     anthropic.BadRequestError, "messages[0].content[0].tool_use_id"),
    ("a system prompt of a number", {"system": 42}, anthropic.BadRequestError, "system"),
]


@pytest.mark.parametrize(("case", "kwargs", "error", "named"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests(client: anthropic.Anthropic, case: str, kwargs: dict[str, Any], error: type[Exception],
                      named: str) -> None:
    with pytest.raises(error) as caught:
        client.messages.create(**{"model": MODEL, "messages": ASK, **greedy(**kwargs)})
    assert isinstance(caught.value, anthropic.APIStatusError)
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == ("not_found_error" if error is anthropic.NotFoundError else "invalid_request_error")
    assert named in body["error"]["message"]
    assert text_of(create(client, max_tokens=2))  # still serving


def test_raw_requests_name_the_field(server: Server, client: anthropic.Anthropic) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    missing = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "messages": ASK}, headers=headers)
    assert missing.status_code == 400
    assert missing.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "max_tokens: is required"}}
    nowhere = httpx.post(f"{server.url}/v1/messages/nowhere", json={}, headers=headers)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "not_found_error"
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        broken = httpx.post(f"{server.url}{path}", content=b"{", headers=headers)
        assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    assert text_of(create(client, max_tokens=2))


def test_the_key_is_taken_as_x_api_key_or_bearer(server: Server) -> None:
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=MODEL, messages=ASK, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                            "message": caught.value.body["error"]["message"]}}  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model=MODEL, messages=ASK)  # type: ignore[arg-type]
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0)
    assert text_of(bearer.messages.create(model=MODEL, messages=ASK, max_tokens=2))  # type: ignore[arg-type]
    # The OpenAI API: a bad key is an authentication_error in its shape; x-api-key opens it too.
    refused = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401
    assert (refused.json()["error"]["type"], refused.json()["error"]["code"]) == ("authentication_error",
                                                                               "invalid_api_key")
    assert httpx.get(f"{server.url}/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert httpx.get(f"{server.url}/api/tags", headers={"x-api-key": "wrong"}).status_code == 401


def test_output_config_format_holds_the_answer_to_a_schema(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    message = create(client, [{"role": "user", "content": "What is 2 + 2?"}], max_tokens=40,
                     output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.stop_reason == "end_turn"
    answer = json.loads(text_of(message))
    assert set(answer) == {"answer"} and isinstance(answer["answer"], int)
