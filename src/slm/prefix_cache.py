"""Reuse of prompt prefixes across requests.

A finished request's sequence is not freed at once: its KV cache is kept, with the tokens it holds.
A new prompt that starts the same way (a shared system prompt, the earlier turns of a chat) forks the
cached sequence, drops what differs and computes only the rest. Entries live in spare engine sequence
slots and are evicted least recently used first: when the slots or the cells allowed to the cache run
out, and when the scheduler needs KV cache for running requests. Cached cells are not free: attention
in a unified KV cache reads past them, so the cache is kept to a share of it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from slm.engines.base import Engine

MIN_REUSE = 16
"""Shorter common prefixes are recomputed: a fork costs about as much as a few tokens."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, engine: Engine, capacity: int, max_cells: int | None = None) -> None:
        self.engine = engine
        self.capacity = capacity
        self.max_cells = max_cells if max_cells is not None else engine.info.context_length
        self.cells = 0
        """KV positions held by the entries (counted once per entry, even where entries share them)."""
        self._entries: OrderedDict[int, list[int]] = OrderedDict()  # seq -> tokens in its KV cache
        self.hits = 0
        self.hit_tokens = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, seq: int, tokens: list[int]) -> None:
        """Keep a finished sequence; free it instead if it is too short to be worth keeping."""
        if self.capacity <= 0 or not MIN_REUSE <= len(tokens) <= self.max_cells:
            self.engine.free(seq)
            return
        self._entries[seq] = tokens
        self.cells += len(tokens)
        while len(self._entries) > self.capacity or self.cells > self.max_cells:
            self.evict_one()

    def take(self, prompt: Sequence[int]) -> tuple[int, list[int]] | None:
        """A new sequence (forked from the best entry) holding the longest cached prefix of
        ``prompt``, at least one token short of it so there are logits to sample from; or None."""
        self.lookups += 1
        best, best_len = None, 0
        for seq, tokens in self._entries.items():
            n = common_prefix(tokens, prompt)
            if n > best_len:
                best, best_len = seq, n
        keep = min(best_len, len(prompt) - 1)
        if best is None or keep < MIN_REUSE:
            return None
        self._entries.move_to_end(best)
        child = self.engine.fork(best)
        self.engine.rewind(child, keep)
        self.hits += 1
        self.hit_tokens += keep
        return child, list(prompt[:keep])

    def evict_one(self) -> bool:
        if not self._entries:
            return False
        seq, tokens = self._entries.popitem(last=False)
        self.cells -= len(tokens)
        self.engine.free(seq)
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
