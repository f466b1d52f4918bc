"""Structured output and tool calling through the server: the official `openai` and `ollama` clients against
real `slm serve` subprocesses (SmolLM2, which has no tool-call format of its own, beside a remote model; and
Qwen2.5-Coder-0.5B, whose chat template writes calls in <tool_call> tags)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest

from faults import FaultServer
from serving import SERVE_ARGS, Server, assert_no_traceback, assert_same_up_to_near_ties
from structured_cases import SCHEMAS

MODEL = "smollm2"
REMOTE = "fault:ok"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 120}
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                      "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                         "parameters": WEATHER_PARAMETERS}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = SCHEMAS[0][2]


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultServer]:
    server = FaultServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, faults: FaultServer) -> Iterator[Server]:
    """SmolLM2 (eight requests at a time) and a remote model, on one server."""
    workdir = tmp_path_factory.mktemp("structured")
    config = workdir / "config.toml"
    config.write_text(f'[providers.fault]\nbase_url = "{faults.url}"\n')
    with Server(workdir, MODEL, REMOTE, *SERVE_ARGS, "--parallel", "8", env={"SLM_CONFIG": str(config)}) as s:
        yield s
        assert_no_traceback(s)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory, qwen05_path: Path) -> Iterator[Server]:
    """Qwen2.5-Coder-0.5B-Instruct, served by its path."""
    with Server(tmp_path_factory.mktemp("qwen"), str(qwen05_path), *SERVE_ARGS) as s:
        yield s
        assert_no_traceback(s)


@pytest.fixture(scope="module")
def qwen_client(qwen: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def qwen_name(qwen_client: openai.OpenAI) -> str:
    [model] = qwen_client.models.list().data
    return model.id


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        **{"model": MODEL, "messages": kwargs.pop("messages", ASK_WEATHER), **GREEDY, **kwargs})


def json_schema(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def assert_serves(client: openai.OpenAI) -> None:
    """The server still answers a good request after a bad one."""
    assert chat(client, max_tokens=4).choices[0].message.content


def streamed_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    """The tool calls of a stream, checked to come as OpenAI streams them: for each call, first its index, id,
    type and name with empty arguments, then its arguments."""
    calls: list[dict[str, Any]] = []
    for chunk in chunks:
        for choice in chunk.choices:
            for part in choice.delta.tool_calls or []:
                if part.id is not None:
                    assert part.index == len(calls)
                    assert part.type == "function" and part.function.name and part.function.arguments == ""
                    calls.append({"id": part.id, "name": part.function.name, "arguments": ""})
                else:
                    assert part.index == len(calls) - 1 and part.function.name is None
                    calls[part.index]["arguments"] += part.function.arguments
    return calls


# --- structured output, OpenAI ------------------------------------------------------------------


def test_json_schema_answer_validates(client: openai.OpenAI) -> None:
    reply = chat(client, messages=[{"role": "user", "content": SCHEMAS[0][1]}], response_format=json_schema(PERSON))
    [choice] = reply.choices
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_answer_is_an_object(client: openai.OpenAI) -> None:
    reply = chat(client, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                 response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    text = chat(client, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
                response_format={"type": "text"})
    assert text.choices[0].message.content


def test_streamed_equals_one_shot_under_a_schema(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": SCHEMAS[1][1]}]
    one = chat(client, messages=messages, response_format=json_schema(SCHEMAS[1][2]))
    chunks = list(chat(client, messages=messages, response_format=json_schema(SCHEMAS[1][2]), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == one.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(one.choices[0].message.content), SCHEMAS[1][2])


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    age: int


def test_the_sdk_parses_into_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": SCHEMAS[0][1]}],
                                          response_format=Person, **GREEDY)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert parsed.name


def test_completions_take_a_response_format(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="A person, as JSON:", **GREEDY,
                                      extra_body={"response_format": json_schema(PERSON)})  # as llama.cpp's
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


GROUPS = [SCHEMAS[i : i + 8] for i in range(0, len(SCHEMAS), 8)]


@pytest.mark.parametrize("group", GROUPS, ids=[f"{g[0][0]}..{g[-1][0]}" for g in GROUPS])
def test_concurrent_constrained_requests_equal_the_same_requests_one_at_a_time(
    server: Server, client: openai.OpenAI, group: list[tuple[str, str, dict[str, Any]]]
) -> None:
    def ask(case: tuple[str, str, dict[str, Any]]) -> Any:
        _, prompt, schema = case
        return chat(client, messages=[{"role": "user", "content": prompt}], response_format=json_schema(schema),
                    logprobs=True, top_logprobs=5)

    alone = [ask(case) for case in group]
    steps = server.stats(MODEL)["steps"]
    with ThreadPoolExecutor(len(group)) as pool:
        together = list(pool.map(ask, group))
    generated = sum(r.usage.completion_tokens for r in together)
    assert server.stats(MODEL)["steps"] - steps < generated  # the requests really shared engine steps
    for (name, _, schema), single, batched in zip(group, alone, together, strict=True):
        for reply in (single, batched):
            assert reply.choices[0].finish_reason == "stop", name
            jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        assert_same_up_to_near_ties(name, single.choices[0], batched.choices[0])


# --- tool calls, OpenAI ---------------------------------------------------------------------------


def test_a_required_call_is_valid(client: openai.OpenAI) -> None:
    reply = chat(client, tools=[WEATHER], tool_choice="required", n=2)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    assert reply.choices[0].message.tool_calls[0].id != reply.choices[1].message.tool_calls[0].id


def test_a_named_tool_is_the_one_called(client: openai.OpenAI) -> None:
    reply = chat(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
                 parallel_tool_calls=False)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)


def test_a_streamed_call_equals_the_one_shot_call(client: openai.OpenAI) -> None:
    one = chat(client, tools=[WEATHER], tool_choice="required").choices[0]
    chunks = list(chat(client, tools=[WEATHER], tool_choice="required", stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == one.finish_reason == "tool_calls"
    assert all(c.finish_reason is None for chunk in chunks[:-1] for c in chunk.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    [call] = streamed_calls(chunks)
    assert (call["name"], call["arguments"]) == (one.message.tool_calls[0].function.name,
                                                 one.message.tool_calls[0].function.arguments)


def test_tool_choice_none_answers_in_words(client: openai.OpenAI) -> None:
    reply = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=16).choices[0]
    assert reply.message.tool_calls is None
    assert reply.message.content and reply.finish_reason in ("stop", "length")


# --- a whole round trip on a model with its own call format --------------------------------------

WEATHER_REPORT = json.dumps({"temperature_c": 22, "sky": "sunny"})


def round_trip(client: openai.OpenAI, name: str, stream: bool) -> tuple[dict[str, Any], Any]:
    """Ask, get a call, answer it with the tool's result, get the final answer: (the call, the final reply)."""
    settings: dict[str, Any] = {"model": name, "tools": [WEATHER], **GREEDY}
    if stream:
        chunks = list(client.chat.completions.create(messages=ASK_WEATHER, tool_choice="required", stream=True,
                                                     **settings))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        [call] = streamed_calls(chunks)
    else:
        first = client.chat.completions.create(messages=ASK_WEATHER, tool_choice="required", **settings).choices[0]
        assert first.finish_reason == "tool_calls" and first.message.content is None
        [made] = first.message.tool_calls
        call = {"id": made.id, "name": made.function.name, "arguments": made.function.arguments}
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_PARAMETERS)
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": WEATHER_REPORT},
    ]
    # Offered the tool again ("auto"), this 0.5B model calls it again; "none" asks for the answer in words.
    if stream:
        chunks = list(client.chat.completions.create(messages=messages, tool_choice="none", stream=True, **settings))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert not streamed_calls(chunks)
        return call, (text, chunks[-1].choices[0].finish_reason)
    final = client.chat.completions.create(messages=messages, tool_choice="none", **settings).choices[0]
    assert final.message.tool_calls is None
    return call, (final.message.content, final.finish_reason)


def test_a_tool_call_round_trip_streamed_equals_one_shot(qwen_client: openai.OpenAI, qwen_name: str) -> None:
    call, (text, finish) = round_trip(qwen_client, qwen_name, stream=False)
    assert finish == "stop"
    assert "22" in text  # the answer read the tool's result
    streamed_call, streamed = round_trip(qwen_client, qwen_name, stream=True)
    assert (streamed_call["name"], streamed_call["arguments"]) == (call["name"], call["arguments"])
    assert streamed == (text, finish)


# --- Ollama ---------------------------------------------------------------------------------------


def test_ollama_format_schema_validates(ollama_client: ollama.Client) -> None:
    reply = ollama_client.chat(MODEL, [{"role": "user", "content": SCHEMAS[0][1]}], format=PERSON,
                               options={"temperature": 0, "num_predict": 120})
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), PERSON)
    parts = list(ollama_client.chat(MODEL, [{"role": "user", "content": SCHEMAS[0][1]}], format=PERSON,
                                    options={"temperature": 0, "num_predict": 120}, stream=True))
    assert "".join(p.message.content for p in parts) == reply.message.content


def test_ollama_format_json_and_generate(ollama_client: ollama.Client) -> None:
    reply = ollama_client.chat(MODEL, [{"role": "user", "content": "Describe Paris."}], format="json",
                               options={"temperature": 0, "num_predict": 120})
    assert isinstance(json.loads(reply.message.content), dict)
    generated = ollama_client.generate(MODEL, SCHEMAS[0][1], format=PERSON, options={"temperature": 0,
                                                                                     "num_predict": 120})
    jsonschema.validate(json.loads(generated.response), PERSON)


def test_ollama_tool_calls_have_object_arguments(qwen: Server, qwen_name: str) -> None:
    client = ollama.Client(host=qwen.url, timeout=120)
    options = {"temperature": 0, "num_predict": 120}
    reply = client.chat(qwen_name, ASK_WEATHER, tools=[WEATHER], options=options)
    assert reply.done_reason == "stop"
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict)
    jsonschema.validate(call.function.arguments, WEATHER_PARAMETERS)
    # Streamed, as Ollama streams them: the calls in a message line of their own, then the done line.
    parts = list(client.chat(qwen_name, ASK_WEATHER, tools=[WEATHER], options=options, stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done
    assert [c.model_dump() for c in with_calls[0].message.tool_calls] == [c.model_dump() for c in
                                                                          reply.message.tool_calls]
    assert parts[-1].done and not parts[-1].message.tool_calls
    # The call and its result go back as Ollama's clients send them (a tool message with tool_name, no id).
    answered = client.chat(qwen_name, [*ASK_WEATHER, reply.message,
                                       {"role": "tool", "tool_name": "get_weather", "content": WEATHER_REPORT}],
                           tools=[WEATHER], options=options)
    assert answered.done


# --- bad input: a 400 naming the field, before anything is generated -------------------------------

SCHEMA_FIELD = "response_format.json_schema.schema"
MANY_TOOLS = [
    {"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Look up fact number {i} about the weather, the time or the news",
        "parameters": {"type": "object", "properties": {"place": {"type": "string"}, "day": {"type": "string"}}}}}
    for i in range(120)
]
CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}

BAD_CHATS: list[tuple[str, dict[str, Any], str]] = [
    ("schema llguidance cannot compile", {"response_format": json_schema({"type": "strin"})}, SCHEMA_FIELD),
    ("unsupported keyword", {"response_format": json_schema({"type": "array", "uniqueItems": True})}, SCHEMA_FIELD),
    ("bad pattern", {"response_format": json_schema({"type": "string", "pattern": "[a-"})}, SCHEMA_FIELD),
    ("json_schema without one", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("tool_choice naming an unknown tool",
     {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("tools beyond the context", {"tools": MANY_TOOLS}, "tools"),
    ("response_format with tools", {"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ("a tool message answering no call",
     {"messages": [*ASK_WEATHER, CALLED, {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]},
     "messages[2].tool_call_id"),
    ("call arguments that are not JSON",
     {"messages": [*ASK_WEATHER, {**CALLED, "tool_calls": [{**CALLED["tool_calls"][0], "function": {
         "name": "get_weather", "arguments": "{oops"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    ("a tool without a name", {"tools": [{"type": "function", "function": {"parameters": {}}}]},
     "tools[0].function.name"),
]


@pytest.mark.parametrize(("case", "kwargs", "field"), BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_structured_request(client: openai.OpenAI, case: str, kwargs: dict[str, Any], field: str,
                                stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, stream=stream, **kwargs)
    error = caught.value
    assert error.status_code == 400
    assert error.param == field
    assert field in str(error)
    if case == "tools beyond the context":
        assert error.code == "context_length_exceeded"
    assert_serves(client)


BAD_OLLAMA: list[tuple[str, dict[str, Any], str]] = [
    ("format schema llguidance cannot compile", {"format": {"type": "strin"}}, "format"),
    ("format with an unsupported keyword", {"format": {"type": "array", "uniqueItems": True}}, "format"),
    ("format with a bad pattern", {"format": {"type": "string", "pattern": "[a-"}}, "format"),
    ("tools beyond the context", {"tools": MANY_TOOLS}, "tools"),
    ("format with tools", {"tools": [WEATHER], "format": "json"}, "format"),
    ("call arguments not an object", {"messages": [*ASK_WEATHER, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": [1]}}]}]}, "messages[1].tool_calls[0].function.arguments"),
]


BAD_OLLAMA_CALLS = [("/api/chat", *case) for case in BAD_OLLAMA] + [
    ("/api/generate", *case) for case in BAD_OLLAMA if case[0].startswith("format") and "tools" not in case[1]]


@pytest.mark.parametrize(("path", "case", "fields", "needle"), BAD_OLLAMA_CALLS,
                         ids=[f"{c[0]} {c[1]}" for c in BAD_OLLAMA_CALLS])
def test_bad_ollama_request(server: Server, ollama_client: ollama.Client, path: str, case: str,
                            fields: dict[str, Any], needle: str) -> None:
    body = {"model": MODEL, "messages": ASK_WEATHER, "prompt": "Describe a person.", **fields}
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]
    assert ollama_client.chat(MODEL, ASK_WEATHER, options={"num_predict": 4}).message.content


def test_the_ollama_client_raises_for_a_bad_format(ollama_client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(MODEL, ASK_WEATHER, format={"type": "strin"})
    assert caught.value.status_code == 400
    assert "format" in caught.value.error
    assert ollama_client.chat(MODEL, ASK_WEATHER, options={"num_predict": 4}).message.content


def test_a_remote_model_refuses_tools_and_schemas_before_calling_upstream(
    server: Server, client: openai.OpenAI, faults: FaultServer
) -> None:
    before = faults.hits["ok"]
    refused = [({"tools": [WEATHER]}, "tools"), ({"response_format": json_schema(PERSON)}, "response_format"),
               ({"response_format": {"type": "json_object"}}, "response_format")]
    for kwargs, field in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, model=REMOTE, **kwargs)
        assert caught.value.param == field
        assert "remote" in str(caught.value)
    response = httpx.post(f"{server.url}/api/chat", json={"model": REMOTE, "messages": ASK_WEATHER, "format": "json"})
    assert response.status_code == 400 and "format" in response.json()["error"]
    assert faults.hits["ok"] == before  # nothing reached the upstream
    assert chat(client, model=REMOTE).choices[0].message.content
    assert faults.hits["ok"] == before + 1
