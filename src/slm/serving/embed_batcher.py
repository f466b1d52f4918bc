"""Embedding requests -> batched forward passes on one thread of their own.

Requests arrive already tokenized and checked (``EmbeddingModel.token_batches``). The thread takes the
first waiting request and every other one waiting then, up to ``max_sequences`` sequences, and embeds
them together (``EmbeddingModel.embed_tokens``): requests that arrive while a pass runs share the next.
Each request's vectors go back through its own future; the event loop never waits on compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from slm.errors import QueueFull
from slm.model.embedding import EmbeddingModel


@dataclass(eq=False)
class _Request:
    batches: list[list[int]]
    future: Future[np.ndarray] = field(default_factory=Future)


class EmbedBatcher:
    """One embedding model's thread, merging the sequences of waiting requests into shared passes."""

    def __init__(self, model: EmbeddingModel, max_sequences: int = 64, max_queue: int = 64) -> None:
        self.model = model
        self.max_sequences = max_sequences
        self._queue: queue.Queue[_Request | None] = queue.Queue(max_queue)
        self.passes = 0
        """Batches run so far (tests read it to see requests merged)."""
        self.requests = 0
        self._running = 0  # requests taken from the queue, not answered yet
        self._thread = threading.Thread(target=self._run, name=f"slm-embed-{model.name}", daemon=True)
        self._thread.start()

    def submit(self, batches: Sequence[Sequence[int]]) -> Future[np.ndarray]:
        """The vectors of ``batches`` (token ids, checked), once a pass has run them."""
        request = _Request([list(b) for b in batches])
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"too many embedding requests wait for {self.model.name}; retry later") from None
        return request.future

    def pending(self) -> int:
        """Requests waiting or being embedded."""
        return self._queue.qsize() + self._running

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            self._running = 1
            taken, stop = [first], False
            count = len(first.batches)
            while count < self.max_sequences:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                taken.append(more)
                self._running += 1
                count += len(more.batches)
            self._embed(taken)
            self._running = 0
            if stop:
                return

    def _embed(self, taken: list[_Request]) -> None:
        sequences = [ids for request in taken for ids in request.batches]
        try:
            vectors = self.model.embed_tokens(sequences)
        except Exception as e:  # handed to every request of the pass; the thread goes on
            for request in taken:
                request.future.set_exception(e)
            return
        self.passes += 1
        self.requests += len(taken)
        start = 0
        for request in taken:
            request.future.set_result(vectors[start : start + len(request.batches)])
            start += len(request.batches)

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join()
