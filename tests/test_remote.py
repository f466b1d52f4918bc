"""Remote models and routes, over real HTTP on loopback: `slm serve` and llama-cpp-python's server as
OpenAI-compatible (and, for slm, Ollama) peers, and a misbehaving server of the suite's own (faults.py)
for everything that can go wrong. Nothing of HTTP is mocked."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

import slm
from faults import ANSWER, MARKUP, FaultServer
from serving import SERVE_ARGS, START_TIMEOUT, Server, free_port, module_server
from slm.errors import (
    ConfigError,
    InvalidParameter,
    MissingKey,
    RemoteBadResponse,
    RemoteContextExceeded,
    RemoteError,
    RemoteRejected,
    RemoteTimeout,
    RemoteUnavailable,
)
from slm.remote import RemoteModel, Router, load_config
from slm.remote.config import PRESETS, Provider
from test_cli import one_line_error, slm_cmd

HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultServer]:
    server = FaultServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, "remote-peer")


def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("SLM_CONFIG", str(path))
    return path


def fault_model(faults: FaultServer, behaviour: str, timeout: float = 10.0) -> RemoteModel:
    return RemoteModel(Provider("fault", "openai", faults.url, api_key_env="FAULT_KEY"), behaviour, timeout=timeout)


class FakeClock:
    """time.monotonic for a route and the remote models it opens: it moves only when the test moves it, or
    when the route sleeps (its backoff), which is recorded instead of waited for."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def route_on(clock: FakeClock, name: str = "r") -> Router:
    """The configured route ``name`` with ``clock``; its targets (remote ones) are opened on the same clock,
    so the deadlines it hands them are theirs too."""
    config = load_config()

    def load(target: str) -> RemoteModel:
        remote = config.remote(target)
        assert remote is not None, target
        return RemoteModel(*remote, clock=clock)

    return Router(config.routes[name], load, clock=clock, sleep=clock.sleep)


@contextlib.contextmanager
def llama_cpp_server(model: Path, log_path: Path) -> Iterator[str]:
    """llama-cpp-python's server on a port it picks; its URL once it listens. A thread copies its output to
    ``log_path`` and watches for uvicorn's "running on" line, which it writes after binding the socket."""
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
                                "127.0.0.1", "--port", "0", "--n_ctx", "1024", "--n_threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    urls: queue.Queue[str | None] = queue.Queue()

    def copy() -> None:
        assert process.stdout is not None
        with log_path.open("wb") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if found := re.search(rb"Uvicorn running on (http://[\d.]+:\d+)", line):
                    urls.put(found.group(1).decode())
        urls.put(None)  # the output ended: the server exited

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    try:
        try:
            url = urls.get(timeout=START_TIMEOUT)  # bounds a server that never starts; no polling
        except queue.Empty:
            url = None
        assert url is not None, log_path.read_text(errors="replace")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        copier.join(30)


@pytest.fixture
def handled(faults: FaultServer, monkeypatch: pytest.MonkeyPatch) -> queue.Queue[tuple[str, str]]:
    """("start" | "end", model) for each request the fault server takes from now on, as it happens: a test
    waits for the fault server's side of a call to end instead of sleeping."""
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    handler = faults.httpd.RequestHandlerClass
    original = handler.do_POST  # type: ignore[attr-defined]

    def do_post(self: BaseHTTPRequestHandler) -> None:
        rfile = self.rfile
        raw = rfile.read(int(self.headers.get("Content-Length", 0)))
        model = str(json.loads(raw or b"{}").get("model", ""))
        self.rfile = io.BytesIO(raw)  # the handler reads the body again
        events.put(("start", model))
        try:
            original(self)
        finally:
            self.rfile = rfile
            events.put(("end", model))

    monkeypatch.setattr(handler, "do_POST", do_post)
    return events


# --- configuration and keys ---------------------------------------------------------------

def test_the_configuration_file_defines_providers_models_and_routes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = configure(tmp_path, monkeypatch, """
[providers.cluster]
base_url = "http://gpu-box:8000/v1"
api_key_env = "CLUSTER_KEY"

[providers.lab]
type = "ollama"
base_url = "http://lab:11434"

[models]
phi-cloud = "github:Phi-3.5-mini-instruct"
moe = "cluster:microsoft/Phi-3.5-MoE-instruct"

[routes.hybrid]
targets = ["smollm2", "phi-cloud"]
max_prompt_tokens = [1500, 0]
timeout = 30
retries = 2

[prices]
phi-cloud = { input = 0.13, output = 0.52 }
smollm2 = { output = 1 }
""")
    config = load_config()
    assert config.path == path
    assert config.providers["lab"].kind == "ollama" and config.providers["cluster"].extended_sampling
    assert config.remote("phi-cloud") == (PRESETS["github"], "Phi-3.5-mini-instruct")
    assert config.remote("moe") == (config.providers["cluster"], "microsoft/Phi-3.5-MoE-instruct")
    assert config.remote("smollm2") is None and config.remote("gemma3:270m") is None  # local names
    route = config.routes["hybrid"]
    assert route.targets == ("smollm2", "phi-cloud") and route.max_prompt_tokens == (1500, 0)
    assert (route.timeout, route.retries) == (30.0, 2)
    assert config.price("phi-cloud").cost(1_000_000, 2_000_000) == pytest.approx(0.13 + 2 * 0.52)
    assert config.price("smollm2:latest").cost(100, 1000) == pytest.approx(0.001)  # input 0 when not given
    assert config.price("moe").cost(10**6, 10**6) == 0  # not priced: 0


@pytest.mark.parametrize(("text", "needle"), [
    ("[provider.x]\nbase_url = 'http://a'", "unknown section 'provider'"),
    ("[providers.x]\nbase_url = 'http://a'\napi_key = 'sk-123'", "api_key_env"),
    ("[providers.x]\nbase_url = 'ftp://a'", "must start with http"),
    ("[providers.x]\ntype = 'grpc'\nbase_url = 'http://a'", "type 'grpc'"),
    ("[providers.x]\napi_key_env = 'K'", "needs base_url"),
    ("[models]\nfast = 'nowhere:model'", "no known provider"),
    ("[routes.r]\ntargets = []", "non-empty list"),
    ("[routes.r]\ntargets = ['a', 'b']\nmax_prompt_tokens = [1]", "one count"),
    ("[routes.r]\ntargets = ['a']\ntimeout = -1", "timeout must be a positive"),
    ("[routes.r]\ntargets = ['a']\nretries = 'two'", "retries must be an integer"),
    ("[routes.r\ntargets = ['a']", "not valid TOML"),
    ("[prices]\nphi = { input = -1 }", "prices.phi.input must be a number"),
    ("[prices]\nphi = { input = 'cheap' }", "prices.phi.input must be a number"),
    ("[prices]\nphi = { inputs = 1 }", "unknown key 'inputs'"),
    ("[prices]\nphi = 3", r"\[prices\] must hold tables"),
])
def test_a_wrong_configuration_gets_an_error_that_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             text: str, needle: str) -> None:
    configure(tmp_path, monkeypatch, text)
    with pytest.raises(ConfigError, match=needle) as caught:
        load_config()
    assert "sk-123" not in str(caught.value)  # a secret put in the file is never echoed


def test_missing_keys_and_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("GITHUB_TOKEN", "NVIDIA_API_KEY", "AZURE_AI_API_KEY", "AZURE_AI_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SLM_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="absent.toml"):
        slm.load("github:Phi-3.5-mini-instruct")
    monkeypatch.delenv("SLM_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))  # no configuration file: the presets alone
    with pytest.raises(MissingKey, match="GITHUB_TOKEN"):
        slm.load("github:Phi-3.5-mini-instruct")
    with pytest.raises(MissingKey, match="NVIDIA_API_KEY"):
        slm.load("nim:microsoft/phi-3.5-moe-instruct")
    with pytest.raises(MissingKey, match="AZURE_AI_ENDPOINT"):
        slm.load("azure:Phi-3.5-MoE-instruct")
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_TOKEN", "SLM_CONFIG")} | {"HOME": str(tmp_path)}
    one_line_error(slm_cmd("run", "github:Phi-3.5-mini-instruct", "hi", env=env), "GITHUB_TOKEN")
    one_line_error(slm_cmd("run", "nowhere:model", "hi", env=env), "unknown model")


def test_a_provider_refuses_parameters_it_does_not_take_before_any_request(monkeypatch: pytest.MonkeyPatch,
                                                                           faults: FaultServer) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "test-token")
    github = RemoteModel(PRESETS["github"], "Phi-3.5-mini-instruct")
    for name, value in (("min_p", 0.1), ("top_k", 5), ("repetition_penalty", 1.1), ("logprobs", True)):
        with pytest.raises(InvalidParameter, match=name):
            github.chat(HI, **{name: value})
    with pytest.raises(InvalidParameter, match="chat only"):
        github.generate("Once upon a time")
    cluster = RemoteModel(  # a server of one's own takes llama.cpp's sampling too...
        Provider("fault", "openai", faults.url, extended_sampling=True), "ok")
    assert cluster.chat(HI, top_k=5, min_p=0.1).text == "".join(ANSWER)
    with pytest.raises(InvalidParameter, match="logits_processors"):  # ...but not Python callbacks
        cluster.chat(HI, logits_processors=[lambda ids, logits: logits])


# --- real peers -------------------------------------------------------------------------------

def test_chat_and_streaming_through_slm_serve_as_an_openai_compatible_provider(
        served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, f'[providers.box]\nbase_url = "{served.url}/v1"\n\n'
                                     f'[providers.box-ollama]\ntype = "ollama"\nbase_url = "{served.url}"\n')
    with slm.load("box:smollm2") as model:
        reply = model.chat(HI, temperature=0, max_tokens=12, top_k=1, min_p=0.0)
        assert reply.text and reply.finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens >= 1
        assert reply.served_by == "box:smollm2"
        chunks = list(model.chat_stream(HI, temperature=0, max_tokens=12))
        assert "".join(c.text for c in chunks) == reply.text  # greedy: the same answer streamed
        assert chunks[-1].finish_reason and chunks[-1].timings is not None
        raw = model.generate("The capital of France is", temperature=0, max_tokens=5)
        assert raw.text and raw.usage.completion_tokens <= 5
    with slm.load("box-ollama:smollm2") as model:  # Ollama's own API, served by slm
        reply = model.chat(HI, temperature=0, max_tokens=12)
        assert reply.text and reply.usage.prompt_tokens > 5 and reply.served_by == "box-ollama:smollm2"


def test_chat_and_streaming_through_llama_cpp_pythons_server(smollm2_path: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with llama_cpp_server(smollm2_path, tmp_path / "llama-server.log") as url:
        configure(tmp_path, monkeypatch, f'[providers.llama]\nbase_url = "{url}/v1"\n')
        with slm.load("llama:smollm2") as model:
            reply = model.chat(HI, temperature=0, max_tokens=10)
            assert reply.text and reply.finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
            streamed = "".join(c.text for c in model.chat_stream(HI, temperature=0, max_tokens=10))
            assert streamed == reply.text


# --- faults on one provider -----------------------------------------------------------------

def test_every_fault_is_a_clear_error_and_none_hangs(faults: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULT_KEY", "secret-value-123")
    cases: list[tuple[str, type[RemoteError], str]] = [
        ("500", RemoteError, "HTTP 500"), ("429", RemoteError, "HTTP 429"),
        ("401", RemoteRejected, "API key"), ("context", RemoteContextExceeded, "context length"),
        ("cut", RemoteBadResponse, "before the answer did"), ("badjson", RemoteBadResponse, "not JSON"),
    ]
    for behaviour, kind, needle in cases:
        with pytest.raises(kind, match=needle) as caught:
            fault_model(faults, behaviour).chat(HI)
        assert "secret-value-123" not in str(caught.value)
    assert not RemoteRejected("x").retryable and RemoteError("x").retryable
    assert faults.authorization[-1] == "Bearer secret-value-123"  # the key goes in the header, only there
    # A real stalled server (it answers a 500 after 30 s): only the client's own timeout ends this.
    with pytest.raises(RemoteTimeout, match="no answer within 1 s"):
        fault_model(faults, "stall", timeout=1.0).chat(HI)
    nothing = RemoteModel(Provider("gone", "openai", f"http://127.0.0.1:{free_port()}/v1"), "m")
    with pytest.raises(RemoteUnavailable, match="cannot connect"):
        nothing.chat(HI)
    tls = RemoteModel(Provider("tls", "openai", f"https://127.0.0.1:{faults.port}/v1"), "ok")  # plain HTTP there
    with pytest.raises(RemoteUnavailable):
        tls.chat(HI)
    dns = RemoteModel(Provider("dns", "openai", "http://no-such-host.invalid/v1"), "m", timeout=10)
    with pytest.raises(RemoteUnavailable):
        dns.chat(HI)


def test_a_remote_models_deadline_is_kept_on_its_clock(faults: FaultServer) -> None:
    clock = FakeClock()
    before = faults.hits["slow"]
    with RemoteModel(Provider("fault", "openai", faults.url), "slow", clock=clock) as model:
        with pytest.raises(RemoteTimeout, match="no time left"):
            model.chat(HI, deadline=clock.now)
        assert faults.hits["slow"] == before  # nothing left of the deadline: no request sent
        chunks = model.chat_stream(HI, deadline=clock.now + 10)
        assert next(chunks).text == "."
        clock.now += 10.5  # a trickle of pieces (one every 0.1 s) cannot outlast the deadline
        with pytest.raises(RemoteTimeout, match="still coming at the deadline"):
            for _ in chunks:
                pass


# --- routes -----------------------------------------------------------------------------------

def route_config(faults: FaultServer, targets: list[str], **settings: object) -> str:
    lines = [f'[providers.fault]\nbase_url = "{faults.url}"\n', "[routes.r]", f"targets = {json.dumps(targets)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def test_the_route_falls_back_retries_and_says_who_answered(faults: FaultServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:500", "fault:ok"], retries=1, backoff=0.01))
    before = faults.hits["500"]
    clock = FakeClock()
    with route_on(clock) as route:
        reply = route.chat(HI)
        assert reply.text == "".join(ANSWER) and reply.served_by == "fault:ok"
        assert faults.hits["500"] - before == 2  # tried, retried once, then left
        assert route.metrics["fallbacks"] == 1 and route.metrics["answered:fault:ok"] == 1
    assert len(clock.slept) == 1 and 0.005 <= clock.slept[0] < 0.015  # the backoff, with jitter (x0.5 to 1.5)
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:flaky2", "fault:ok"], retries=2, backoff=0.01))
    clock = FakeClock()
    monkeypatch.setattr("random.random", lambda: 0.5)  # the jitter's middle: a factor of exactly 1
    with route_on(clock) as route:
        assert route.chat(HI).served_by == "fault:flaky2"  # the third attempt worked: no fallback
        assert route.metrics["fallbacks"] == 0 and faults.hits["flaky2"] == 3
    assert clock.slept == [0.01, 0.02]  # the backoff doubles at each retry
    # Through slm.load: each first target fails its own way, and the route falls back. Alone, the route
    # says why it failed; a stalled target is given up at the route's timeout of 1 s (the client's own
    # timeout against a real stalled server: the one real wait here).
    for first, why in (("refused", "cannot connect"), ("429", "HTTP 429"), ("401", "HTTP 401"),
                       ("context", "context length"), ("badjson", "not JSON"), ("stall", "no answer within 1 s")):
        target = f"gone:{first}" if first == "refused" else f"fault:{first}"
        text = route_config(faults, [target, "fault:ok"], retries=0, timeout=1)
        text += f'\n[routes.alone]\ntargets = ["{target}"]\nretries = 0\ntimeout = 1\n'
        text += f'\n[providers.gone]\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
        configure(tmp_path, monkeypatch, text)
        with slm.load("r") as route:
            assert route.chat(HI).served_by == "fault:ok", first
        with slm.load("alone") as route, pytest.raises(RemoteError, match=f"{target}: .*{why}"):
            route.chat(HI)


def test_the_route_respects_its_deadline(faults: FaultServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Every attempt fails at once (HTTP 500, worth retrying), and the backoff is longer than the deadline.
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:500", "fault:ok"], timeout=5, deadline=1.5,
                                                  retries=3, backoff=10))
    clock = FakeClock()
    failed, answered = faults.hits["500"], faults.hits["ok"]
    with route_on(clock) as route, pytest.raises(RemoteTimeout, match="deadline of 1.5 s"):
        route.chat(HI)
    assert clock.slept == [1.5]  # the backoff was cut to what was left of the deadline...
    assert faults.hits["500"] - failed == 1 and faults.hits["ok"] == answered  # ...then nothing more was tried
    # An attempt gets what is left of the deadline when that is less than the route's timeout: a stalled
    # target is given up after 1 s, not 5 (the clock stands still; the wait is the client's real timeout).
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:stall"], timeout=5, deadline=1, retries=0))
    with route_on(FakeClock()) as route, pytest.raises(RemoteError, match="fault:stall: no answer within 1 s"):
        route.chat(HI)


def test_the_circuit_opens_after_failures_and_closes_after_the_cooldown(faults: FaultServer, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:500", "fault:ok"], retries=0,
                                                  circuit_failures=2, circuit_cooldown=1.0))
    clock = FakeClock()
    with route_on(clock) as route:
        before = faults.hits["500"]
        for _ in range(4):
            assert route.chat(HI).served_by == "fault:ok"
        assert faults.hits["500"] - before == 2  # after two failures in a row it is skipped...
        assert route.metrics["circuit_opened:fault:500"] == 1 and route.metrics["skipped_open:fault:500"] == 2
        opened = clock.now  # the clock has not moved: the circuit opened at this instant
        clock.now = opened + 0.5
        assert route.chat(HI).served_by == "fault:ok"
        assert faults.hits["500"] - before == 2 and route.metrics["skipped_open:fault:500"] == 3  # ...for 1 s...
        clock.now = opened + 1.0
        route.chat(HI)
        assert faults.hits["500"] - before == 3  # ...then, the cooldown over, it is tried again


def test_a_stream_cut_after_text_is_an_error_not_a_silent_switch(faults: FaultServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:cut", "fault:ok"], retries=0))
    with slm.load("r") as route:
        received: list[str] = []
        with pytest.raises(RemoteError, match="mid-answer"):
            for chunk in route.chat_stream(HI):
                received.append(chunk.text)
        assert "".join(received) == "".join(ANSWER[:2])  # what was shown stays the cut target's
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:500", "fault:401"], retries=0))
    with slm.load("r") as route, pytest.raises(RemoteError, match=r"fault:500: .*HTTP 500.*fault:401: .*HTTP 401"):
        route.chat(HI)


def test_hybrid_route_local_small_model_first_then_the_cloud(faults: FaultServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, route_config(faults, ["smollm2", "fault:ok"], max_prompt_tokens=[60, 0]))
    with slm.load("r", n_ctx=256, threads=1) as route:
        short = route.chat(HI, temperature=0, max_tokens=8)
        assert short.served_by == "smollm2" and short.text
        long = route.chat([{"role": "user", "content": "Summarize: " + "the cat sat on the mat. " * 40}])
        assert long.served_by == "fault:ok" and route.metrics["skipped_long:smollm2"] == 1
    configure(tmp_path, monkeypatch, route_config(faults, ["smollm2", "fault:ok"]))  # no rule: the context decides
    with slm.load("r", n_ctx=128, threads=1) as route:
        reply = route.chat([{"role": "user", "content": "Summarize: " + "the cat sat on the mat. " * 40}],
                           max_tokens=16)
        assert reply.served_by == "fault:ok" and route.metrics["fallbacks"] == 1
        assert route.metrics["failed:smollm2"] == 0  # the prompt's doing, not the target's: no circuit count


def test_the_cli_runs_a_route_and_says_who_answered(faults: FaultServer, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(route_config(faults, ["fault:500", "fault:ok"], retries=0))
    result = slm_cmd("run", "r", "Say hello.", "--json", env={**os.environ, "SLM_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"] == "".join(ANSWER) and answer["served_by"] == "fault:ok"
    result = slm_cmd("run", "fault:ok", "Say hello.", "--min-p", "0.2", env={**os.environ, "SLM_CONFIG": str(path)})
    assert result.returncode == 0 and result.stdout.strip() == "".join(ANSWER)  # a server of one's own: extended
    bad = slm_cmd("run", "fault:401", "hi", env={**os.environ, "SLM_CONFIG": str(path)})
    assert bad.returncode != 0 and "HTTP 401" in bad.stderr and "Traceback" not in bad.stderr
    refused = slm_cmd("bench", "fault:ok", "-p", "8", "-n", "2", env={**os.environ, "SLM_CONFIG": str(path)})
    assert refused.returncode == 1 and "slm bench measures local models" in " ".join(refused.stdout.split())
    listed = {row["alias"]: row for row in json.loads(slm_cmd("list", "--json", env={
        **os.environ, "SLM_CONFIG": str(path)}).stdout)}
    assert listed["r"]["format"] == "route" and listed["r"]["model"] == "fault:500 -> fault:ok"


# --- slm serve as a gateway -----------------------------------------------------------------

def test_slm_serve_is_a_gateway_to_remote_models_and_routes(faults: FaultServer, tmp_path: Path) -> None:
    import ollama
    import openai

    config = tmp_path / "config.toml"
    config.write_text(route_config(faults, ["fault:500", "fault:ok"], retries=0)
                      + '\n[routes.broken]\ntargets = ["fault:500", "fault:401"]\nretries = 0\n')
    with Server(tmp_path, "smollm2", "r", "fault:ok", "broken", *SERVE_ARGS,
                env={"SLM_CONFIG": str(config)}) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        assert {"smollm2", "r", "fault:ok", "broken"} <= {m.id for m in client.models.list()}
        reply = client.chat.completions.with_raw_response.create(model="r", messages=HI)
        assert reply.headers["x-slm-served-by"] == "fault:ok"
        parsed = reply.parse()
        assert parsed.choices[0].message.content == "".join(ANSWER) and parsed.model == "r"
        assert parsed.usage is not None and parsed.usage.completion_tokens == len(ANSWER)
        chunks = list(client.chat.completions.create(model="r", messages=HI, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(ANSWER)
        assert chunks[-1].model_extra and chunks[-1].model_extra["served_by"] == "fault:ok"
        local = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=4)  # local beside remote
        assert local.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="one choice"):
            client.chat.completions.create(model="r", messages=HI, n=2)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="broken", messages=HI)
        assert failed.value.status_code == 502 and "no target answered" in str(failed.value)
        answer = ollama.Client(host=server.url).chat(model="r", messages=HI)
        assert answer.message.content == "".join(ANSWER)
        streamed = "".join(part.message.content for part in ollama.Client(host=server.url).chat(
            model="fault:ok", messages=HI, stream=True))
        assert streamed == "".join(ANSWER)
        generated = ollama.Client(host=server.url).generate(model="fault:ok", prompt="Say hello.")
        assert generated.response == "".join(ANSWER)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'slm_route_events_total{route="r",event="fallbacks"} 3' in metrics  # three calls, each fell back
        assert 'slm_route_events_total{route="r",event="answered",target="fault:ok"} 3' in metrics
        assert 'slm_route_events_total{route="broken",event="failed",target="fault:401"} 1' in metrics
    assert "Traceback" not in server.log()


def test_a_key_can_come_from_the_os_keyring(monkeypatch: pytest.MonkeyPatch, faults: FaultServer) -> None:
    import keyring
    from keyring.backend import KeyringBackend

    class InMemory(KeyringBackend):
        priority = 1  # type: ignore[assignment]
        secrets = {("slm", "fault"): "from-the-keyring"}

        def get_password(self, service: str, username: str) -> str | None:
            return self.secrets.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.secrets[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            self.secrets.pop((service, username), None)

    previous = keyring.get_keyring()
    keyring.set_keyring(InMemory())
    try:
        monkeypatch.delenv("FAULT_KEY", raising=False)
        required = Provider("fault", "openai", faults.url, api_key_env="FAULT_KEY", key_required=True)
        assert RemoteModel(required, "ok").chat(HI).text == "".join(ANSWER)
        assert faults.authorization[-1] == "Bearer from-the-keyring"
        monkeypatch.setenv("FAULT_KEY", "from-the-environment")  # the environment comes first
        RemoteModel(required, "ok").chat(HI)
        assert faults.authorization[-1] == "Bearer from-the-environment"
        monkeypatch.delenv("FAULT_KEY")
        InMemory.secrets.clear()
        with pytest.raises(MissingKey, match="FAULT_KEY.*keyring set slm fault"):
            RemoteModel(required, "ok")
    finally:
        keyring.set_keyring(previous)


# --- what a review found ----------------------------------------------------------------------

def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(monkeypatch: pytest.MonkeyPatch,
                                                                     faults: FaultServer) -> None:
    monkeypatch.setenv("FAULT_KEY", "ghp_SECRET123\n# pasted from a file")
    with pytest.raises(MissingKey, match="FAULT_KEY has characters") as caught:
        fault_model(faults, "ok")
    assert "SECRET" not in str(caught.value)


def test_json_of_another_shape_is_a_bad_response_and_the_route_falls_back(faults: FaultServer, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RemoteBadResponse, match="another shape"):
        fault_model(faults, "weird").chat(HI)
    configure(tmp_path, monkeypatch, route_config(faults, ["fault:weird", "fault:ok"], retries=0))
    with slm.load("r") as route:
        assert route.chat(HI).served_by == "fault:ok"


def test_routes_that_loop_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(tmp_path, monkeypatch, '[routes.a]\ntargets = ["b"]\n[routes.b]\ntargets = ["a", "smollm2"]\n')
    with pytest.raises(ConfigError, match="routes loop: a -> b -> a"):
        load_config()


def test_ollama_host_as_ollama_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:11500")
    assert RemoteModel(PRESETS["ollama"], "m")._url == "http://127.0.0.1:11500"
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box")
    assert RemoteModel(PRESETS["ollama"], "m")._url == "http://gpu-box:11434"
    monkeypatch.delenv("OLLAMA_HOST")
    assert RemoteModel(PRESETS["ollama"], "m")._url == "http://127.0.0.1:11434"


def test_a_parameter_set_to_slms_default_is_still_sent(faults: FaultServer) -> None:
    model = fault_model(faults, "ok")
    model.chat(HI, temperature=0.8, top_p=0.95)  # slm's defaults, but asked for: the provider's differ
    assert faults.bodies["ok"]["temperature"] == 0.8 and faults.bodies["ok"]["top_p"] == 0.95
    model.chat(HI)
    assert "temperature" not in faults.bodies["ok"]  # not asked for: the provider's own default


def test_the_callers_mistakes_do_not_open_the_circuit(faults: FaultServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    text = route_config(faults, ["strict:ok"], retries=0, circuit_failures=2)
    text += f'\n[providers.strict]\nbase_url = "{faults.url}"\nextended_sampling = false\n'
    configure(tmp_path, monkeypatch, text)
    with slm.load("r") as route:
        for _ in range(3):
            with pytest.raises(InvalidParameter, match="top_k"):  # a 400 in the server, not a 502
                route.chat(HI, top_k=5)
        assert route.chat(HI).served_by == "strict:ok"  # still tried: the circuit did not open
        assert route.metrics["circuit_opened:strict:ok"] == 0


def test_a_local_target_answers_one_thread_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    configure(tmp_path, monkeypatch, '[routes.r]\ntargets = ["smollm2"]\n')
    with slm.load("r", n_ctx=256, threads=1, max_sequences=1) as route:
        alone = route.chat(HI, temperature=0, max_tokens=12).text
        answers: list[str] = []
        errors: list[Exception] = []

        def ask() -> None:
            try:
                answers.append(route.chat(HI, temperature=0, max_tokens=12).text)
            except Exception as e:  # noqa: BLE001 (collected and checked below)
                errors.append(e)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and answers == [alone] * 4


def test_a_client_that_leaves_ends_the_remote_call(faults: FaultServer, tmp_path: Path,
                                                   handled: queue.Queue[tuple[str, str]]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(route_config(faults, ["fault:ok"]))
    with Server(tmp_path, "fault:slow", "fault:ok", env={"SLM_CONFIG": str(config)}) as server:
        finished = faults.finished["slow"]
        body = json.dumps({"model": "fault:slow", "messages": HI}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as client:  # a plain answer, not streamed...
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert handled.get(timeout=30) == ("start", "slow")  # ...asked upstream; then the client goes
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=10,
                          json={"model": "fault:slow", "messages": HI, "stream": True}) as response:
            next(response.iter_lines())  # one piece, then the client goes
        # Each upstream answer ends at the fault server: cut off (it notices within 0.1 s), or read to its end.
        events = [handled.get(timeout=30) for _ in range(3)]
        assert sorted(events) == [("end", "slow"), ("end", "slow"), ("start", "slow")]
        assert faults.finished["slow"] == finished  # neither answer was read to its end upstream
        tags = httpx.get(f"{server.url}/api/tags").json()["models"]
        assert {"fault:slow", "fault:ok"} <= {m["name"] for m in tags}
        loaded = httpx.post(f"{server.url}/api/chat", json={"model": "fault:ok:latest", "messages": []}).json()
        assert loaded["done_reason"] == "load"
        import ollama

        shown = ollama.Client(host=server.url).show("fault:ok")  # what Ollama's own CLI asks first
        assert shown.details is not None and shown.details.format == "remote"
    assert "Traceback" not in server.log()


def test_compare_shows_answers_as_text_never_as_markup(faults: FaultServer, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(route_config(faults, ["fault:ok"]))
    result = slm_cmd("compare", "fault:markup", "fault:ok", "--prompt", "a[b]", env={
        **os.environ, "SLM_CONFIG": str(path), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    assert " ".join("".join(MARKUP).split()) in shown and "a[b]" in shown and "fault:markup" in shown
