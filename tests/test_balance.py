"""Balance routes: each call to the target with the fewest calls in flight, ties in turn, health probes and
the circuit breaker. The choice rule runs on the suite's own fault servers as replicas and a fake clock
(fast, exact); then a gateway `slm serve` balances three real `slm serve smollm2` replicas on loopback,
one of which dies and comes back. Nothing of HTTP is mocked; every wait is bounded."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from faults import ANSWER, FaultServer
from serving import SERVE_ARGS, Server, assert_no_traceback
from slm.errors import ConfigError, RemoteError
from slm.generation.stream import Chunk
from slm.remote import load_config
from test_cli import slm_cmd
from test_remote import HI, FakeClock, configure, route_on

WAIT = 30.0
"""Seconds any wait of these tests may take before it fails the test."""
DEPLOY = Path(__file__).parent.parent / "deploy"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FaultServer]]:
    started = {name: FaultServer() for name in "abc"}
    yield started
    for server in started.values():
        server.close()


@pytest.fixture
def replicas(servers: dict[str, FaultServer]) -> Iterator[dict[str, FaultServer]]:
    """Three fault servers as replicas ``a``, ``b`` and ``c``, healthy at the start of each test."""
    yield servers
    for server in servers.values():
        server.sick = False


def balance_config(replicas: dict[str, FaultServer], targets: list[str], **settings: object) -> str:
    lines = [f'[providers.{name}]\nbase_url = "{server.url}"\n' for name, server in replicas.items()]
    lines += ["[routes.r]", 'strategy = "balance"', f"targets = {json.dumps(targets)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def first_chunk(stream: Iterator[Chunk]) -> Chunk:
    """The stream's first chunk, read on a thread of its own: a call that blocks (a lock it should not
    take) fails the test within WAIT seconds instead of hanging it."""
    got: queue.Queue[Chunk] = queue.Queue()
    threading.Thread(target=lambda: got.put(next(stream)), daemon=True).start()
    return got.get(timeout=WAIT)


# --- configuration ----------------------------------------------------------------------------

def test_a_route_names_its_strategy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, '[routes.r]\ntargets = ["a:x", "b:x"]\nstrategy = "balance"\n'
                                     'health_interval = 3\n\n[routes.f]\ntargets = ["a:x"]\n')
    config = load_config()
    assert (config.routes["r"].strategy, config.routes["r"].health_interval) == ("balance", 3.0)
    assert config.routes["f"].strategy == "fallback"  # the default: in order
    listed = {row["alias"]: row["model"] for row in json.loads(slm_cmd("list", "--json", env=dict(os.environ)).stdout)}
    assert listed["r"] == "a:x | b:x"  # spread over, not tried in order


def test_the_deployments_gateway_balances_its_three_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_CONFIG", str(DEPLOY / "gateway.toml"))
    config = load_config()
    route = config.routes["smollm2-pool"]
    assert route.strategy == "balance" and len(route.targets) == 3
    assert all(config.remote(target) for target in route.targets)
    assert '"serve", "smollm2-pool"' in (DEPLOY / "compose.yaml").read_text()  # what the gateway serves


@pytest.mark.parametrize(("text", "needle"), [
    ("strategy = 'random'", "routes.r.strategy must be one of fallback, balance, got 'random'"),
    ("health_interval = 5", "routes.r.health_interval applies to strategy = \"balance\" only"),
    ("strategy = 'balance'\nhealth_interval = 0", "health_interval must be a positive number"),
])
def test_a_wrong_strategy_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, needle: str) -> None:
    configure(tmp_path, monkeypatch, f'[routes.r]\ntargets = ["a:x"]\n{text}\n')
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config()


# --- the choice rule --------------------------------------------------------------------------

def test_each_call_goes_to_the_target_with_the_fewest_calls_in_flight(
        replicas: dict[str, FaultServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, balance_config(replicas, ["a:ok", "b:ok", "c:ok"]))
    with route_on(FakeClock()) as route:
        streams: list[Iterator[Chunk]] = []

        def start() -> str:
            """A call opened and its first chunk read: it is in flight on the replica it went to until
            closed. Which replica that is, its request count says."""
            before = {name: server.hits["ok"] for name, server in replicas.items()}
            stream = route.chat_stream(HI)
            assert first_chunk(stream).text == ANSWER[0]
            streams.append(stream)
            (name,) = [name for name, server in replicas.items() if server.hits["ok"] > before[name]]
            return name

        assert [start() for _ in range(3)] == ["a", "b", "c"]
        assert route.outstanding() == {"a:ok": 1, "b:ok": 1, "c:ok": 1}
        # All equally loaded: in turn. Two calls in flight on one remote target: nothing holds it.
        assert [start() for _ in range(2)] == ["a", "b"]
        streams[0].close()  # a: 1, b: 2, c: 1
        assert start() == "c"  # a and c have the fewest; c is next in turn after b
        assert route.outstanding() == {"a:ok": 1, "b:ok": 2, "c:ok": 2}
        streams[1].close()
        streams[4].close()  # b: 0
        assert start() == "b"
        for stream in streams:
            stream.close()
        assert route.outstanding() == {"a:ok": 0, "b:ok": 0, "c:ok": 0}


def test_equal_load_goes_round_robin(replicas: dict[str, FaultServer], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, balance_config(replicas, ["a:ok", "b:ok", "c:ok"]))
    with route_on(FakeClock()) as route:
        served = [route.chat(HI).served_by for _ in range(6)]
        assert served == ["a:ok", "b:ok", "c:ok"] * 2
        assert all(route.metrics[f"answered:{name}:ok"] == 2 for name in "abc")
        assert route.outstanding() == {"a:ok": 0, "b:ok": 0, "c:ok": 0}


def test_a_call_in_flight_is_released_however_its_stream_ends(replicas: dict[str, FaultServer], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    idle = {"a:ok": 0, "b:ok": 0, "c:ok": 0}
    configure(tmp_path, monkeypatch, balance_config(replicas, ["a:ok", "b:ok", "c:ok"]))
    with route_on(FakeClock()) as route:
        unstarted = route.chat_stream(HI)  # not read yet: nothing picked, nothing held
        assert route.outstanding() == idle
        unstarted.close()
        stream = route.chat_stream(HI)
        first_chunk(stream)
        assert sum(route.outstanding().values()) == 1
        for chunk in stream:  # read to its end: released before the last chunk is handed out
            assert (route.outstanding() == idle) == (chunk.finish_reason is not None)
        assert route.chat(HI).text == "".join(ANSWER) and route.outstanding() == idle  # chat reads to the last
        stream = route.chat_stream(HI)
        first_chunk(stream)
        stream.close()  # the consumer stops
        assert route.outstanding() == idle
        stream = route.chat_stream(HI)
        for _ in stream:
            break
        del stream  # dropped without a close: the generator is closed as it goes
        assert route.outstanding() == idle
    configure(tmp_path, monkeypatch, balance_config(replicas, ["a:cut", "b:cut", "c:cut"], retries=0))
    with route_on(FakeClock()) as route:
        with pytest.raises(RemoteError, match="mid-answer"):  # the stream breaks after text
            list(route.chat_stream(HI))
        assert route.outstanding() == {"a:cut": 0, "b:cut": 0, "c:cut": 0}
        assert route.metrics["failed:a:cut"] == 1
    configure(tmp_path, monkeypatch, balance_config(replicas, ["a:500", "b:ok"], retries=0))
    with route_on(FakeClock()) as route:
        assert route.chat(HI).served_by == "b:ok"  # a failed before any text: the call went on to b
        assert route.outstanding() == {"a:500": 0, "b:ok": 0}


def test_a_failed_target_hands_the_call_to_the_next_least_loaded(
        replicas: dict[str, FaultServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, balance_config(replicas, ["a:500", "b:ok", "c:ok"], retries=1, backoff=0.01,
                                                    circuit_failures=2, circuit_cooldown=5))
    monkeypatch.setattr("random.random", lambda: 0.5)  # the jitter's middle: a factor of exactly 1
    clock = FakeClock()
    failed = replicas["a"].hits["500"]
    with route_on(clock) as route:
        held = route.chat_stream(HI)
        first_chunk(held)  # a first: it fails, is retried once after the backoff, and the call goes on to b
        assert replicas["a"].hits["500"] - failed == 2 and clock.slept == [0.01]
        assert route.outstanding() == {"a:500": 0, "b:ok": 1, "c:ok": 0}  # b holds it in flight
        assert route.chat(HI).served_by == "c:ok"  # next in turn
        # a again (in turn), which fails and opens its circuit: the call goes to c, the least loaded, not b,
        # the next in turn.
        assert route.chat(HI).served_by == "c:ok"
        assert replicas["a"].hits["500"] - failed == 4 and clock.slept == [0.01, 0.01]
        assert route.metrics["failed:a:500"] == 2 and route.metrics["circuit_opened:a:500"] == 1
        assert route.metrics["fallbacks"] == 2
        for _ in range(3):  # the circuit is open: a is not asked until its cooldown is over
            assert route.chat(HI).served_by == "c:ok"
        assert replicas["a"].hits["500"] - failed == 4
        clock.now += 5
        assert route.chat(HI).served_by == "c:ok" and replicas["a"].hits["500"] - failed == 6
        held.close()
        assert route.outstanding() == {"a:500": 0, "b:ok": 0, "c:ok": 0}


def test_a_target_whose_probe_fails_is_skipped_until_one_passes(
        replicas: dict[str, FaultServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, balance_config(replicas, ["a:ok", "b:ok", "c:ok"], health_interval=5))
    replicas["b"].sick = True
    probes = {name: server.probes for name, server in replicas.items()}
    asked = replicas["b"].hits["ok"]
    clock = FakeClock()
    with route_on(clock) as route:
        assert [route.chat(HI).served_by for _ in range(4)] == ["a:ok", "c:ok", "a:ok", "c:ok"]
        assert route.metrics["marked_down:b:ok"] == 1 and replicas["b"].hits["ok"] == asked
        assert all(server.probes == probes[name] + 1 for name, server in replicas.items())  # once per interval
        replicas["b"].sick = False
        clock.now += 4
        assert route.chat(HI).served_by != "b:ok"  # not probed again yet
        clock.now += 1
        assert {route.chat(HI).served_by for _ in range(3)} == {"a:ok", "b:ok", "c:ok"}
        assert route.metrics["marked_up:b:ok"] == 1
        assert all(server.probes == probes[name] + 2 for name, server in replicas.items())
        for server in replicas.values():
            server.sick = True
        clock.now += 5
        with pytest.raises(RemoteError, match="b:ok: skipped, its health probe failed"):
            route.chat(HI)
        assert route.metrics["skipped_down:a:ok"] == 1 and route.outstanding() == {"a:ok": 0, "b:ok": 0, "c:ok": 0}


# --- a gateway in front of three slm serve replicas ---------------------------------------------

def metric(url: str, series: str) -> float:
    """The value of one series in a server's /metrics (0 when it is not there yet)."""
    for line in httpx.get(f"{url}/metrics", timeout=WAIT).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def until(condition: Callable[[], bool], step: Callable[[], object]) -> None:
    """Run ``step`` (a call through the gateway) until ``condition`` holds, for WAIT seconds at most."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        step()
        time.sleep(0.1)


def test_a_gateway_balances_slm_serve_replicas_and_rides_out_one_that_dies(tmp_path: Path) -> None:
    import openai

    with contextlib.ExitStack() as stack:
        replicas = []
        for i in range(3):
            (tmp_path / f"replica{i}").mkdir()
            replicas.append(stack.enter_context(Server(tmp_path / f"replica{i}", "smollm2", *SERVE_ARGS)))
        targets = [f"rep{i}:smollm2" for i in range(3)]
        config = tmp_path / "config.toml"
        config.write_text("".join(f'[providers.rep{i}]\nbase_url = "{r.url}/v1"\n\n' for i, r in enumerate(replicas))
                          + f'[routes.r]\nstrategy = "balance"\ntargets = {json.dumps(targets)}\nretries = 0\n'
                          + "circuit_failures = 1\ncircuit_cooldown = 1\nhealth_interval = 3\n")
        (tmp_path / "gateway").mkdir()
        gateway = stack.enter_context(Server(tmp_path / "gateway", "r", env={"SLM_CONFIG": str(config)}))
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0, timeout=WAIT)
        served: list[str] = []  # by whom each call was answered

        def ask() -> str:
            reply = client.chat.completions.with_raw_response.create(model="r", messages=HI, max_tokens=3,
                                                                     temperature=0)
            assert reply.parse().choices[0].message.content is not None
            served.append(reply.headers["x-slm-served-by"])
            return served[-1]

        def route(event: str, target: str) -> float:
            return metric(gateway.url, f'slm_route_events_total{{route="r",event="{event}",target="{target}"}}')

        def submitted(replica: Server) -> float:
            return metric(replica.url, 'slm_requests_submitted_total{model="smollm2"}')

        # Spread: one at a time, in turn; nine at once, over all three (the first three go to each).
        assert [ask() for _ in range(3)] == targets
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            assert all(pool.map(lambda _: ask(), range(9)))
        counts = [submitted(r) for r in replicas]
        assert sum(counts) == 12 and min(counts) >= 2, counts
        assert [route("answered", t) for t in targets] == counts  # the gateway counts what the replicas saw
        outstanding = 'slm_route_outstanding_requests{{route="r",target="{}"}}'
        assert [metric(gateway.url, outstanding.format(t)) for t in targets] == [0, 0, 0]

        # rep1 dies just after a probe found it up: the next calls find out by failing on it.
        probed = 'slm_http_responses_total{path="/v1/models",status="200"}'
        seen = metric(replicas[1].url, probed)
        until(lambda: metric(replicas[1].url, probed) > seen, ask)
        port = replicas[1].port
        replicas[1].stop(signal.SIGKILL)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert all(pool.map(lambda _: ask(), range(3)))  # one of the three went to rep1 and moved on
        # Usually a call fails on it first (its circuit opens); on a stalled machine the probe may be first.
        until(lambda: route("marked_down", targets[1]) == 1, ask)  # a probe, at most 3 s later
        failed = route("failed", targets[1])
        assert route("circuit_opened", targets[1]) == failed  # one failure opens it
        assert metric(gateway.url, 'slm_route_events_total{route="r",event="fallbacks"}') == failed
        assert sum(route("answered", t) for t in targets) == len(served)  # every call was answered, elsewhere
        assert metric(gateway.url, 'slm_http_responses_total{path="/v1/chat/completions",status="200"}') == len(served)

        # rep1 comes back on its port: after a probe it takes calls again.
        (tmp_path / "replica1b").mkdir()
        stack.enter_context(Server(tmp_path / "replica1b", "smollm2", *SERVE_ARGS, port=port))
        answered = route("answered", targets[1])
        until(lambda: route("answered", targets[1]) > answered, ask)
        assert route("marked_up", targets[1]) == 1 and route("failed", targets[1]) == failed
        for server in (gateway, replicas[0], replicas[2]):
            assert_no_traceback(server)
