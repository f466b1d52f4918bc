"""Faults at the socket: a client that stops reading a stream, clients that leave streams at random points.
Each is bounded in time; the other requests complete, and the counters account for every one."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from serving import SERVE_ARGS, Server

ASK = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("faults"), "smollm2", *SERVE_ARGS, "--parallel", "8",
                "--write-timeout", "1") as s:
        yield s


def metric(server: Server, name: str, labels: str = 'model="smollm2"') -> float:
    text = httpx.get(f"{server.url}/metrics").text
    prefix = f"{name}{{{labels}}} "
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def wait_until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_a_client_that_never_reads_is_dropped_and_the_others_complete(server: Server) -> None:
    """The stalled client's socket takes a few kilobytes (a small receive buffer), its four choices with 20
    logprobs a token write far more: the server's writes wait, and after the write timeout (1 s here) the
    stream is dropped, its sequences freed. A normal request meanwhile completes."""
    before = {key: metric(server, f"slm_requests_{key}_total") for key in ("finished", "cancelled")}
    body = json.dumps({"model": "smollm2", "messages": ASK, "stream": True, "n": 4, "max_tokens": 600,
                       "logprobs": True, "top_logprobs": 20, "temperature": 0.9}).encode()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                           json={"model": "smollm2", "messages": ASK, "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        dropped = 'reason="slow_reader"'
        assert wait_until(lambda: metric(server, "slm_streams_dropped_total", dropped) == 1, 60), server.log()
        assert wait_until(lambda: server.stats()["running"] == 0, 10)
        after = {key: metric(server, f"slm_requests_{key}_total") for key in before}
        cancelled = after["cancelled"] - before["cancelled"]
        assert cancelled >= 1 and cancelled + after["finished"] - before["finished"] == 4 + 1  # its choices, ours
        assert server.stats()["kv_cells_reserved"] == 0
    finally:
        stalled.close()
    assert "read nothing for 1 s; stream dropped" in server.log()
    assert "Traceback" not in server.log(), server.log()


def test_clients_leaving_streams_at_random_points_leave_the_others_whole(server: Server) -> None:
    """Twelve streams at once; every other one is dropped by its client after a random number of chunks.
    The complete ones are whole (they end with [DONE] and their usage), and every request is counted as
    finished or cancelled."""
    before = {key: metric(server, f"slm_requests_{key}_total") for key in ("submitted", "finished", "cancelled")}
    rng = random.Random(5)
    leave_after = [rng.randint(1, 12) if i % 2 else None for i in range(12)]
    outcomes: list[str] = [""] * 12

    def client(i: int) -> None:
        body = {"model": "smollm2", "prompt": f"Story {i}: once upon a time", "max_tokens": 24, "stream": True,
                "temperature": 0.8, "seed": i, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            chunks = 0
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    outcomes[i] = "done"
                    return
                if line.startswith("data: "):
                    chunks += 1
                    if leave_after[i] is not None and chunks >= leave_after[i]:
                        outcomes[i] = "left"
                        return  # the with-block closes the connection mid-stream

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(o == ("left" if leave_after[i] is not None else "done") or o == "done" for i, o in enumerate(outcomes))
    assert outcomes.count("done") >= 6
    assert wait_until(lambda: server.stats()["running"] == 0, 10)
    after = {key: metric(server, f"slm_requests_{key}_total") for key in before}
    submitted = after["submitted"] - before["submitted"]
    assert submitted == 12
    assert after["finished"] - before["finished"] + after["cancelled"] - before["cancelled"] == submitted
    assert after["finished"] - before["finished"] >= outcomes.count("done")
