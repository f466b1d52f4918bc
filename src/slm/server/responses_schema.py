"""The body of ``POST /v1/responses``: OpenAI's Responses API request, parsed into one typed object.

It shares the sampling fields (and slm's extensions to them) with the chat endpoint through
``OpenAISampling``; what differs is the input (a string or message items), ``instructions``,
``max_output_tokens``, ``text.format`` (the grammar) and ``store``/``previous_response_id``. Tools and
images are refused by name rather than dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from slm.errors import InvalidParameter
from slm.generation.constraints import Grammar
from slm.generation.params import GenerationParams
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
    input: Annotated[Annotated[str, Tag("str")] | Annotated[list[InputMessage], Tag("list[items]")], _DISCRIMINATED]
    instructions: str | None = None
    max_output_tokens: int | None = None
    text: TextOptions | None = None
    store: bool = True
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None

    def messages(self) -> list[dict[str, str]]:
        """This request's input as chat messages (without ``instructions``, which do not carry over to a
        response that continues this one)."""
        if self.tools:
            raise InvalidParameter("tools", "tools are not supported on /v1/responses yet; use /v1/chat/completions")
        if isinstance(self.input, str):
            if not self.input:
                raise InvalidParameter("input", "must not be empty")
            return [{"role": "user", "content": self.input}]
        if not self.input:
            raise InvalidParameter("input", "must not be empty")
        return [m.as_dict() for m in self.input]

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
            "parallel_tool_calls": True,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "temperature": params.temperature,
            "text": {"format": format_.model_dump(by_alias=True, exclude_none=True) if format_ else {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": params.top_p,
            "truncation": "disabled",
        }
