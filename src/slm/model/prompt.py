"""The prompt policy, in one place: what a request asks a model to continue.

A request carries a conversation, raw text, or token ids. A single instruction (``slm run "..."``,
Ollama's ``/api/generate``) becomes a chat turn for an instruct model, with the system message first;
for a base model, or when raw text is asked for, it stays text, with the system message (if any) put
before it as a paragraph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from slm.errors import InvalidParameter
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk
from slm.generation.tool_use import ToolUse
from slm.model.contract import LanguageModel, Messages


@dataclass(frozen=True)
class Prompt:
    """Exactly one of ``messages``, ``text`` or ``tokens``. ``context``: token ids of an earlier exchange
    that come first (Ollama's ``context``; a local model only). ``tools``: what a conversation may call."""

    messages: Messages | None = None
    text: str | None = None
    tokens: Sequence[int] | None = None
    context: Sequence[int] = ()
    tools: ToolUse | None = None

    @classmethod
    def chat(cls, messages: Messages, tools: ToolUse | None = None) -> Prompt:
        return cls(messages=messages, tools=tools)

    @classmethod
    def raw(cls, prompt: str | Sequence[int], context: Sequence[int] = ()) -> Prompt:
        """Text or token ids continued as they are, without the chat template."""
        return cls(text=prompt, context=context) if isinstance(prompt, str) else cls(tokens=prompt, context=context)

    @classmethod
    def instruction(cls, text: str, system: str | None = None, *, raw: bool = False, instruct: bool = True,
                    context: Sequence[int] = (), images: Sequence[object] = ()) -> Prompt:
        """One instruction to ``instruct`` (or base) model; ``raw``: continue the text as it is. ``images``
        (Ollama's ``images``) go into the chat turn, before the text."""
        if images:
            if raw or not instruct:
                raise InvalidParameter("images", "images go into a chat turn: not with raw text or a base model")
            head = [{"role": "system", "content": system}] if system else []
            return cls(messages=[*head, {"role": "user", "content": text, "images": list(images)}], context=context)
        if raw:
            return cls(text=text, context=context)
        if not instruct:
            return cls(text=f"{system}\n\n{text}" if system else text, context=context)
        head = [{"role": "system", "content": system}] if system else []
        return cls(messages=[*head, {"role": "user", "content": text}], context=context)


def ask(model: LanguageModel, prompt: Prompt, params: GenerationParams) -> Iterator[Chunk]:
    """``model``'s answer to ``prompt``, streamed: a chat turn for messages, a continuation otherwise.
    ``context`` is left out: it holds a local model's own token ids, which only ``Model.prompt_tokens``
    (the server's path to a local model) reads."""
    if prompt.messages is not None:
        if prompt.tools is not None:
            use = prompt.tools
            return model.chat_stream(prompt.messages, params, tools=use.tools, tool_choice=use.choice,
                                     parallel_tool_calls=use.parallel)
        return model.chat_stream(prompt.messages, params)
    return model.stream(prompt.text if prompt.text is not None else list(prompt.tokens or ()), params)
