"""The engine protocol: token ids in, next-token logits out.

An engine wraps one loaded model and owns the KV cache of every sequence it holds. Everything above
this layer (sampling, detokenizing, scheduling, serving) talks to an engine only through this
protocol, so a new engine is one adapter module. Sequences are small integer handles; each has a
length (the number of positions in its KV cache) that ``evaluate`` extends and ``rewind`` shrinks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

DEFAULT_CONTEXT = 8192
"""Allocated context when the caller names none: enough for chat, and never the full 128k of a
Phi-3.5 (which would cost gigabytes of KV cache). Capped by the model's training context."""


def default_threads() -> int:
    """Physical parallelism available to this process (more threads than cores only hurts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_load_options(n_ctx: int | None, threads: int | None, max_sequences: int) -> None:
    """The load options every engine takes, checked the same way (the error names the option)."""
    from slm.errors import InvalidParameter

    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 16):
        raise InvalidParameter("n_ctx", f"must be an integer >= 16, got {n_ctx!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InvalidParameter("threads", f"must be an integer >= 1, got {threads!r}")
    if not isinstance(max_sequences, int) or max_sequences < 1:
        raise InvalidParameter("max_sequences", f"must be an integer >= 1, got {max_sequences!r}")


def context_for(n_ctx: int | None, train_ctx: int, cap: int) -> int:
    """The context one sequence gets: ``n_ctx`` if given (never beyond the training context), else the
    model's own capped at ``cap``."""
    from slm.errors import InvalidParameter

    if n_ctx is not None and n_ctx > train_ctx:
        raise InvalidParameter("n_ctx", f"{n_ctx} is beyond the model's training context of {train_ctx}")
    return n_ctx or min(train_ctx, cap)


@dataclass(frozen=True)
class SpecialTokens:
    """The model's own special tokens, read from its files."""

    bos_id: int | None
    eos_id: int | None
    end_of_generation: frozenset[int]
    """Every token that ends a turn or a text (EOS, ``<|im_end|>``, ``<end_of_turn>``...)."""
    bos_text: str = ""
    eos_text: str = ""
    add_bos: bool = False
    """Whether the tokenizer puts BOS in front of a text it encodes."""


@dataclass(frozen=True)
class ModelInfo:
    """What an engine reports about the loaded model."""

    architecture: str
    vocab_size: int
    context_length: int
    """The most positions one sequence may hold in this load."""
    train_context_length: int
    """The longest context the model was trained for."""
    parameters: int
    size_bytes: int
    chat_template: str | None
    special: SpecialTokens
    metadata: dict[str, str] = field(default_factory=dict)
    kv_cells: int = 0
    """Positions of KV cache allocated for all sequences together (0: the engine does not say)."""
    kv_bytes_per_token: int = 0
    """What one position of KV cache costs in memory (0: unknown)."""


@dataclass(frozen=True, eq=False)
class SavedSequence:
    """A sequence's KV cache copied out to host memory (``Engine.save``), to be restored later."""

    length: int
    """Positions it holds."""
    nbytes: int
    data: object
    """The engine's own representation."""


class Engine(Protocol):
    """One loaded model. Not thread-safe: one thread drives an engine."""

    name: str
    info: ModelInfo
    max_sequences: int
    """How many sequences can be open at once."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids. ``add_special`` adds BOS where the model wants it; ``parse_special`` turns
        written special tokens (``<|im_start|>``) into their ids, as a chat template needs."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes a token stands for (control tokens render empty); may be part of a
        UTF-8 character."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Ids -> text in one go (the reference the streaming detokenizer must equal)."""
        ...

    def new_sequence(self) -> int:
        """A new, empty sequence; raises EngineError when all slots are taken."""
        ...

    def sequence_length(self, seq: int) -> int:
        """Positions in the sequence's KV cache."""
        ...

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]]) -> np.ndarray:
        """Append tokens to sequences and run the model over all of them in as few batched calls
        as the engine allows. Returns the logits after each sequence's last new token, (B, V),
        in the order of ``work``; the array is the caller's to keep and modify. Raises KVCacheFull
        when the shared cache has no room for the step; every sequence is then left as it was."""
        ...

    def rewind(self, seq: int, length: int) -> None:
        """Drop every position from ``length`` on."""
        ...

    def fork(self, seq: int) -> int:
        """A new sequence sharing a copy of ``seq``'s cache (for prefix reuse and beams)."""
        ...

    def save(self, seq: int) -> SavedSequence:
        """A copy of the sequence's KV cache in host memory; the sequence itself is left as it is."""
        ...

    def restore(self, saved: SavedSequence) -> int:
        """A new sequence holding a saved KV cache; raises EngineError (KVCacheFull) without room."""
        ...

    def free(self, seq: int) -> None:
        """Release the sequence's cache and handle."""
        ...

    def close(self) -> None:
        """Free the model and its context."""
        ...
