"""A small OpenAI-compatible server of the suite's own that misbehaves on purpose, for the remote tests.

The model name asks for the behaviour: ``ok`` answers "Hello from the cloud" as a stream; ``500``,
``429``, ``401`` and ``context`` fail with that status (``context``: a 400 about the context length);
``stall`` waits 30 s before answering; ``cut`` streams some text and closes the connection; ``badjson``
streams something that is not JSON, ``weird`` JSON of another shape, ``markup`` text with brackets;
``slow`` streams 40 pieces over 4 s; ``flakyN`` fails with 503 N times, then answers. It counts the
requests per model (and the slow answers it finished), and keeps the Authorization headers and the last
body per model it saw. ``GET /v1/models`` (a route's health probe) answers 200, or 503 while ``sick`` is
set; ``probes`` counts them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = ["Hello", " from", " the", " cloud"]
MARKUP = ["Use a[i] ", "or [/usr/bin]", " then b[/i]"]
"""What ``markup`` answers: text that a terminal library could take for its own markup."""


class FaultServer:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.authorization: list[str] = []
        self.bodies: dict[str, dict[str, Any]] = {}
        self.finished: Counter[str] = Counter()
        self.probes = 0
        self.sick = False
        self.stop_event = threading.Event()
        handler = type("Handler", (_Handler,), {"owner": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.owner.probes += 1
        if self.path != "/v1/models":
            return self._error(404, f"no {self.path} here")
        if self.owner.sick:
            return self._error(503, "sick")
        self._json(200, {"object": "list", "data": [{"id": "ok", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        model = str(body.get("model", ""))
        owner = self.owner
        owner.hits[model] += 1
        owner.bodies[model] = body
        owner.authorization.append(self.headers.get("Authorization", ""))
        if model.startswith("flaky") and owner.hits[model] <= int(model[5:] or 1):
            return self._error(503, "warming up")
        if model in ("500", "429", "401"):
            return self._error(int(model), f"the server says {model}")
        if model == "context":
            return self._error(400, "This model's maximum context length is 4096 tokens; your prompt exceeds it")
        if model == "stall":
            owner.stop_event.wait(30)
            return self._error(500, "too late")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        if model == "badjson":
            self._write("data: {this is not json\n\n")
            return
        if model == "weird":  # JSON, but not the shape of a chunk
            self._event({"choices": {"index": 0}, "usage": "none"})
            return
        if model == "slow":  # many pieces, slowly: a client may leave in the middle
            try:
                for _ in range(40):
                    self._event({"choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": None}]})
                    time.sleep(0.1)
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                self._write("data: [DONE]\n\n")
                owner.finished[model] += 1
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        try:
            for i, piece in enumerate(MARKUP if model == "markup" else ANSWER):
                self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                if model == "cut" and i == 1:
                    self.wfile.flush()
                    self.connection.shutdown(2)  # mid-answer: the connection just ends
                    return
                time.sleep(0.01)
            self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            self._event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(ANSWER)}})
            self._write("data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading and left
            pass

    def _event(self, payload: dict[str, Any]) -> None:
        self._write(f"data: {json.dumps(payload)}\n\n")

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode())
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "test"}})

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
