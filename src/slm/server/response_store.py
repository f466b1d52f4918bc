"""The responses ``/v1/responses`` keeps (``store: true``), in memory: each one's object, and the conversation
it ends (its input after the earlier turns, and its answer), which a request that names it in
``previous_response_id`` continues.

Bounded: at most ``MAX_RESPONSES`` holding ``MAX_CHARACTERS`` of conversation together (beyond either, the
least recently used goes first), each for ``TTL_SECONDS`` after it was stored. Nothing survives a restart.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slm.errors import PreviousResponseNotFound, RequestError

MAX_RESPONSES = 1000
MAX_CHARACTERS = 64 << 20
"""Characters of conversation all stored responses hold together (each repeats its earlier turns)."""
TTL_SECONDS = 3600.0


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    """The response object, as it was returned."""
    conversation: list[dict[str, Any]]
    """Every message up to and including its answer (``instructions`` are not carried over, as OpenAI's)."""
    expires_at: float
    characters: int


class ResponseStore:
    """Stored responses by id, least recently used first; ``clock`` (seconds) times their expiry."""

    def __init__(self, max_responses: int = MAX_RESPONSES, ttl: float = TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic, max_characters: int = MAX_CHARACTERS) -> None:
        self.max_responses = max_responses
        self.max_characters = max_characters
        self._characters = 0
        self.ttl = ttl
        self.clock = clock
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep ``response`` (its id is the key) and the conversation it ends; the newest is always kept."""
        characters = sum(len(m["content"]) for m in conversation)
        with self._lock:
            self._drop(response["id"])
            self._items[response["id"]] = Stored(response, conversation, self.clock() + self.ttl, characters)
            self._characters += characters
            while len(self._items) > 1 and (len(self._items) > self.max_responses
                                            or self._characters > self.max_characters):
                self._drop(next(iter(self._items)))

    def get(self, response_id: str) -> Stored:
        """The stored response ``response_id``, or a 404 naming it."""
        found = self._find(response_id)
        if found is None:
            raise RequestError(f"No response found with id {response_id!r} (never stored, deleted, or expired)",
                               404, "not_found")
        return found

    def previous(self, response_id: str) -> Stored:
        """The response a request continues, or a 400 naming ``previous_response_id`` (as OpenAI answers)."""
        found = self._find(response_id)
        if found is None:
            raise PreviousResponseNotFound(
                "previous_response_id", f"Previous response with id {response_id!r} not found (never stored, "
                f"stored with store: false, deleted, or older than {self.ttl:g} s)")
        return found

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        with self._lock:
            self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        gone = self._items.pop(response_id, None)
        if gone is not None:
            self._characters -= gone.characters

    def _find(self, response_id: str) -> Stored | None:
        with self._lock:
            found = self._items.get(response_id)
            if found is None:
                return None
            if found.expires_at <= self.clock():
                self._drop(response_id)
                return None
            self._items.move_to_end(response_id)
            return found
