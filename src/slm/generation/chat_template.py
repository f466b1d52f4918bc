"""Chat templates from the model's own metadata, rendered like Hugging Face's ``apply_chat_template``.

Same Jinja environment (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls), same
variables (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``), same helpers
(``raise_exception``, ``strftime_now``, ``tojson``), so a template written for transformers renders
here to the same string.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slm.errors import InvalidParameter

ROLES = ("system", "user", "assistant", "tool", "developer")

Message = Mapping[str, Any]


class TemplateError(InvalidParameter):
    """The template refused the conversation (``raise_exception``) or could not render."""

    def __init__(self, message: str) -> None:
        super().__init__("messages", message)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the model's chat template does not parse: {e.message} (line {e.lineno})") from None


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check a conversation's shape; return it as a list of plain dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise InvalidParameter("messages", "must be a list of {role, content} objects")
    if not messages:
        raise InvalidParameter("messages", "must not be empty")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameter(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidParameter(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidParameter(f"messages[{i}].content", "must be a string")
        checked.append(dict(message))
    return checked


def render(
    source: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render a conversation into the prompt text the model was trained on."""
    template = compile_template(source)
    try:
        return template.render(
            messages=validate_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"the model's chat template failed: {e}") from None
