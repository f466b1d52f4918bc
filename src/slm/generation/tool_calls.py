"""Tool calling: tools described to the model, its calls constrained to valid arguments, then parsed.

A model whose chat template declares a tool-call format writes calls its own way; the format is read
from the template, never guessed from a file name:

- Hermes / Qwen2.5 (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``),
- Phi-4-mini (``<|tool_call|>[{"name": ..., "arguments": ...}]<|/tool_call|>``).

The template renders the tools itself, and the grammar starts only at the format's opening marker (the
model may answer in words instead) unless a call is required. A model without one (SmolLM2,
Phi-3.5-mini) gets the generic format: the tools are described in the system message, the whole reply
is constrained to a JSON call or a plain answer, and tool results come back as user turns.

Either way the arguments are constrained by each tool's parameter schema, so a call that completes
is valid. ``ToolCallParser`` turns the text back into calls as it streams.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slm.errors import InvalidParameter
from slm.generation.constraints import Grammar, tightened
from slm.generation.stream import Chunk
from slm.generation.tool_use import Tool, ToolCall, ToolUse


def call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """A JSON object ``{"name": ..., "arguments": {...}}`` calling one of ``tools`` with valid arguments."""
    options = [
        {"type": "object", "properties": {"name": {"const": t.name}, "arguments": tightened(t.parameters)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


# --- formats --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes tool calls."""

    name: str
    open: str
    """Text that opens a call ("" for the generic format: a JSON object is the whole reply)."""
    close: str
    native: bool
    """The chat template renders the tools and tool results itself."""
    as_list: bool = False
    """Calls are a JSON list inside one pair of markers (Phi-4-mini) rather than one object per pair."""

    def grammar(self, use: ToolUse) -> Grammar:
        """What the reply (or, for a native format without a forced call, the text after ``open``) may be."""
        call = json.dumps(call_schema(use.offered()))
        if not self.native:
            body = "start: call" if use.forced else "start: call | answer\nanswer: /[^{\\s][\\s\\S]*/"
            return Grammar.lark(f"{body}\ncall: %json {call}", "tools")
        if self.as_list:
            calls = "call (\", \" call)*" if use.parallel else "call"
            body = f'"[" {calls} "]" {json.dumps(self.close)}'
        else:
            more = f'("\\n" {json.dumps(self.open)} "\\n" call "\\n" {json.dumps(self.close)})*' if use.parallel else ""
            body = f'"\\n" call "\\n" {json.dumps(self.close)} {more}'
        head = f"{json.dumps(self.open)} " if use.forced else ""
        trigger = None if use.forced else self.open
        return Grammar.lark(f"start: {head}{body}\ncall: %json {call}", "tools", trigger=trigger)

    def render(self, messages: Sequence[Mapping[str, Any]],
               use: ToolUse) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The conversation and the extra template variables for a request with tools."""
        checked = check_tool_messages(messages)
        if self.native:
            return checked, {"tools": [t.spec() for t in use.tools]}
        return _generic_messages(checked, use), {}

    def parser(self, use: ToolUse | None) -> ToolCallParser:
        return ToolCallParser(self, use)


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", native=True)
PHI4 = ToolFormat("phi4", "<|tool_call|>", "<|/tool_call|>", native=True, as_list=True)
GENERIC = ToolFormat("generic", "", "", native=False)


def detect_format(template: str | None) -> ToolFormat:
    """The tool-call format a chat template declares, or the generic one."""
    if template and "tools" in template:
        if "<tool_call>" in template:
            return HERMES
        if "<|tool_call|>" in template:
            return PHI4
    return GENERIC


GENERIC_PROMPT = (
    "You can call these tools:\n{tools}\n\n"
    'To call a tool, reply with only a JSON object {{"name": <tool name>, "arguments": <arguments object>}}. '
    "Otherwise, answer in plain text."
)


def _generic_messages(messages: list[dict[str, Any]], use: ToolUse) -> list[dict[str, Any]]:
    """The tools in the system message; earlier calls as the JSON the model wrote, results as user turns."""
    tools = "\n".join(json.dumps(t.spec()["function"], ensure_ascii=False) for t in use.tools)
    guide = GENERIC_PROMPT.format(tools=tools)
    out: list[dict[str, Any]] = []
    if messages and messages[0]["role"] == "system":
        out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{guide}"})
        messages = messages[1:]
    else:
        out.append({"role": "system", "content": guide})
    names = {}
    for message in messages:
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and calls:
            written = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
            for c in calls:
                names[c.get("id")] = c["function"]["name"]
            text = "\n".join(json.dumps(w, ensure_ascii=False) for w in written)
            out.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id"), "the tool")
            out.append({"role": "user", "content": f"{name} returned: {message['content']}\n"
                                                   "Answer my question with this result."})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content")})
    return out


def check_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A conversation with tool calls and tool results in the form templates read: each assistant call's
    arguments as an object, every tool result answering a call made before it."""
    calls: dict[str, str] = {}
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message.get("role") == "assistant" and message.get("tool_calls"):
            message["tool_calls"] = [_checked_call(c, f"messages[{i}].tool_calls[{j}]")
                                     for j, c in enumerate(message["tool_calls"])]
            calls.update((c["id"], c["function"]["name"]) for c in message["tool_calls"] if c.get("id"))
            if message.get("content") is None:
                message["content"] = ""
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and call_id not in calls:
                raise InvalidParameter(f"messages[{i}].tool_call_id",
                                       f"{call_id!r} answers no tool call made earlier in the conversation")
            if call_id is not None and not message.get("name"):
                message["name"] = calls[call_id]
        out.append(message)
    return out


def _checked_call(call: object, field: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise InvalidParameter(field, "must be an object {id, type, function: {name, arguments}}")
    function = call.get("function", call)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidParameter(f"{field}.function.name", "must be the called tool's name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise InvalidParameter(f"{field}.function.arguments", "must be a JSON object") from None
    if not isinstance(arguments, Mapping):
        raise InvalidParameter(f"{field}.function.arguments", "must be a JSON object")
    checked = {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
    if call.get("id") is not None:
        checked["id"] = str(call["id"])
    return checked


# --- reading calls back -------------------------------------------------------------------------


class ToolCallParser:
    """Splits a streamed reply into text and tool calls. ``feed`` takes each new piece of text and returns
    the text that is final and the calls completed by it; ``end`` returns what is left (text of a call the
    reply did not finish is given back as text)."""

    def __init__(self, format: ToolFormat, use: ToolUse | None) -> None:
        self.format = format
        self.use = use
        self._held = ""
        self._in_call = False
        self.calls: list[ToolCall] = []
        self._decided = format.native  # generic: the first visible character says call ("{") or text

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.use is None or self.use.choice == "none":
            return text, []
        self._held += text
        if not self.format.native:
            return self._feed_generic()
        out, done = [], []
        while True:
            if not self._in_call:
                at = self._held.find(self.format.open)
                if at < 0:
                    keep = _partial_suffix(self._held, self.format.open)
                    out.append(self._held[: len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep :]
                    break
                out.append(self._held[:at])
                self._held = self._held[at + len(self.format.open) :]
                self._in_call = True
            end = self._held.find(self.format.close)
            if end < 0:
                break
            done.extend(self._parse(self._held[:end]))
            self._held = self._held[end + len(self.format.close) :].lstrip("\n")
            self._in_call = False
        return "".join(out), done

    def _feed_generic(self) -> tuple[str, list[ToolCall]]:
        if not self._decided:
            stripped = self._held.lstrip()
            if not stripped:
                return "", []
            self._decided = True
            self._in_call = stripped.startswith("{")
        if self._in_call:
            return "", []
        text, self._held = self._held, ""
        return text, []

    def end(self, complete: bool) -> tuple[str, list[ToolCall]]:
        """The rest, once the reply ended (``complete``: it was not cut by ``max_tokens``)."""
        held, self._held = self._held, ""
        if self.use is None or self.use.choice == "none":
            return held, []
        if not self.format.native and self._in_call and complete:
            return "", self._parse(held)
        if self._in_call:  # an unfinished call is no call: its text is all there is
            return (self.format.open + held) if self.format.native else held, []
        return held, []

    def chunk(self, chunk: Chunk) -> Chunk:
        """``chunk`` with its text split into text and completed calls; the last chunk says "tool_calls"
        when the reply made any and ended by itself."""
        text, calls = self.feed(chunk.text)
        finish = chunk.finish_reason
        if finish is not None:
            rest, more = self.end(complete=finish != "length")
            text, calls = text + rest, calls + more
            if self.calls and finish == "stop":
                finish = "tool_calls"
        if not calls and text == chunk.text and finish == chunk.finish_reason:
            return chunk
        return dataclasses.replace(chunk, text=text, tool_calls=tuple(calls), finish_reason=finish)

    def _parse(self, text: str) -> list[ToolCall]:
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            return []
        items = value if isinstance(value, list) else [value]
        calls = [ToolCall(item["name"], dict(item.get("arguments") or {})) for item in items
                 if isinstance(item, Mapping) and isinstance(item.get("name"), str)]
        self.calls.extend(calls)
        return calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def with_calls(message: Mapping[str, Any], calls: Sequence[ToolCall]) -> dict[str, Any]:
    """An assistant message that made ``calls`` (to put back into the conversation)."""
    return {**message, "role": "assistant", "tool_calls": [c.spec() for c in calls]}

