"""The Responses API (/v1/responses), through the official `openai` SDK against a real `slm serve` subprocess."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from faults import ANSWER, FaultServer
from serving import SERVE_ARGS, Server, module_server

MODEL = "smollm2"
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 24}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, "responses")


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def respond(client: openai.OpenAI, input: Any = "What is 2 + 2?", **kwargs: Any) -> Any:
    return client.responses.create(model=MODEL, input=input, **{**GREEDY, **kwargs})


def chat_prompt_tokens(client: openai.OpenAI, messages: list[dict[str, str]]) -> int:
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,  # type: ignore[arg-type]
                                           temperature=0)
    assert reply.usage is not None
    return reply.usage.prompt_tokens


def test_response(client: openai.OpenAI) -> None:
    response = respond(client)
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.model == MODEL
    assert response.created_at > 0
    [item] = response.output
    assert item.type == "message" and item.role == "assistant"
    [part] = item.content
    assert part.type == "output_text"
    assert "4" in response.output_text
    assert response.output_text == part.text
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens == chat_prompt_tokens(client, [{"role": "user", "content": "What is 2 + 2?"}])
    assert 0 < usage.output_tokens <= GREEDY["max_output_tokens"]
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.temperature == 0


def test_same_answer_as_chat(client: openai.OpenAI) -> None:
    """A string input is one user message: the greedy answer is the chat endpoint's."""
    response = respond(client, "Name a colour.")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                          temperature=0, max_tokens=GREEDY["max_output_tokens"])
    assert response.output_text == chat.choices[0].message.content


def test_out_of_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = respond(client, "Tell me a long story.", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3


def test_streamed_equals_one_shot(client: openai.OpenAI) -> None:
    one = respond(client)
    events = list(respond(client, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert len(deltas) > 1
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", f"response.{one.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    assert text == one.output_text
    done = events[-1].response
    assert done.output_text == text
    assert done.id == events[0].response.id
    assert done.usage is not None and one.usage is not None
    assert done.usage.output_tokens == one.usage.output_tokens
    assert events[-4].text == text


def test_stream_is_sent_as_openai_sends_it(server: Server) -> None:
    """``event:`` lines naming each event, no ``[DONE]``."""
    body = {"model": MODEL, "input": "Hi", "stream": True, **GREEDY, "max_output_tokens": 2}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert "data: [DONE]" not in lines
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in data]


def test_instructions(client: openai.OpenAI) -> None:
    instructions = "You are a pirate. Answer in one short sentence."
    response = respond(client, "Who are you?", instructions=instructions)
    assert response.instructions == instructions
    assert response.usage is not None
    expected = chat_prompt_tokens(client, [{"role": "system", "content": instructions},
                                           {"role": "user", "content": "Who are you?"}])
    assert response.usage.input_tokens == expected


def test_message_items(client: openai.OpenAI) -> None:
    """A list of messages, with content as a string or as ``input_text`` parts, is the chat it stands for."""
    items = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "input_text", "text": "What is the capital"},
                                          {"type": "input_text", "text": " of France?"}]}]
    response = respond(client, items)
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=GREEDY["max_output_tokens"],
                                          messages=[{"role": "system", "content": "Answer briefly."},
                                                    {"role": "user", "content": "What is the capital of France?"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_previous_response_continues_the_conversation(client: openai.OpenAI) -> None:
    first = respond(client, "My name is Ana. Say hello.", instructions="Be brief.")
    second = respond(client, "What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The first turn's input and answer come before the new input; its instructions do not carry over.
    expected = chat_prompt_tokens(client, [{"role": "user", "content": "My name is Ana. Say hello."},
                                           {"role": "assistant", "content": first.output_text},
                                           {"role": "user", "content": "What is my name?"}])
    assert second.usage is not None and second.usage.input_tokens == expected
    alone = respond(client, "What is my name?")
    assert alone.usage is not None and second.usage.input_tokens > alone.usage.input_tokens
    third = respond(client, "And again?", previous_response_id=second.id, stream=True)
    completed = list(third)[-1].response
    assert completed.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_retrieve_and_delete(client: openai.OpenAI) -> None:
    response = respond(client, "Hello!")
    again = client.responses.retrieve(response.id)
    assert again.id == response.id
    assert again.output_text == response.output_text
    deleted = client.responses.delete(response.id)  # the SDK returns nothing for a 200
    assert deleted is None
    with pytest.raises(openai.NotFoundError, match=response.id):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError, match=response.id):
        client.responses.delete(response.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id") as caught:
        respond(client, "Go on.", previous_response_id=response.id)
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    response = respond(client, "Hello!", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_deleted_reply_body(server: Server, client: openai.OpenAI) -> None:
    response = respond(client, "Hello!", max_output_tokens=2)
    reply = httpx.delete(f"{server.url}/v1/responses/{response.id}")
    assert reply.json() == {"id": response.id, "object": "response.deleted", "deleted": True}


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    response = respond(client, "What is 2 + 2? Reply in JSON.", max_output_tokens=40,
                       text={"format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}})
    assert response.status == "completed"
    answer = json.loads(response.output_text)
    assert set(answer) == {"answer"} and isinstance(answer["answer"], int)
    assert response.text.format.type == "json_schema"


def test_tool_calls(client: openai.OpenAI) -> None:
    """A required call is a ``function_call`` item (streamed as one too); its result, sent back as a
    ``function_call_output`` item, continues the conversation, stored or not."""
    ask = {"input": "What is the weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
           "max_output_tokens": 60}
    response = respond(client, **ask)
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert set(json.loads(call.arguments)) == {"city"}
    assert response.output_text == ""
    events = list(respond(client, **ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    streamed = events[-1].response.output[0]
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    assert events[4].arguments == call.arguments
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    follow = respond(client, [result], previous_response_id=response.id, tools=[WEATHER], tool_choice="none")
    assert follow.output_text and follow.output[0].type == "message"
    # The same conversation sent whole, without the store, is the same prompt.
    replayed = respond(client, [{"role": "user", "content": ask["input"]}, call.model_dump(), result],
                       tools=[WEATHER], tool_choice="none", store=False)
    assert replayed.output_text == follow.output_text
    assert replayed.usage is not None and follow.usage is not None
    assert replayed.usage.input_tokens == follow.usage.input_tokens


@pytest.mark.parametrize(("kwargs", "error", "named"), [
    ({"model": "no-such-model"}, openai.NotFoundError, "no-such-model"),
    ({"input": ""}, openai.BadRequestError, "input"),
    ({"input": []}, openai.BadRequestError, "input"),
    ({"input": 42}, openai.BadRequestError, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     openai.BadRequestError, "input[0].content[0].type"),
    ({"temperature": "hot"}, openai.BadRequestError, "temperature"),
    ({"temperature": -1}, openai.BadRequestError, "temperature"),
    ({"max_output_tokens": "many"}, openai.BadRequestError, "max_output_tokens"),
    ({"max_output_tokens": 0}, openai.BadRequestError, "max_output_tokens"),
    ({"extra_body": {"n": 2}}, openai.BadRequestError, "n"),
    ({"previous_response_id": "resp_nope"}, openai.BadRequestError, "resp_nope"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
     openai.BadRequestError, "text.format"),
    ({"tools": [{"type": "web_search"}]}, openai.BadRequestError, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, openai.BadRequestError,
     "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "sunny"}]}, openai.BadRequestError,
     "call_x"),
])
def test_bad_requests(client: openai.OpenAI, kwargs: dict[str, Any], error: type[Exception], named: str) -> None:
    with pytest.raises(error) as caught:
        client.responses.create(**{"model": MODEL, "input": "Hi", **GREEDY, **kwargs})
    assert named in str(caught.value)
    assert respond(client, max_output_tokens=2).output_text  # still serving


def test_behind_the_api_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    with Server(tmp_path_factory.mktemp("responses-key"), "smollm2", *SERVE_ARGS, "--api-key", "secret") as locked:
        url = f"{locked.url}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).responses.create(model=MODEL, input="Hi")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).responses.retrieve("resp_x")
        keyed = openai.OpenAI(base_url=url, api_key="secret", max_retries=0, timeout=60)
        response = keyed.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        assert keyed.responses.retrieve(response.id).id == response.id


def test_a_remote_model_and_an_error_mid_stream(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A remote model answers through the same path; a stream cut upstream after some text ends with OpenAI's
    ``error`` event (the status line was sent), never a ``response.completed``."""
    faults = FaultServer()
    home = tmp_path_factory.mktemp("responses-remote")
    config = home / "config.toml"
    config.write_text(f'[providers.fault]\nbase_url = "{faults.url}"\n')
    try:
        with Server(home, "fault:ok", "fault:cut", env={"SLM_CONFIG": str(config)}) as remote:
            client = openai.OpenAI(base_url=f"{remote.url}/v1", api_key="x", max_retries=0, timeout=60)
            assert client.responses.create(model="fault:ok", input="Hi").output_text == "".join(ANSWER)
            events = list(client.responses.create(model="fault:cut", input="Hi", stream=True))
            assert [e.type for e in events[:4]] == ["response.created", "response.in_progress",
                                                    "response.output_item.added", "response.content_part.added"]
            assert events[-1].type == "error" and "before the answer did" in events[-1].message
            assert [e.type for e in events[4:-1]] == ["response.output_text.delta"] * 2  # the text before the cut
            assert [e.sequence_number for e in events] == list(range(len(events)))
            assert "Traceback" not in remote.log()
    finally:
        faults.close()


def test_bad_json(server: Server) -> None:
    reply = httpx.post(f"{server.url}/v1/responses", content=b"{not json", timeout=30)
    assert reply.status_code == 400
    assert "JSON" in reply.json()["error"]["message"]
    reply = httpx.get(f"{server.url}/v1/responses/resp_unknown", timeout=30)
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "invalid_request_error"
