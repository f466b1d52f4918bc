"""The body of ``POST /v1/responses``: OpenAI's Responses API request, parsed into one typed object.

It shares the sampling fields (and slm's extensions to them) with the chat endpoint through
``OpenAISampling``; what differs is the input (a string or message items), ``instructions``,
``max_output_tokens``, ``text.format`` (the grammar), ``store``/``previous_response_id``, and tools in the
Responses API's flat form, whose calls and results come back as ``function_call`` and
``function_call_output`` items. Images are refused by name rather than dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from slm.errors import InvalidParameter
from slm.generation.constraints import Grammar
from slm.generation.params import GenerationParams
from slm.generation.tool_use import ToolUse
from slm.server.schemas import OpenAISampling, Strict


def _str_or_list(value: object) -> str:
    return "str" if isinstance(value, str) else "list[items]"


# A string or a list of T; a bad list's error names the item and field at fault, not "should be a string".
_DISCRIMINATED = Discriminator(_str_or_list)


class InputText(Strict):
    """A text part: ``input_text`` in a user's message, ``output_text`` in an assistant's (a reply sent back)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(Strict):
    """A message item: ``{"role": ..., "content": "..." | [parts]}`` (``type: "message"`` optional)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[Annotated[str, Tag("str")] | Annotated[list[InputText], Tag("list[items]")], _DISCRIMINATED]

    def as_dict(self) -> dict[str, str]:
        """The message as the chat template takes it ("developer" is the newer name of "system")."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class FunctionCall(Strict):
    """A call the model made (an earlier response's output item, sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None

    def as_call(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class FunctionCallOutput(Strict):
    """What a call returned."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


def _item_type(value: object) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else "message"
    return {"function_call": "FunctionCall", "function_call_output": "FunctionCallOutput"}.get(kind, "InputMessage")


# An item is told by its type (a message's is optional); tags are class names, which error paths leave out.
Item = Annotated[Annotated[InputMessage, Tag("InputMessage")] | Annotated[FunctionCall, Tag("FunctionCall")]
                 | Annotated[FunctionCallOutput, Tag("FunctionCallOutput")], Discriminator(_item_type)]


def as_messages(items: list[InputMessage | FunctionCall | FunctionCallOutput]) -> list[dict[str, Any]]:
    """Items as the chat template takes them: calls join the assistant message before them (or one of their
    own), results are tool messages."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, FunctionCall):
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            last.setdefault("tool_calls", []).append(item.as_call())
        elif isinstance(item, FunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            messages.append(item.as_dict())
    return messages


def _chat_tool(tool: object) -> object:
    """A flat Responses function tool (``{type, name, description, parameters}``) as the bare form ``Tool.of``
    reads; anything else as it is, for ``Tool.of`` to name what is wrong."""
    if isinstance(tool, dict) and tool.get("type") == "function" and "function" not in tool:
        return {k: v for k, v in tool.items() if k in ("name", "description", "parameters")}
    return tool


class TextFormat(Strict):
    """``text.format``: ``text``, ``json_object`` (any JSON object) or ``json_schema`` (``{name, schema, strict}``,
    flat as the Responses API has it; the answer always follows the schema, strict or not)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def grammar(self) -> Grammar | None:
        if self.type == "json_object":
            return Grammar.any_json("text.format")
        if self.type == "json_schema":
            return Grammar.json_schema(self.schema_ or {"type": "object"}, "text.format.schema")
        return None


class TextOptions(Strict):
    format: TextFormat | None = None


class ResponsesRequest(OpenAISampling):
    input: Annotated[Annotated[str, Tag("str")] | Annotated[list[Item], Tag("list[items]")], _DISCRIMINATED]
    instructions: str | None = None
    max_output_tokens: int | None = None
    text: TextOptions | None = None
    store: bool = True
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None

    def messages(self) -> list[dict[str, Any]]:
        """This request's input as chat messages (without ``instructions``, which do not carry over to a
        response that continues this one)."""
        if not self.input:
            raise InvalidParameter("input", "must not be empty")
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return as_messages(self.input)

    def tool_use(self) -> ToolUse | None:
        """The tools offered and how they must be used (None: no tools)."""
        tools = [_chat_tool(t) for t in self.tools] if self.tools else None
        return ToolUse.of(tools, self.tool_choice, self.parallel_tool_calls)

    def grammar(self) -> Grammar | None:
        return self.text.format.grammar() if self.text is not None and self.text.format is not None else None

    def params(self) -> GenerationParams:
        if self.n != 1:
            raise InvalidParameter("n", "a response is one answer: n must be 1")
        try:
            return self._params(self.max_output_tokens, False, 0)
        except InvalidParameter as e:
            if e.field != "max_tokens":
                raise
            raise InvalidParameter("max_output_tokens", e.reason) from None

    def echoed(self, params: GenerationParams) -> dict[str, Any]:
        """The request's settings as a response object repeats them (the sampling ones as used)."""
        format_ = self.text.format if self.text is not None and self.text.format is not None else None
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "temperature": params.temperature,
            "text": {"format": format_.model_dump(by_alias=True, exclude_none=True) if format_ else {"type": "text"}},
            "tool_choice": self.tool_choice or "auto",
            "tools": self.tools or [],
            "top_p": params.top_p,
            "truncation": "disabled",
        }
