"""The contract every model slm hands out satisfies: a local ``Model``, a ``RemoteModel``, a ``Router``.

Code above this layer (the server, the CLI, the tools) holds a ``LanguageModel`` and never asks which
kind it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from slm.engines import SpecialTokens
from slm.generation.chat_template import Message
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion

Messages = Sequence[Message]


class Info(Protocol):
    """What every model tells about itself (a local one's ``ModelInfo`` tells much more)."""

    @property
    def architecture(self) -> str: ...

    @property
    def context_length(self) -> int | None:
        """Tokens of context; None when a remote model does not say."""
        ...

    @property
    def special(self) -> SpecialTokens: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A model that answers conversations and continues text, whole or as a stream of chunks."""

    name: str
    instruct: bool
    """Tuned to answer a turn (a chat model). False for a base model: it only continues text."""

    @property
    def info(self) -> Info: ...

    def chat(self, messages: Messages, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """The assistant's next turn."""
        ...

    def chat_stream(self, messages: Messages, params: GenerationParams | None = None,
                    **overrides: Any) -> Iterator[Chunk]:
        """The assistant's next turn, chunk by chunk; the last chunk carries the finish reason and usage."""
        ...

    def generate(self, prompt: Any, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """The continuation of raw text (a local model also takes token ids)."""
        ...

    def stream(self, prompt: Any, params: GenerationParams | None = None, **overrides: Any) -> Iterator[Chunk]:
        """The continuation of raw text, chunk by chunk."""
        ...

    def close(self) -> None:
        """Free what the model holds (weights, connections)."""
        ...
