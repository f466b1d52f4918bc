"""How much of a document one request to a model can hold: its tokens, counted by the model's own
tokenizer when it has one (a local model), estimated from the characters otherwise (a remote model or
a route, whose tokenizer slm does not have)."""

from __future__ import annotations

import math
from dataclasses import replace

from slm.generation.stream import Completion, Usage
from slm.model import LanguageModel, Messages
from slm.tasks.split import Count

CHARS_PER_TOKEN = 4
"""The estimate for a model without a tokenizer: about right for English with BPE vocabularies."""
ASSUMED_CONTEXT = 8192
"""The context of a remote model that does not tell its own."""
MARGIN = 16
"""Tokens kept free of every request for what the counts may miss (a template's ending, an estimate's error)."""


def estimate(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def counter(model: LanguageModel) -> Count:
    """Tokens of a text as ``model`` counts them (an estimate when it has no tokenizer)."""
    tokenize = getattr(model, "tokenize", None)
    if callable(tokenize):
        return lambda text: len(tokenize(text, add_special=False))
    return estimate


def context(model: LanguageModel) -> int:
    return model.info.context_length or ASSUMED_CONTEXT


def prompt_tokens(model: LanguageModel, messages: Messages) -> int:
    """Tokens of a conversation's prompt: exact through a local model's chat template, else estimated."""
    chat_tokens = getattr(model, "chat_tokens", None)
    if callable(chat_tokens):
        return len(chat_tokens(messages))
    return sum(estimate(str(m["content"])) + 8 for m in messages)


def fits(model: LanguageModel, messages: Messages, answer: int) -> bool:
    """Whether ``messages`` and an answer of ``answer`` tokens fit ``model``'s context."""
    return prompt_tokens(model, messages) + answer + MARGIN <= context(model)


def room(model: LanguageModel, instruction: Messages, answer: int) -> int:
    """Tokens left for the text of a request whose instruction alone is ``instruction``."""
    return context(model) - prompt_tokens(model, instruction) - answer - MARGIN


def total(steps: list[Completion]) -> Completion:
    """The last step's completion, with the usage of all the steps."""
    usage = Usage(prompt_tokens=sum(s.usage.prompt_tokens for s in steps),
                  completion_tokens=sum(s.usage.completion_tokens for s in steps),
                  cached_tokens=sum(s.usage.cached_tokens for s in steps))
    return replace(steps[-1], usage=usage)
