"""Reuse of prompt prefixes across requests.

When a request finishes, the KV cache of its sequence (prompt and answer) is copied out to host memory
with the tokens it holds, and the sequence is freed. A new prompt that starts the same way (a shared
system prompt, the earlier turns of a chat) gets a sequence restored from the entry with the longest
common prefix, rewound to that prefix: only the rest is computed. Copying is cheap next to computing
(a memory copy of some kilobytes per position, against a forward pass), and entries kept outside the
engine cost the running requests nothing: in a unified KV cache, kept sequences would take cells and
slow every attention step. Entries are evicted least recently used first beyond ``max_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from slm.engines import media
from slm.engines.base import Engine, SavedSequence, common_prefix

MIN_REUSE = 4
"""Shorter common prefixes are recomputed. Restoring is cheap next to computing: on SmolLM2 (llama.cpp, two
cores) restoring an 800-position entry took 2.5 ms and a 16-position one 0.05 ms, while reading 4 prompt tokens
took about 24 ms and 15 tokens 60 ms; a chat template's opening (about 15 tokens) is worth reusing."""

MAX_BYTES = 256 << 20
"""Host memory for cached prefixes per model, by default."""


@dataclass(frozen=True, eq=False)
class Entry:
    tokens: list[int]
    saved: SavedSequence


class PrefixCache:
    def __init__(self, engine: Engine, max_bytes: int = MAX_BYTES) -> None:
        self.engine = engine
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._ids = 0
        self.hits = 0
        self.hit_tokens = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[list[int]]:
        """The tokens of each entry, least recently used first."""
        return [e.tokens for e in self._entries.values()]

    def add(self, seq: int, tokens: list[int]) -> None:
        """Keep a finished sequence's KV cache (if it is worth keeping) and free the sequence."""
        try:
            if self.max_bytes > 0 and len(tokens) >= MIN_REUSE:
                saved = self.engine.save(seq)
                if saved.nbytes <= self.max_bytes:
                    self._ids += 1
                    self._entries[self._ids] = Entry(list(tokens), saved)
                    self.nbytes += saved.nbytes
                    while self.nbytes > self.max_bytes:
                        self.evict_one()
        finally:
            self.engine.free(seq)

    def take(self, prompt: Sequence[int], adapter: str | None = None) -> tuple[int, list[int]] | None:
        """A new sequence holding the longest cached prefix of ``prompt`` computed through the same LoRA
        ``adapter`` (another's cache holds other keys and values), at least one token short of it so there are
        logits to sample from; or None. Raises EngineError when the engine has no
        sequence slot or KV room for it."""
        self.lookups += 1
        best, best_len = None, 0
        for key, entry in self._entries.items():
            if entry.saved.adapter != adapter:
                continue
            n = common_prefix(entry.tokens, prompt)
            if n > best_len:
                best, best_len = key, n
        keep = media.whole_images_before(prompt, min(best_len, len(prompt) - 1))
        if best is None or keep < MIN_REUSE:
            return None
        self._entries.move_to_end(best)
        entry = self._entries[best]
        seq = self.engine.restore(entry.saved)
        self.engine.rewind(seq, keep)
        self.hits += 1
        self.hit_tokens += keep
        return seq, list(prompt[:keep])

    def evict_one(self) -> bool:
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.saved.nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
