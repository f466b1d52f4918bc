"""`slm serve` as a real subprocess on a loopback port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

SLM = Path(sys.executable).parent / "slm"
START_TIMEOUT = 120
# One llama.cpp thread: several-fold faster than contended threads on a small shared machine.
SERVE_ARGS = ["--ctx-size", "2048", "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`slm serve ARGS --port <free port>` (or ``port``: a server started again where one was), started and
    waited for until /health answers."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"serve-{self.port}.log"
        environment = {k: v for k, v in os.environ.items() if k not in ("SLM_VERBOSE", "SLM_API_KEY", "SLM_HOME")}
        environment["SLM_HOME"] = str(workdir / "home")
        environment.update(env or {})
        command = [str(SLM)] if SLM.exists() else [sys.executable, "-m", "slm"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, "serve", *args, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment, cwd=workdir,
            )
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"slm serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"slm serve did not answer /health within {START_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self, model: str = "smollm2") -> dict[str, int]:
        return self.models()[model]

    def models(self) -> dict[str, dict[str, int]]:
        """The loaded models' scheduler counters, by the name the server gives each."""
        models: dict[str, dict[str, int]] = httpx.get(f"{self.url}/health").json()["models"]
        return models

    def metric(self, name: str) -> float:
        """The value of a series of /metrics, named with its labels as the text has them:
        ``slm_engine_steps_total{model="smollm2"}``."""
        lines = httpx.get(f"{self.url}/metrics").text.splitlines()
        return float(next(line for line in lines if line.rpartition(" ")[0] == name).rpartition(" ")[2])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait for it to exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def assert_no_traceback(server: Server) -> None:
    assert "Traceback" not in server.log(), server.log()


def assert_same_up_to_near_ties(name: str, single: Any, batched: Any, noise: float = 1.0) -> None:
    """The same text, or texts that part at a near-tie (two OpenAI choices with ``top_logprobs``): llama.cpp's
    batched kernels sum in another order, which moves the logits a little (deep in a text, by up to about 1),
    so where two tokens are that close either may win. At the first token where they part, each answer's
    token is among the other's best few, and the two runs' logits moved apart by less than ``noise``."""
    if single.message.content == batched.message.content:
        return
    one, other = single.logprobs.content, batched.logprobs.content
    at = next((i for i, (a, b) in enumerate(zip(one, other, strict=False)) if a.bytes != b.bytes), None)
    assert at is not None, f"{name}: one answer ends where the other goes on"
    mine, theirs = one[at], other[at]
    in_one = {t.token: t.logprob for t in mine.top_logprobs}
    in_other = {t.token: t.logprob for t in theirs.top_logprobs}
    assert theirs.token in in_one and mine.token in in_other, f"{name}: token {at} is no near-tie"
    drift = (mine.logprob - in_one[theirs.token]) + (theirs.logprob - in_other[mine.token])
    assert drift < noise, f"{name}: token {at} parts by {drift:.2f}, more than kernel noise"


def module_server(factory: Any, label: str, *args: str) -> Iterator[Server]:
    """A module fixture's server (`slm serve smollm2 SERVE_ARGS ARGS`), checked for tracebacks at the end."""
    with Server(factory.mktemp(label), "smollm2", *SERVE_ARGS, *args) as s:
        yield s
        assert_no_traceback(s)


class InProcess:
    """An app of ``slm.server.create_app`` under uvicorn on a thread of this process (for the Python API
    and for settings the command line would take long to reach)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started and time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise AssertionError("the server thread ended before it started")
            time.sleep(0.02)

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not stop"
