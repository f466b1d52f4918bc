"""Embedding models: texts (or token ids) -> vectors, batched.

    model = slm.load("minilm")
    vectors = model.embed(["a cat", "a dog"]).vectors   # (2, 384), unit length

An embedding model generates no text: ``chat``, ``generate`` and their streams refuse with one line. Inputs
longer than the model's limit are refused, naming the input, unless ``truncate`` asks to cut them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slm.engines.embedding import Embedder
from slm.errors import InvalidParameter

EmbedInput = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
"""A text, a list of token ids, or a list of either."""

MAX_BATCH = 32
"""Sequences in one forward pass (more are embedded 32 at a time)."""


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray
    """``(inputs, dimensions)`` float32, one row per input in order."""
    prompt_tokens: int
    """Tokens read, special tokens included (after truncation)."""
    tokens: list[list[int]]
    """Each input's token ids as embedded."""


class EmbeddingModel:
    """A local embedding model: ``embed`` batches inputs through its engine."""

    instruct = False

    def __init__(self, name: str, embedder: Embedder) -> None:
        self.name = name
        self.embedder = embedder

    @property
    def dimensions(self) -> int:
        return self.embedder.dimensions

    @property
    def max_length(self) -> int:
        """The longest input, in tokens, including the special tokens."""
        return self.embedder.max_length

    def token_batches(self, inputs: EmbedInput, truncate: bool = False) -> list[list[int]]:
        """Each input's token ids, checked: not empty, ids in the vocabulary, within the model's limit (or
        cut to it with ``truncate``). The errors name the input by its index."""
        items = as_inputs(inputs)
        limit, vocab = self.embedder.max_length, self.embedder.vocab_size
        empty = next((i for i, item in enumerate(items) if isinstance(item, str) and not item), None)
        if empty is not None:
            raise InvalidParameter(f"input[{empty}]", "empty text; embeddings need some text")
        texts = iter(self.embedder.tokenize([item for item in items if isinstance(item, str)]))
        batches = []
        for index, item in enumerate(items):
            field = f"input[{index}]"
            if isinstance(item, str):
                ids = next(texts)
                if len(ids) > limit and truncate:  # keep the closing [SEP] the model was trained to see
                    ids = [*ids[: limit - 1], ids[-1]]
            else:
                ids = list(item)
                if not ids:
                    raise InvalidParameter(field, "no token ids; embeddings need some tokens")
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise InvalidParameter(field, f"token id {bad} is outside {self.name}'s vocabulary "
                                                  f"(0..{vocab - 1})")
                if len(ids) > limit and truncate:
                    ids = ids[:limit]
            if len(ids) > limit:
                raise InvalidParameter(field, f"{len(ids)} tokens, more than {self.name}'s {limit}; shorten it "
                                              "or ask to truncate")
            batches.append(ids)
        return batches

    def embed_tokens(self, batches: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors of checked token ids (``token_batches``), ``MAX_BATCH`` sequences per forward pass; the
        longest first so each pass pads little."""
        order = sorted(range(len(batches)), key=lambda i: -len(batches[i]))
        out = np.empty((len(batches), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), MAX_BATCH):
            rows = order[start : start + MAX_BATCH]
            out[rows] = self.embedder.embed([batches[i] for i in rows])
        return out

    def embed(self, inputs: EmbedInput, truncate: bool = False) -> Embeddings:
        """The inputs' vectors, in order (see ``token_batches`` for what is refused)."""
        batches = self.token_batches(inputs, truncate)
        return Embeddings(self.embed_tokens(batches), sum(len(b) for b in batches), batches)

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise InvalidParameter("model", f"{self.name} is an embedding model: it turns text into vectors (embed, "
                                        "/v1/embeddings, /api/embed) and does not generate text")

    chat = chat_stream = generate = stream = _refuse

    def close(self) -> None:
        self.embedder.close()

    def __enter__(self) -> EmbeddingModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingModel({self.name!r}, dimensions={self.dimensions})"


def as_inputs(inputs: EmbedInput) -> list[str | list[int]]:
    """One input (a text, a list of ids) or a list of them -> a list of inputs; InvalidParameter naming
    ``input`` when it is empty or of another type."""
    if isinstance(inputs, str):
        return [inputs]
    items = list(inputs)
    if not items:
        raise InvalidParameter("input", "empty list; embeddings need at least one input")
    if all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return [[int(i) for i in items]]  # type: ignore[call-overload]
    out: list[str | list[int]] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            out.append([int(t) for t in item])
        else:
            raise InvalidParameter(f"input[{index}]", "must be a string or a list of token ids")
    return out
