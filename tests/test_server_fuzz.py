"""Fuzzing the server: Schemathesis against its OpenAPI document (every endpoint, bodies that fit their schema
and bodies that do not), then malformed bodies by hand. Never a 5xx, never a hang; an error is a 4xx in the
API's own shape (OpenAI's ``{"error": {"message": ...}}``, Ollama's ``{"error": "..."}``, Anthropic's
``{"type": "error", "error": {"type": ..., "message": ...}}``); the next valid request succeeds."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from serving import Server

TIMEOUT = 60
"""Seconds any one request may take: more is a hang."""
EXAMPLES = {"get": 8, "delete": 8, "post": 30}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A small context, so that whatever a generated request asks for stays short."""
    with Server(tmp_path_factory.mktemp("fuzz"), "smollm2", "--ctx-size", "256", "--threads", "1",
                "--parallel", "2") as s:
        yield s


def assert_api_error(path: str, response: httpx.Response | Any) -> None:
    """A 4xx whose body is the error shape of the API the path belongs to."""
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    error = response.json()["error"]
    if path.startswith("/api/"):  # Ollama's
        assert isinstance(error, str) and error, response.text[:300]
    else:  # OpenAI's, which llama.cpp's /tokenize and /detokenize use too
        assert isinstance(error, dict) and error["message"], response.text[:300]


def assert_anthropic_shape(path: str, response: httpx.Response | Any) -> None:
    """Under /v1/messages, an error is Anthropic's: ``{"type": "error", "error": {"type", "message"}}``."""
    if path.startswith("/v1/messages") and response.status_code >= 400:
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"], response.text[:300]


def assert_still_answers(server: Server) -> None:
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT,
                       json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None


def cheap(case: Any, path: str) -> None:
    """Keep a generated body's cost small (its shape is what is tested): the served model, at most two new
    tokens."""
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body:
        body["model"] = "smollm2"
    for key in ("max_tokens", "n"):
        if not isinstance(body.get(key), int) or not 1 <= body[key] <= 2:
            body[key] = 2 if path.startswith("/v1") else body.get(key)
    if path == "/v1/responses":  # one answer, of max_output_tokens
        body["max_output_tokens"] = 2
        body.pop("n", None)
    if path.startswith("/v1/messages"):  # one answer (and a token count takes no max_tokens)
        body.pop("n", None)
        if path.endswith("count_tokens"):
            body.pop("max_tokens", None)
    if path.startswith("/api"):
        body.pop("max_tokens", None)
        body.pop("n", None)
        options = body.get("options")
        if isinstance(options, dict):
            options["num_predict"] = 2
        else:
            body["options"] = {"num_predict": 2}


def test_schemathesis_finds_no_server_error_on_any_endpoint(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    statuses: Counter[tuple[str, str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        negative = [schemathesis.GenerationMode.NEGATIVE] if operation.method == "post" else []  # GETs take no body
        for mode in (schemathesis.GenerationMode.POSITIVE, *negative):
            fuzz(server, operation, mode, statuses)
    answered = {(path, mode) for path, mode, status in statuses if status == 200}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/chat", "/api/generate", "/api/show",
                 "/v1/messages", "/v1/messages/count_tokens"):
        assert (path, "positive") in answered, f"no valid request reached {path}: {statuses}"
    assert_still_answers(server)


def fuzz(server: Server, operation: Any, mode: Any, statuses: Counter[tuple[str, str, int]]) -> None:
    """Requests Schemathesis generates for one endpoint (fitting its schema or not, as ``mode`` says), each
    answered 200 or with a 4xx in the API's shape; derandomized, so a run is repeatable."""

    @settings(max_examples=EXAMPLES[operation.method], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        if mode is schemathesis.GenerationMode.POSITIVE:
            cheap(case, operation.path)
        response = case.call(base_url=server.url, timeout=TIMEOUT)
        statuses[(operation.path, mode.value, response.status_code)] += 1
        if response.status_code >= 400:
            assert_api_error(operation.path, response)
            assert_anthropic_shape(operation.path, response)
        else:
            assert response.status_code == 200, (response.status_code, response.text[:300])

    check()


HUGE = "x" * (10 << 20)
MALFORMED: list[tuple[str, str, bytes]] = [
    ("not JSON", "/v1/chat/completions", b'{"model": "smollm2", "messages": ['),
    ("empty", "/v1/completions", b""),
    ("an array", "/v1/completions", b"[1, 2, 3]"),
    ("null", "/api/chat", b"null"),
    ("invalid UTF-8", "/v1/chat/completions",
     b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'),
    ("invalid UTF-8 (Ollama)", "/api/generate", b'{"model": "smollm2", "prompt": "\xc3\x28"}'),
    ("a huge integer", "/v1/completions", b'{"model": "smollm2", "prompt": "Hi", "max_tokens": 1' + b"0" * 400 + b"}"),
    ("a huge float", "/v1/completions", b'{"model": "smollm2", "prompt": "Hi", "temperature": 1e400}'),
    ("a huge seed", "/api/generate", b'{"model": "smollm2", "prompt": "Hi", "options": {"seed": 1' + b"0" * 40 + b"}}"),
    ("NaN", "/v1/completions", b'{"model": "smollm2", "prompt": "Hi", "top_p": NaN}'),
    ("deep nesting", "/v1/chat/completions",
     b'{"model": "smollm2", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("deep nesting (Ollama)", "/api/chat",
     b'{"model": "smollm2", "format": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001),
    ("a 10 MB model name", "/v1/completions", json.dumps({"model": HUGE, "prompt": "Hi"}).encode()),
    ("a 10 MB prompt", "/v1/completions", json.dumps({"model": "smollm2", "prompt": HUGE, "max_tokens": 2}).encode()),
    ("not JSON (Anthropic)", "/v1/messages", b'{"model": "smollm2", "max_tokens": 2, "messages": ['),
    ("deep nesting (Anthropic)", "/v1/messages",
     b'{"model": "smollm2", "max_tokens": 2, "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("a 10 MB message", "/api/chat",
     json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": HUGE}], "stream": False}).encode()),
]


@pytest.mark.parametrize(("what", "path", "body"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_body_gets_a_4xx_in_the_apis_shape(server: Server, what: str, path: str, body: bytes) -> None:
    response = httpx.post(f"{server.url}{path}", content=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert_api_error(path, response)
    assert_anthropic_shape(path, response)
    assert len(response.content) < 4096, f"the error echoes too much: {len(response.content)} bytes"
    assert_still_answers(server)
