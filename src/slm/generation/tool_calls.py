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
import re
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


CALL_STRICT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""A call the grammar holds from its first token is written on one line, as JSON answers are."""
CALL_LOOSE = {"whitespace_flexible": True, "whitespace_pattern": "[ \\t\\n]{0,8}"}
"""A call the model began by itself may go on in the layout it chose (a few spaces or newlines at a time)."""


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes tool calls."""

    name: str
    native: bool
    """The chat template renders the tools and tool results itself."""
    open: str = ""
    """Text that opens a call (or, ``as_list``, the list of calls); the generic format has none."""
    close: str = ""
    as_list: bool = False
    """Calls are a JSON list inside one pair of markers (Phi-4-mini) rather than one object per pair."""
    loose: bool = False
    """Also take a call written as a JSON object, bare at the start of the reply or in a ```json fence: what
    small models of the family (Qwen2.5-Coder 0.5B and 1.5B) write as often as the markers."""

    def trigger(self, at_start: bool = True) -> str:
        """Where a call begins in a reply that may be text (a Python regex over the reply; ``at_start``:
        the text searched is the reply's beginning, where a bare JSON call may stand)."""
        pattern = re.escape(self.open)
        if self.loose:
            pattern += r'|```(?:json)?\s*\{\s*"name"' + (r'|\A\s*\{\s*"name"' if at_start else "")
        return pattern

    def grammar(self, use: ToolUse) -> Grammar:
        """What the reply may be: a call from its first token when one is forced, else free text until a call
        begins (the trigger), then the call."""
        schema = call_schema(use.offered())
        if not self.native:
            call = json.dumps({**schema, "x-guidance": CALL_STRICT})
            body = "start: call" if use.forced else "start: call | answer\nanswer: /[^{\\s][\\s\\S]*/"
            return Grammar.lark(f"{body}\ncall: %json {call}", "tools")
        call = json.dumps({**schema, "x-guidance": CALL_STRICT if use.forced else CALL_LOOSE})
        opener, closer = json.dumps(self.open), json.dumps(self.close)
        if self.as_list:
            calls = 'call (", " call)*' if use.parallel else "call"
            tagged = f'{opener} "[" {calls} "]" {closer}'
        else:
            tagged = f'{opener} "\\n"? call "\\n"? {closer}'
        rest = f' ("\\n"* {tagged})*' if use.parallel and not self.as_list else ""
        if use.forced:
            return Grammar.lark(f"start: {tagged}{rest}\ncall: %json {call}", "tools")
        first = f'{tagged} | "```" "json"? "\\n"? call "\\n"? "```" | call' if self.loose else tagged
        lark = f"start: LEAD? first{rest}\nfirst: {first}\nLEAD: /[ \\t\\n]+/\ncall: %json {call}"
        return Grammar.lark(lark, "tools", trigger=self.trigger())

    def render(self, messages: Sequence[Mapping[str, Any]],
               use: ToolUse | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The conversation (its earlier calls and tool results included) and the extra template variables,
        for a request that offers ``use`` (None: no tools, though the conversation may hold some)."""
        checked = check_tool_messages(messages)
        if self.native:
            return checked, {"tools": [t.spec() for t in use.tools]} if use is not None else {}
        return _generic_messages(checked, use), {}

    def parser(self, use: ToolUse | None) -> ToolCallParser:
        return ToolCallParser(self, use)


HERMES = ToolFormat("hermes", native=True, open="<tool_call>", close="</tool_call>", loose=True)
PHI4 = ToolFormat("phi4", native=True, open="<|tool_call|>", close="<|/tool_call|>", as_list=True)
GENERIC = ToolFormat("generic", native=False)


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


def _generic_messages(messages: list[dict[str, Any]], use: ToolUse | None) -> list[dict[str, Any]]:
    """The tools in the system message; earlier calls as the JSON the model wrote, results as user turns."""
    out: list[dict[str, Any]] = []
    if use is not None:
        tools = "\n".join(json.dumps(t.spec()["function"], ensure_ascii=False) for t in use.tools)
        guide = GENERIC_PROMPT.format(tools=tools)
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
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        return messages  # type: ignore[return-value]  # not a conversation: validate_messages says why
    calls: dict[str, str] = {}
    out: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            out.append(message)  # validate_messages names it
            continue
        message = dict(message)
        if message.get("role") == "assistant" and message.get("tool_calls"):
            message["tool_calls"] = [_checked_call(c, f"messages[{i}].tool_calls[{j}]")
                                     for j, c in enumerate(message["tool_calls"])]
            calls.update((c["id"], c["function"]["name"]) for c in message["tool_calls"] if c.get("id"))
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and call_id not in calls:
                raise InvalidParameter(f"messages[{i}].tool_call_id",
                                       f"{call_id!r} answers no tool call made earlier in the conversation")
            if call_id is not None and not message.get("name"):
                message["name"] = calls[call_id]
        if message.get("role") == "assistant" and message.get("content") is None:
            message["content"] = ""  # a reply that was only calls
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
    """Splits a streamed reply into text and tool calls. ``chunk`` rewrites each chunk: text before a call
    streams on (less a tail that may be the start of one), the call's text is held, and the calls are
    read when the reply ends; a call the reply did not finish is given back as text."""

    def __init__(self, format: ToolFormat, use: ToolUse | None) -> None:
        self.format = format
        self.use = use if use is not None and use.choice != "none" else None
        self._trigger = re.compile(format.trigger()) if format.native else None
        self._later = re.compile(format.trigger(at_start=False)) if format.native else None
        self._held = ""
        self._emitted = False  # text before this point went out
        self._in_call = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> str:
        """The part of ``text`` (and of what was held) that is final as text."""
        if self.use is None:
            return text
        self._held += text
        if self._in_call:
            return ""
        if self._trigger is None:  # generic: the first visible character says call ("{") or text
            stripped = self._held.lstrip()
            if not stripped:
                return ""
            self._in_call = stripped.startswith("{")
            out, self._held = ("", self._held) if self._in_call else (self._held, "")
            self.use = self.use if self._in_call else None  # a text answer: the rest streams through
            return out
        match = (self._later if self._emitted else self._trigger).search(self._held)  # type: ignore[union-attr]
        if match is not None:
            out, self._held = self._held[: match.start()], self._held[match.start() :]
            self._in_call = True
            return out
        keep = _maybe_opening(self._held, self._emitted)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        self._emitted = self._emitted or bool(out.strip())
        return out

    def end(self, complete: bool) -> tuple[str, list[ToolCall]]:
        """The rest, once the reply ended (``complete``: it was not cut by ``max_tokens``)."""
        held, self._held = self._held, ""
        if self.use is None or not self._in_call:
            return held, []
        calls, rest = _read_calls(held, self.format) if complete else ([], held)
        if not calls:  # an unfinished call is no call: its text is all there is
            return held, []
        self.calls.extend(calls)
        return rest, calls

    def chunk(self, chunk: Chunk) -> Chunk:
        """``chunk`` with its text split into text and calls; the last chunk says "tool_calls" when the reply
        made any and ended by itself."""
        text = self.feed(chunk.text)
        calls: list[ToolCall] = []
        finish = chunk.finish_reason
        if finish is not None:
            rest, calls = self.end(complete=finish != "length")
            text += rest
            if self.calls and finish == "stop":
                finish = "tool_calls"
        if not calls and text == chunk.text and finish == chunk.finish_reason:
            return chunk
        return dataclasses.replace(chunk, text=text, tool_calls=tuple(calls), finish_reason=finish)


HOLD = 32
"""Characters from a ``<`` or a backtick on that are held back while they may still open a call."""


def _maybe_opening(text: str, emitted: bool) -> int:
    """Characters at the end of ``text`` to hold back: they may begin a call's opening (``<tool_call>``, a
    ```json fence, or, before any text went out, a bare ``{``)."""
    if not emitted and (not text.strip() or (text.lstrip().startswith("{") and len(text.lstrip()) < HOLD)):
        return len(text)
    cut = max(text.rfind("<"), text.rfind("`"))
    while cut > 0 and text[cut - 1] == "`":  # a fence's first backtick
        cut -= 1
    return len(text) - cut if cut >= 0 and len(text) - cut <= HOLD else 0


def _read_calls(text: str, format: ToolFormat) -> tuple[list[ToolCall], str]:
    """The calls written in ``text`` (markers and fences around them dropped) and the text left over."""
    stripped = text
    for marker in (format.open, format.close, "```json", "```"):
        if marker:
            stripped = stripped.replace(marker, "\n")
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at, rest = 0, []
    while at < len(stripped):
        if stripped[at].isspace():
            at += 1
            continue
        try:
            value, at = decoder.raw_decode(stripped, at)
        except json.JSONDecodeError:
            rest.append(stripped[at:])
            break
        values.extend(value if isinstance(value, list) else [value])
    calls = [ToolCall(v["name"], dict(v.get("arguments") or {})) for v in values
             if isinstance(v, Mapping) and isinstance(v.get("name"), str)]
    return calls, "".join(rest).strip()
