"""Tool calling (generation/tool_use.py, generation/tool_calls.py, Model's tools): tools checked where they are
made, the format read from the chat template, calls parsed from a stream however it is cut, and real calls
with valid arguments from SmolLM2 (the generic format) and Qwen2.5-Coder-0.5B (its own <tool_call> format)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jsonschema
import pytest

import slm
from slm.errors import ContextOverflow, InvalidParameter
from slm.generation import GenerationParams
from slm.generation.stream import Chunk
from slm.generation.tool_calls import GENERIC, HERMES, PHI4, detect_format
from slm.generation.tool_use import Tool, ToolCall, ToolUse

GREEDY = GenerationParams(temperature=0, max_tokens=120)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def get_time(city: str, hour24: bool = True, zones: list[str] | None = None,
             style: Literal["short", "long"] = "short") -> str:
    """Tell the time in a city.

    A second paragraph that is not part of the description."""
    return "noon"


# --- tools are checked where they are made ---------------------------------------------------------


def test_a_python_function_becomes_a_tool_from_its_signature_and_docstring() -> None:
    tool = Tool.of(get_time)
    assert tool.name == "get_time" and tool.description == "Tell the time in a city."
    assert tool.parameters == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "hour24": {"type": "boolean"},
        "zones": {"type": "array", "items": {"type": "string"}}, "style": {"enum": ["short", "long"]}}}
    assert Tool.of(WEATHER).spec() == WEATHER
    assert Tool.of(WEATHER["function"]) == Tool.of(WEATHER)


@pytest.mark.parametrize(("tools", "choice", "field"), [
    ([{"type": "retrieval"}], None, "tools[0].type"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
     "tools[0].function.parameters"),
    ([WEATHER, WEATHER], None, "tools"),
    ([WEATHER], "get_time", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (None, "required", "tool_choice"),
    ([], "required", "tool_choice"),
    ("get_weather", None, "tools"),
])
def test_bad_tools_and_choices_are_refused_naming_the_field(tools: object, choice: object, field: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        ToolUse.of(tools, choice)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_the_format_is_read_from_the_chat_template(model: slm.Model, qwen05: slm.Model) -> None:
    assert qwen05.tool_format is HERMES
    assert model.tool_format is GENERIC  # SmolLM2's template knows no tools
    assert detect_format("{% for tool in tools %}<|tool_call|>{% endfor %}") is PHI4
    assert detect_format(None) is GENERIC


# --- calls read back from a stream -------------------------------------------------------------------


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def run_parser(format: object, texts: list[str], use: ToolUse, finish: str = "stop") -> tuple[str, list[ToolCall], str]:
    parser = format.parser(use)  # type: ignore[attr-defined]
    out, calls, last = "", [], ""
    for i, text in enumerate(texts):
        chunk = parser.chunk(Chunk(text, 1, finish_reason=finish if i == len(texts) - 1 else None))
        out += chunk.text
        calls += chunk.tool_calls
        last = chunk.finish_reason or ""
    return out, calls, last


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
@pytest.mark.parametrize(("reply", "text"), [
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n"),
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}\n```', ""),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', ""),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', ""),
])
def test_hermes_calls_are_split_from_the_text_however_the_stream_is_cut(reply: str, text: str, size: int) -> None:
    use = ToolUse.of([WEATHER])
    assert use is not None
    out, calls, finish = run_parser(HERMES, pieces(reply, size), use)
    assert out == text and finish == "tool_calls"
    assert calls and all(c.name == "get_weather" and c.arguments == {"city": "Paris"} for c in calls)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("reply", ["It is sunny in Paris today.", "Use `ls <dir>` and ```python\nprint(1)\n```",
                                   "{not a call} but text"])
def test_text_that_is_no_call_streams_through_unchanged(reply: str) -> None:
    use = ToolUse.of([WEATHER])
    assert use is not None
    for size in (1, 4, 100):
        out, calls, finish = run_parser(HERMES, pieces(reply, size), use)
        assert (out, calls, finish) == (reply, [], "stop")


def test_a_call_cut_by_max_tokens_is_given_back_as_text() -> None:
    use = ToolUse.of([WEATHER])
    assert use is not None
    reply = '<tool_call>\n{"name": "get_weather", "argum'
    out, calls, finish = run_parser(HERMES, pieces(reply, 5), use, finish="length")
    assert (out, calls, finish) == (reply, [], "length")


def test_the_generic_format_is_a_json_call_or_plain_text() -> None:
    use = ToolUse.of([WEATHER])
    assert use is not None
    out, calls, finish = run_parser(GENERIC, pieces(' {"name": "get_weather", "arguments": {"city": "Rome"}}', 4), use)
    assert (out, finish) == ("", "tool_calls") and calls[0].arguments == {"city": "Rome"}
    assert run_parser(GENERIC, pieces("Hello there", 3), use) == ("Hello there", [], "stop")


# --- conversations with calls in them -----------------------------------------------------------


def test_a_tool_result_must_answer_a_call_made_before_it(model: slm.Model) -> None:
    messages = [*PARIS, {"role": "tool", "tool_call_id": "call_x", "content": "sunny"}]
    with pytest.raises(InvalidParameter) as caught:
        model.chat(messages, GREEDY, tools=[WEATHER])
    assert caught.value.field == "messages[1].tool_call_id"
    bad = [*PARIS, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "get_weather",
                                                                                 "arguments": "{oops"}}]}]
    with pytest.raises(InvalidParameter, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        model.chat(bad, GREEDY, tools=[WEATHER])


def test_tools_with_another_constraint_or_beyond_the_context_are_refused(model: slm.Model,
                                                                          smollm2_path: Path) -> None:
    with pytest.raises(InvalidParameter) as caught:
        model.chat(PARIS, GREEDY, tools=[WEATHER], response_format="json")
    assert caught.value.field == "response_format"
    with pytest.raises(InvalidParameter, match="raw completion"):
        model.generate("Hi", GREEDY, tools=[WEATHER])
    many = [{"type": "function", "function": {**WEATHER["function"], "name": f"tool_{i}"}} for i in range(40)]
    with slm.load(str(smollm2_path), n_ctx=256) as small, pytest.raises(ContextOverflow) as overflow:
        small.chat(PARIS, GREEDY, tools=many)
    assert overflow.value.field == "tools" and "40 tools" in str(overflow.value)


# --- real calls ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen05(qwen05_path: Path) -> Iterator[slm.Model]:
    with slm.load(str(qwen05_path), n_ctx=4096, max_sequences=4) as m:
        yield m


def assert_valid(call: ToolCall, tools: list[dict[str, object]]) -> None:
    spec = next(Tool.of(t) for t in tools if Tool.of(t).name == call.name)
    jsonschema.validate(call.arguments, dict(spec.parameters))


def test_a_required_call_on_smollm2_is_valid(model: slm.Model) -> None:
    for choice in ("required", "get_time"):
        answer = model.chat(PARIS, GREEDY, tools=[WEATHER, get_time], tool_choice=choice)
        assert answer.finish_reason == "tool_calls" and answer.text == ""
        (call,) = answer.tool_calls
        assert_valid(call, [WEATHER, Tool.of(get_time).spec()])
        assert choice == "required" or call.name == "get_time"


def test_qwen_calls_in_its_own_format_and_answers_with_the_result(qwen05: slm.Model) -> None:
    answer = qwen05.chat(PARIS, GREEDY, tools=[WEATHER])  # auto: it decides to call
    assert answer.finish_reason == "tool_calls" and answer.tool_calls
    for call in answer.tool_calls:
        assert call.name == "get_weather" and call.arguments["city"] == "Paris"
        assert_valid(call, [WEATHER])
    streamed = list(qwen05.chat_stream(PARIS, GREEDY, tools=[WEATHER]))
    calls = [c for chunk in streamed for c in chunk.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in answer.tool_calls]
    assert streamed[-1].finish_reason == "tool_calls"
    made = answer.tool_calls[0]
    history = [*PARIS, {"role": "assistant", "content": None, "tool_calls": [made.spec()]},
               {"role": "tool", "tool_call_id": made.id, "content": "sunny, 21 C"}]
    final = qwen05.chat(history, GREEDY, tools=[WEATHER], tool_choice="none")
    assert final.finish_reason == "stop" and not final.tool_calls
    assert "sunny" in final.text.lower() or "21" in final.text
    forced = qwen05.chat(PARIS, GREEDY, tools=[WEATHER], tool_choice="required")
    assert forced.finish_reason == "tool_calls"
    assert_valid(forced.tool_calls[0], [WEATHER])


def test_qwen_answers_in_words_when_no_tool_fits(qwen05: slm.Model) -> None:
    question = [{"role": "user", "content": "Explain what a Python list is in one sentence."}]
    answer = qwen05.chat(question, GREEDY, tools=[WEATHER])
    assert answer.finish_reason == "stop" and not answer.tool_calls and answer.text.strip()
