"""Tools a request offers and the calls a model makes: the data, checked where it is made.

``ToolUse`` is what a request asks (its tools, ``tool_choice``, ``parallel_tool_calls``); ``ToolCall`` is
one call read back from the model's answer. How a model is told about tools and how its calls are
constrained and parsed is ``tool_calls``'s.
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slm.errors import InvalidParameter

# --- tools and calls --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def spec(self) -> dict[str, Any]:
        """OpenAI's form, which chat templates read."""
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}

    @classmethod
    def of(cls, tool: object, field: str = "tools") -> Tool:
        """A tool from OpenAI's ``{"type": "function", "function": {...}}``, a bare ``{name, description,
        parameters}``, or a Python function (its signature and docstring)."""
        if isinstance(tool, Tool):
            return tool
        if callable(tool) and not isinstance(tool, Mapping):
            return cls.from_function(tool)
        if not isinstance(tool, Mapping):
            raise InvalidParameter(field, "each tool must be an object {type: function, function: {name, parameters}}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise InvalidParameter(f"{field}.type", f"only function tools are supported, got {tool.get('type')!r}")
            tool = tool.get("function")
            field = f"{field}.function"
            if not isinstance(tool, Mapping):
                raise InvalidParameter(field, "must be an object {name, description, parameters}")
        name = tool.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise InvalidParameter(f"{field}.name", f"must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        description = tool.get("description") or ""
        if not isinstance(description, str):
            raise InvalidParameter(f"{field}.description", "must be a string")
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise InvalidParameter(f"{field}.parameters", "must be a JSON schema of type object")
        return cls(name, description, dict(parameters))

    @classmethod
    def from_function(cls, function: Callable[..., Any]) -> Tool:
        """A tool from a Python function: its name, its docstring's first paragraph, and a schema of its
        annotated parameters (those without a default are required)."""
        doc = inspect.getdoc(function) or ""
        properties: dict[str, Any] = {}
        required = []
        hints = typing.get_type_hints(function)
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            properties[name] = _schema_of(hints.get(name, str), f"tools.{function.__name__}.{name}")
            if parameter.default is parameter.empty:
                required.append(name)
        schema = {"type": "object", "properties": properties, "required": required}
        return cls(function.__name__, doc.split("\n\n")[0].strip(), schema)


def _schema_of(hint: Any, field: str) -> dict[str, Any]:
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if hint in simple:
        return {"type": simple[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, Sequence, tuple) and args:
        return {"type": "array", "items": _schema_of(args[0], field)}
    if origin in (dict, Mapping):
        return {"type": "object"}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _schema_of(options[0], field)
        return {"anyOf": [_schema_of(a, field) for a in options]}
    raise InvalidParameter(field, f"has a type the tool schema cannot express: {hint!r}")


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: which tool, with which (validated) arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def spec(self) -> dict[str, Any]:
        """OpenAI's form (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and how the model must use them: ``choice`` is "none", "auto",
    "required", or the name of the one tool to call."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    @classmethod
    def of(cls, tools: Iterable[object] | None, choice: object = None, parallel: bool | None = None) -> ToolUse | None:
        """Checked tools and choice (OpenAI's ``tool_choice``: a string, or ``{"type": "function", "function":
        {"name": ...}}``); None when there are no tools."""
        if tools is None:
            if choice not in (None, "none", "auto"):
                raise InvalidParameter("tool_choice", "names a tool, but the request has no tools")
            return None
        if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Iterable):
            raise InvalidParameter("tools", "must be a list of tools")
        checked = tuple(Tool.of(t, f"tools[{i}]") for i, t in enumerate(tools))
        if not checked:
            if choice not in (None, "none", "auto"):
                raise InvalidParameter("tool_choice", "asks for a tool call, but the request offers no tools")
            return None
        names = [t.name for t in checked]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise InvalidParameter("tools", f"two tools are named {duplicate!r}")
        if isinstance(choice, Mapping):
            function = choice.get("function")
            choice = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        choice = "auto" if choice is None else choice
        if not isinstance(choice, str) or (choice not in CHOICES and choice not in names):
            raise InvalidParameter("tool_choice", f"must be none, auto, required or one of the tools "
                                   f"({', '.join(names)}); got {choice!r}")
        if parallel is not None and not isinstance(parallel, bool):
            raise InvalidParameter("parallel_tool_calls", "must be true or false")
        return cls(checked, choice, True if parallel is None else parallel)

    @property
    def forced(self) -> bool:
        """A call must be made (``required``, or a named tool)."""
        return self.choice not in ("none", "auto")

    def offered(self) -> tuple[Tool, ...]:
        """The tools the model may call: all of them, or the one named."""
        if self.choice in CHOICES:
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)
