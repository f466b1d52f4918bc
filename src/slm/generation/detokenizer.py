"""Token ids -> text, incrementally, for streaming.

Decoding each token on its own breaks characters that span tokens (a byte-level BPE splits an emoji
or a CJK character over several tokens). The detokenizer keeps raw bytes and only releases complete
UTF-8 characters; the stop matcher then holds back any tail that could still become a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class StreamingDetokenizer:
    """Feeds token pieces (raw bytes) through an incremental UTF-8 decoder.

    ``piece`` maps a token id to its bytes as the engine renders it (special tokens render empty).
    The text of all deltas joined equals decoding all the bytes at once.
    """

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text that ``token`` completes (possibly empty while a character is unfinished)."""
        return self._decoder.decode(self._piece(token))

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cuts a text stream at the first stop string, never emitting a prefix of one too early."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the stream (the first in the text; of two there, the first given)."""

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held back) that is safe to emit now."""
        if self.stopped:
            return ""
        pending = self._held + text
        if not self.stops:
            self._held = ""
            return pending
        hits = [(at, stop) for at, stop in ((pending.find(stop), stop) for stop in self.stops) if at >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            self._held = ""
            return pending[:at]
        keep = self._longest_stop_prefix_suffix(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """At the end of generation, release what was held back (it never became a stop string)."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
