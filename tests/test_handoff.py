"""The hand-off of chunks from an engine thread to the event loop: in order, and one wake-up of the loop for
all that was posted while it was busy."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from slm.server.backends import Handoff


class Counting(Handoff):
    def __init__(self) -> None:
        super().__init__()
        self.deliveries = 0

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        self.deliveries += 1
        super()._deliver(loop)


def test_what_is_posted_while_the_loop_is_busy_arrives_in_order_in_one_wake_up() -> None:
    async def main() -> tuple[list[tuple[int, int]], int]:
        handoff = Counting()
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[tuple[int, int]]] = [asyncio.Queue() for _ in range(3)]
        posted = threading.Event()

        def engine_step() -> None:  # a step that delivers 5 tokens to each of 3 requests
            for token in range(5):
                for index, queue in enumerate(queues):
                    handoff.post(loop, queue, (index, token))
            posted.set()

        thread = threading.Thread(target=engine_step)
        thread.start()
        posted.wait(10)  # the loop is busy (blocked here) while the thread posts
        thread.join()
        got = [await asyncio.wait_for(queue.get(), 5) for queue in queues for _ in range(5)]
        return got, handoff.deliveries

    got, deliveries = asyncio.run(main())
    assert got == [(index, token) for index in range(3) for token in range(5)]
    assert deliveries == 1


def test_posts_after_a_delivery_wake_the_loop_again() -> None:
    async def main() -> int:
        handoff = Counting()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for step in range(3):
            threading.Thread(target=handoff.post, args=(loop, queue, step)).start()
            assert await asyncio.wait_for(queue.get(), 5) == step
        return handoff.deliveries

    assert asyncio.run(main()) == 3


def test_posting_to_a_closed_loop_raises_so_that_the_scheduler_drops_the_request() -> None:
    loop = asyncio.new_event_loop()
    queue: asyncio.Queue[int] = asyncio.Queue()
    loop.close()
    with pytest.raises(RuntimeError):
        Handoff().post(loop, queue, 1)
    handoff = Handoff()
    other = asyncio.new_event_loop()
    handoff.post(other, queue, 1)  # the loop has not run yet: the item waits for it
    other.close()
    started = time.perf_counter()
    with pytest.raises(RuntimeError):
        handoff.post(other, queue, 2)
    assert time.perf_counter() - started < 1
