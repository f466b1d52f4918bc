"""The transformers engine's KV cache: each sequence's state, and the batch buffers a step's sequences share.

The keys and values of the sequences of a step live in batch buffers, one row per sequence, ``(B, H_kv,
capacity, D)`` per layer, left-aligned so that a key's column is its position (for a model with M-RoPE, its
cache column; ``Rope`` keeps the positions apart). ``RowLayer`` is one layer of them as transformers'
attention sees a cache layer: a step writes its new keys at the columns ``Write`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values per layer, each (1, H_kv, length, D)."""


@dataclass(frozen=True)
class Rope:
    """An M-RoPE sequence's positions: its next token's is ``length + delta`` (all three the same, as for any
    text), and each image's ``(first column, (3, n) positions)`` is kept so a rewind is exact. Never changed
    in place: fork, save and restore share it."""

    delta: int = 0
    images: tuple[tuple[int, torch.Tensor], ...] = ()

    def rewound(self, length: int) -> Rope:
        """The positions of the sequence's first ``length`` tokens: after the last image begun by then, the next
        position is the largest of its positions seen plus one (an image cut short counts its seen part)."""
        images = tuple(image for image in self.images if image[0] < length)
        if not images:
            return Rope()
        start, grid = images[-1]
        seen = min(length - start, grid.shape[1])
        return Rope(int(grid[:, :seen].max()) + 1 - (start + seen), images)


@dataclass
class SeqState:
    kv: KV | None = None
    """Keys and values of its own (never written), or None while they are a row of batch buffers."""
    length: int = 0
    home: tuple[Rows, int] | None = None
    """The batch buffers and the row that hold this sequence's keys and values, when ``kv`` is None."""
    rope: Rope | None = None
    """Its M-RoPE positions, for a model with M-RoPE; else None (position = column)."""

    def layers(self) -> KV | None:
        """Keys and values per layer, (1, H_kv, length, D): views, valid until the next step."""
        if not self.length:
            return None
        if self.kv is not None:
            return self.kv
        assert self.home is not None
        rows, b = self.home
        n = self.length
        return [(k[b : b + 1, :, :n], v[b : b + 1, :, :n]) for k, v in zip(rows.keys, rows.values, strict=True)]

    def frozen(self) -> KV | None:
        """Keys and values nobody will write: its own, or a copy of its row."""
        if self.kv is not None or not self.length:
            return self.kv if self.length else None
        return [(k.clone(), v.clone()) for k, v in self.layers() or []]


@dataclass(eq=False)
class Rows:
    """The batch buffers of one set of sequences: per layer (B, H_kv, capacity, D), row b = seqs[b]."""

    seqs: list[SeqState]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    capacity: int


@dataclass
class Write:
    """Where one step's new keys go: query column ``read_col[i]`` of row ``row[i]`` to column ``col[i]``."""

    row: torch.Tensor
    col: torch.Tensor
    read_col: torch.Tensor
    width: int
    """Key columns the step attends to."""
    past: int


class RowLayer(CacheLayerMixin):
    """One layer's batch buffers, as transformers' attention sees a cache layer."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write: Write) -> None:
        super().__init__()
        self.keys, self.values, self.write = keys, values, write
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.write
        assert self.keys is not None and self.values is not None
        # (B, H, ·, D) seen as (B, ·, H, D): pick (row, column) pairs
        self.keys.transpose(1, 2)[w.row, w.col] = key_states.transpose(1, 2)[w.row, w.read_col]
        self.values.transpose(1, 2)[w.row, w.col] = value_states.transpose(1, 2)[w.row, w.read_col]
        return self.keys[:, :, : w.width], self.values[:, :, : w.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.write.width, 0

    def get_seq_length(self) -> int:
        return self.write.past

    def get_max_length(self) -> int:
        return -1
