"""The body of ``POST /v1/messages`` (and of ``/v1/messages/count_tokens``): Anthropic's Messages API request,
parsed into one typed object and turned into the chat messages, tools and generation parameters slm runs.

Content blocks are told by their ``type``: ``text``, ``image`` (a base64 or URL source, given to the model as
the OpenAI API's image parts are), ``tool_use`` (an assistant's call) and ``tool_result`` (a user's answer to
one); any other block is refused by its place. ``output_config.format`` (or the older ``output_format``), a
JSON schema, holds the answer to it as a grammar. The features slm cannot honour are refused by name: extended
``thinking``, ``output_config.effort``, ``speed`` "fast", ``mcp_servers``, ``container``, ``context_management``
and server tools; an assistant message last (a prefilled answer to continue) too. ``cache_control`` is taken
and ignored: the server reuses shared prefixes of its own accord.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from slm.errors import InvalidParameter
from slm.generation.constraints import Grammar
from slm.generation.params import GenerationParams
from slm.generation.tool_use import ToolUse
from slm.server.schemas import MAX_STOP, Strict, checked_conversation


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class Base64Source(Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class UrlSource(Strict):
    type: Literal["url"]
    url: str


def _source_type(value: object) -> str:
    return "UrlSource" if isinstance(value, dict) and value.get("type") == "url" else "Base64Source"


class ImageBlock(Strict):
    type: Literal["image"]
    source: Annotated[Annotated[Base64Source, Tag("Base64Source")] | Annotated[UrlSource, Tag("UrlSource")],
                      Discriminator(_source_type)]
    cache_control: dict[str, Any] | None = None

    def part(self) -> dict[str, Any]:
        """The image as an OpenAI image part (a data: URI, or the URL for the server to fetch if allowed)."""
        source = self.source
        url = source.url if isinstance(source, UrlSource) else f"data:{source.media_type};base64,{source.data}"
        return {"type": "image_url", "image_url": {"url": url}}


class ToolUseBlock(Strict):
    """A call the model made (an earlier answer's block, sent back)."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None

    def call(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.input}}


class ToolResultBlock(Strict):
    """What a call returned: text, or text blocks."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class OtherBlock(Strict):
    """A block of a type slm does not take (``document``, ``thinking``, ``search_result``...): refused by place."""

    type: str


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | OtherBlock
_BLOCKS = {"text": "TextBlock", "image": "ImageBlock", "tool_use": "ToolUseBlock", "tool_result": "ToolResultBlock"}


def _block_type(value: object) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    return _BLOCKS.get(kind, "OtherBlock") if isinstance(kind, str) else "TextBlock"


# A block is told by its type; tags are class names, which error paths leave out.
AnyBlock = Annotated[Annotated[TextBlock, Tag("TextBlock")] | Annotated[ImageBlock, Tag("ImageBlock")]
                     | Annotated[ToolUseBlock, Tag("ToolUseBlock")] | Annotated[ToolResultBlock, Tag("ToolResultBlock")]
                     | Annotated[OtherBlock, Tag("OtherBlock")], Discriminator(_block_type)]


def _str_or_list(value: object) -> str:
    return "str" if isinstance(value, str) else "list[blocks]"


class Message(Strict):
    role: Literal["user", "assistant"]
    content: Annotated[Annotated[str, Tag("str")] | Annotated[list[AnyBlock], Tag("list[blocks]")],
                       Discriminator(_str_or_list)]


class AnthropicTool(Strict):
    """A client tool: ``{name, description, input_schema}`` (``type`` "custom" or none). Anthropic's server
    tools (web search, code execution...) have a dated ``type`` and are refused."""

    name: str
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Strict):
    type: str
    budget_tokens: int | None = None


class Metadata(Strict):
    user_id: str | None = None


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: OutputFormat | None = None
    effort: str | None = None


REFUSED = {
    "mcp_servers": "MCP servers are not supported by this server",
    "container": "containers (code execution) are not supported by this server",
    "context_management": "context management is not supported by this server",
}
"""Request fields of features slm does not have: refused by name, never dropped."""


class MessagesInput(Strict):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share: the model and what it is asked."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: Annotated[Annotated[str, Tag("str")] | Annotated[list[TextBlock], Tag("list[blocks]")],
                      Discriminator(_str_or_list)] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    """Taken only as ``{"type": "disabled"}``: slm's models do not think apart from their answer."""
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None
    """The older name of ``output_config.format``."""
    speed: str | None = None
    cache_control: dict[str, Any] | None = None
    """Taken and ignored: the server reuses shared prefixes without being asked."""
    mcp_servers: Any = None
    container: Any = None
    context_management: Any = None

    def check(self) -> None:
        """Refuse by name what cannot be honoured."""
        for name, why in REFUSED.items():
            if getattr(self, name) is not None:
                raise InvalidParameter(name, why)
        if self.thinking is not None and self.thinking.type != "disabled":
            raise InvalidParameter("thinking", "extended thinking is not supported by this server (leave it out, "
                                   "or send {\"type\": \"disabled\"})")
        if self.output_config is not None and self.output_config.effort is not None:
            raise InvalidParameter("output_config.effort", "effort (how much to think) is not supported by this "
                                   "server")
        if self.speed not in (None, "standard"):
            raise InvalidParameter("speed", f"only standard speed is served here, got {self.speed!r}")
        if self.messages[-1].role != "user":
            raise InvalidParameter(f"messages[{len(self.messages) - 1}].role",
                                   "the last message must be the user's: continuing a prefilled assistant answer "
                                   "is not supported by this server")

    def conversation(self) -> Conversation:
        """The system prompt and messages as the chat template takes them, with where each came from."""
        self.check()
        conversation = Conversation()
        if self.system:
            text = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            conversation.add({"role": "system", "content": text}, "system", {})
        for i, message in enumerate(self.messages):
            conversation.add_message(message, f"messages[{i}]")
        conversation.check()
        return conversation

    def tool_use(self) -> ToolUse | None:
        """The tools offered and how they must be used (None: none)."""
        for i, tool in enumerate(self.tools or ()):
            if tool.type not in (None, "custom"):
                raise InvalidParameter(f"tools[{i}].type", f"server tools are not supported by this server, got "
                                       f"{tool.type!r} (a client tool has a name, description and input_schema)")
            if tool.input_schema is None:
                raise InvalidParameter(f"tools[{i}].input_schema", "is required")
        tools = [{"name": t.name, "description": t.description or "", "parameters": t.input_schema}
                 for t in self.tools] if self.tools else None
        choice = self.tool_choice
        wanted: str | None = None
        parallel = None
        if choice is not None:
            if choice.type == "tool" and not choice.name:
                raise InvalidParameter("tool_choice.name", "is required with type tool")
            wanted = {"auto": "auto", "any": "required", "none": "none", "tool": choice.name}[choice.type]
            parallel = None if choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
        try:
            return ToolUse.of(tools, wanted, parallel)
        except InvalidParameter as e:
            raise InvalidParameter(re.sub(r"\.parameters$", ".input_schema", e.field), e.reason) from None


class Conversation:
    """Chat messages made from an Anthropic request, and the request's place of each message and part, so
    that an error about ``messages[2].content[0]`` names where the client put it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.places: dict[str, str] = {}
        self.images: list[str] = []
        """The request's places of its images."""

    def add(self, message: dict[str, Any], place: str, parts: dict[int, str]) -> None:
        at = f"messages[{len(self.messages)}]"
        self.places[at] = place
        self.places.update((f"{at}.content[{j}]", where) for j, where in parts.items())
        self.messages.append(message)

    def add_message(self, message: Message, place: str) -> None:
        """One request message: its tool results each a tool message, the rest one message of its role."""
        if isinstance(message.content, str):
            self.add({"role": message.role, "content": message.content}, place, {})
            return
        parts: list[dict[str, Any]] = []
        where: dict[int, str] = {}
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            at = f"{place}.content[{j}]"
            if isinstance(block, ToolResultBlock) and message.role == "user":
                self.add({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}, at, {})
            elif isinstance(block, ToolUseBlock) and message.role == "assistant":
                calls.append(block.call())
            elif isinstance(block, ImageBlock) and message.role == "user":
                where[len(parts)] = at
                self.images.append(at)
                parts.append(block.part())
            elif isinstance(block, TextBlock):
                where[len(parts)] = at
                parts.append({"type": "text", "text": block.text})
            else:
                raise InvalidParameter(f"{at}.type", f"{block.type!r} blocks are not taken in a {message.role} "
                                       "message here (user: text, image, tool_result; assistant: text, tool_use)")
        if not parts and not calls:
            return
        images = any(p["type"] == "image_url" for p in parts)
        content: str | list[dict[str, Any]] = parts if images else "".join(p["text"] for p in parts)
        self.add({"role": message.role, "content": content, **({"tool_calls": calls} if calls else {})}, place,
                 where)

    def check(self) -> None:
        """Tool calls and results checked (every result answers an earlier call), errors named by request place."""
        try:
            self.messages = checked_conversation(self.messages)
        except InvalidParameter as e:
            raise self.named(e) from None

    def named(self, error: InvalidParameter) -> InvalidParameter:
        """``error`` naming the request's place of the message or part it is about."""
        match = re.match(r"messages\[\d+\](\.content\[\d+\])?", error.field)
        if match is None:
            return error
        at = match.group(0) if match.group(0) in self.places else match.group(0).split(".")[0]
        if at not in self.places:
            return error
        rest = error.field[len(at):].replace(".tool_call_id", ".tool_use_id")  # a tool message is a tool_result block
        return type(error)(self.places[at] + rest, error.reason)


class MessagesRequest(MessagesInput):
    max_tokens: int
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    """Taken: every request here is served the same way."""

    def grammar(self) -> Grammar | None:
        """What the answer must be: ``output_config.format``'s JSON schema (None: any text)."""
        if self.output_config is not None and self.output_config.format is not None:
            return Grammar.json_schema(self.output_config.format.schema_, "output_config.format.schema")
        if self.output_format is not None:
            return Grammar.json_schema(self.output_format.schema_, "output_format.schema")
        return None

    def params(self) -> GenerationParams:
        try:
            return GenerationParams.of(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                       top_k=self.top_k, stop=self.stop_sequences or (), grammar=self.grammar())
        except InvalidParameter as e:
            raise InvalidParameter("stop_sequences" if e.field == "stop" else e.field, e.reason) from None


class CountTokensRequest(MessagesInput):
    """``/v1/messages/count_tokens``: the prompt only."""
