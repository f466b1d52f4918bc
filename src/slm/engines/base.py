"""The engine protocol: token ids in, next-token logits out.

An engine wraps one loaded model and owns the KV cache of every sequence it holds. Everything above
this layer (sampling, detokenizing, scheduling, serving) talks to an engine only through this
protocol, so a new engine is one adapter module. Sequences are small integer handles; each has a
length (the number of positions in its KV cache) that ``evaluate`` extends and ``rewind`` shrinks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from slm.engines.media import Image
from slm.errors import EngineError, InvalidParameter

DEFAULT_CONTEXT = 8192
"""Allocated context when the caller names none: enough for chat, and never the full 128k of a
Phi-3.5 (which would cost gigabytes of KV cache). Capped by the model's training context."""


def default_threads() -> int:
    """Physical parallelism available to this process (more threads than cores only hurts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_load_options(n_ctx: int | None, threads: int | None, max_sequences: int,
                       kv_cells: int | None = None) -> None:
    """The load options every engine takes (and ``kv_cells``, for those that take it), checked the same way
    (the error names the option)."""
    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 16):
        raise InvalidParameter("n_ctx", f"must be an integer >= 16, got {n_ctx!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InvalidParameter("threads", f"must be an integer >= 1, got {threads!r}")
    if not isinstance(max_sequences, int) or max_sequences < 1:
        raise InvalidParameter("max_sequences", f"must be an integer >= 1, got {max_sequences!r}")
    if kv_cells is not None and not isinstance(kv_cells, int):
        raise InvalidParameter("kv_cells", f"must be an integer, got {kv_cells!r}")


def context_for(n_ctx: int | None, train_ctx: int, cap: int) -> int:
    """The context one sequence gets: ``n_ctx`` if given (never beyond the training context), else the
    model's own capped at ``cap``."""
    if n_ctx is not None and n_ctx > train_ctx:
        raise InvalidParameter("n_ctx", f"{n_ctx} is beyond the model's training context of {train_ctx}")
    return n_ctx or min(train_ctx, cap)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two sequences of token ids share from their start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


DEFAULT_SEQUENCES = 4
"""Sequences an engine holds at once when the caller names no number."""

DEFAULT_BATCH = 512
"""Most tokens llama.cpp decodes in one call when the caller names no number."""


@dataclass(frozen=True)
class LoadOptions:
    """What every engine is loaded with, checked when made (the error names the option). ``None``: the
    engine's default. An engine that takes more has a subclass; the registry refuses, by name, an option
    that is not a field of its engine's class."""

    n_ctx: int | None = None
    """Positions one sequence may hold (default: the model's training context, capped)."""
    threads: int | None = None
    """CPU threads (default: all this process may use)."""
    max_sequences: int = DEFAULT_SEQUENCES
    """Sequences open at once."""

    def __post_init__(self) -> None:
        check_load_options(self.n_ctx, self.threads, self.max_sequences)


@dataclass(frozen=True)
class SharedCacheOptions(LoadOptions):
    """An engine whose sequences draw on one pool of KV cache (transformers)."""

    kv_cells: int | None = None
    """Positions of KV cache for all sequences together (default: ``n_ctx``)."""
    adapters: Mapping[str, Path] | None = None
    """LoRA adapters to load beside the model, by name: each a peft adapter folder (``adapter_config.json``
    and ``adapter_model.safetensors``). A sequence opened with ``new_sequence(adapter=name)`` runs through
    one of them; the others, through the model alone."""

    def __post_init__(self) -> None:
        check_load_options(self.n_ctx, self.threads, self.max_sequences, self.kv_cells)
        check_adapter_folders(self.adapters or {})


def check_adapter_folders(adapters: Mapping[str, Path]) -> None:
    """Each adapter a non-empty name and a folder holding a peft LoRA adapter (the error names the first
    that is not)."""
    if not isinstance(adapters, Mapping):
        raise InvalidParameter("adapters", f"must map names to adapter folders, got {adapters!r}")
    for name, folder in adapters.items():
        if not isinstance(name, str) or not name:
            raise InvalidParameter("adapters", f"an adapter's name must be a non-empty string, got {name!r}")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise InvalidParameter("adapters", f"{folder} is not a LoRA adapter folder (no adapter_config.json)")


def check_adapter(adapter: str | None, loaded: Sequence[str]) -> None:
    """A sequence's adapter must be one the engine loaded (None: the model alone)."""
    if adapter is not None and adapter not in loaded:
        have = f"loaded: {', '.join(loaded)}" if loaded else "none is loaded"
        raise InvalidParameter("adapter", f"no adapter named {adapter!r} is loaded ({have})")


@dataclass(frozen=True)
class LlamaCppOptions(SharedCacheOptions):
    """llama.cpp's: a shared KV cache, and the knobs of its context."""

    n_batch: int = DEFAULT_BATCH
    """Most tokens per ``llama_decode`` call (lowered to the context when that is smaller)."""
    flash_attention: bool | None = None
    """On, off, or ``None``: where llama.cpp finds it faster."""
    mmproj: Path | None = None
    """The model's image projector GGUF: with it, the model takes images."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_batch, int) or self.n_batch < 1:
            raise InvalidParameter("n_batch", f"must be an integer >= 1, got {self.n_batch!r}")
        if self.flash_attention is not None and not isinstance(self.flash_attention, bool):
            raise InvalidParameter("flash_attention", f"must be true, false or None, got {self.flash_attention!r}")
        if self.mmproj is not None and not Path(self.mmproj).is_file():
            raise InvalidParameter("mmproj", f"no such file: {self.mmproj}")


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
    adapters: tuple[str, ...] = ()
    """The LoRA adapters loaded beside the model (``new_sequence(adapter=...)`` names one)."""


@dataclass(frozen=True, eq=False)
class SavedSequence:
    """A sequence's KV cache copied out to host memory (``Engine.save``), to be restored later."""

    length: int
    """Positions it holds."""
    nbytes: int
    data: object
    """The engine's own representation."""
    adapter: str | None = None
    """The LoRA adapter its cache was computed through (a restored sequence keeps running through it)."""


class Positions(Protocol):
    """An engine's own state of one sequence; all the bookkeeping needs is how many positions it holds."""

    @property
    def length(self) -> int: ...


S = TypeVar("S", bound=Positions)


class Sequences(Generic[S]):
    """The open sequences of one engine: small integer handles (the lowest free one first, fewer than
    ``limit``, as llama.cpp's sequence ids must be), each with the engine's own state, and the checks every
    engine makes before its library runs. The engine changes a state's length; this only reads it."""

    def __init__(self, limit: int, holder: str = "engine") -> None:
        self.limit = limit
        self._holder = holder  # what the sequences belong to, for the error when all are taken
        self._states: dict[int, S] = {}
        self._free = list(range(limit - 1, -1, -1))  # popped from the end: 0 first, then the last freed

    def open(self, make: Callable[[], S]) -> int:
        """A handle for the state ``make`` returns; EngineError when all ``limit`` are taken (then nothing
        is made)."""
        if not self._free:
            raise EngineError(f"all {self.limit} sequences of this {self._holder} are in use")
        state = make()
        seq = self._free.pop()
        self._states[seq] = state
        return seq

    def __getitem__(self, seq: int) -> S:
        """The state of an open sequence (KeyError for one that is not)."""
        return self._states[seq]

    def release(self, seq: int) -> S | None:
        """Give the handle back; its state, or None when it was not open."""
        state = self._states.pop(seq, None)
        if state is not None:
            self._free.append(seq)
        return state

    def release_all(self) -> list[S]:
        """Give every handle back; their states."""
        states = list(self._states.values())
        for seq in list(self._states):
            self.release(seq)
        return states

    def check_evaluate(self, work: Sequence[tuple[int, Sequence[int]]], context: int,
                       keep: Sequence[int] | None = None) -> list[S]:
        """The states of ``work``'s sequences, in its order, once every one is open, has tokens to
        evaluate and stays within ``context`` positions, and ``keep`` (if given) asks for the logits
        after at least one and at most all of each one's new tokens, none of them an image's
        (EngineError naming the first that does not)."""
        if keep is not None:
            if len(keep) != len(work):
                raise EngineError(f"keep has {len(keep)} counts for {len(work)} sequences")
            for (seq, tokens), count in zip(work, keep, strict=True):
                if not 1 <= count <= len(tokens) or min(tokens[len(tokens) - count :], default=0) < 0:
                    raise EngineError(f"cannot keep the logits after {count} of the {len(tokens)} new tokens "
                                      f"of sequence {seq}")
        states = []
        for seq, tokens in work:
            state = self._states.get(seq)
            if state is None:
                raise EngineError(f"sequence {seq} is not open")
            if not tokens:
                raise EngineError(f"nothing to evaluate for sequence {seq}")
            if state.length + len(tokens) > context:
                raise EngineError(f"sequence {seq} would exceed the context of {context}")
            states.append(state)
        return states

    def check_rewind(self, seq: int, length: int) -> S:
        """The state of ``seq``, once ``length`` is within the positions it holds."""
        state = self._states[seq]
        if not 0 <= length <= state.length:
            raise InvalidParameter("length", f"must be in [0, {state.length}], got {length}")
        return state


@runtime_checkable
class TakesImages(Protocol):
    """An engine whose model reads images: a prompt's images become runs of placeholder ids
    (``slm.engines.media``), which ``evaluate`` takes like any other ids."""

    image_marker: str
    """What stands for one image in the prompt text given to ``tokenize_with_images``."""

    def tokenize_with_images(self, text: str, images: Sequence[Image], add_special: bool = True) -> list[int]:
        """Ids of ``text``, each ``image_marker`` in it replaced by the next image's placeholder ids."""
        ...


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

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Ids -> text in one go (the reference the streaming detokenizer must equal). ``special``: control
        tokens written as their text (``<|im_start|>``) rather than left out."""
        ...

    def new_sequence(self, adapter: str | None = None) -> int:
        """A new, empty sequence, whose tokens run through the loaded LoRA adapter ``adapter`` (None: the
        model alone). A fork keeps its sequence's adapter. Raises EngineError when all slots are taken,
        InvalidParameter for an adapter that is not loaded (``check_adapter``)."""
        ...

    def sequence_length(self, seq: int) -> int:
        """Positions in the sequence's KV cache."""
        ...

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]], keep: Sequence[int] | None = None) -> np.ndarray:
        """Append tokens to sequences and run the model over all of them in as few batched calls
        as the engine allows. Returns the logits after each sequence's last new token, (B, V),
        in the order of ``work``; the array is the caller's to keep and modify. With ``keep``, the
        logits after each sequence's last ``keep[b]`` new tokens (1 <= keep[b] <= its new tokens, all
        text), in order: (sum(keep), V), row b's first at ``sum(keep[:b])`` (speculative decoding checks
        a whole draft in one call). Raises KVCacheFull when the shared cache has no room for the step;
        every sequence is then left as it was."""
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
