"""Models come and go: keep-alive, unload when idle, the memory budget, a request's deadline, CORS."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

import slm
from serving import InProcess
from slm.server import create_app
from slm.serving.prefix_cache import MAX_BYTES as PREFIX_CACHE_BYTES

MODEL = "smollm2"
SMALL = {"parallel": 1, "n_ctx": 512, "threads": 1}
ASK = [{"role": "user", "content": "What is 2 + 2?"}]


def loaded(url: str) -> list[str]:
    return [m["name"].removesuffix(":latest") for m in httpx.get(f"{url}/api/ps").json()["models"]]


def eventually(condition: Callable[[], bool], within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class FakeClock:
    """The pool's clock, moved by the test: keep-alives pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def reaped_twice_more(app: Any) -> Callable[[], bool]:
    """True once the reaper has run twice after now: so a full reap saw whatever the test did before."""
    pool = app.state.pool
    start = pool.reaps
    return lambda: pool.reaps >= start + 2


def released(app: Any) -> Callable[[], bool]:
    """True once no response holds a lease on any model (a response ends after its last byte is read)."""
    return lambda: all(s.leases == 0 for s in app.state.pool.loaded())


def chat(url: str, model: str = MODEL, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": ASK, "stream": False, "options": {"num_predict": 4}, **extra}
    return httpx.post(f"{url}/api/chat", json=body, timeout=60)


def test_keep_alive_zero_unloads_after_the_request_and_the_next_one_loads_again() -> None:
    with InProcess(create_app([MODEL], **SMALL)) as server:
        assert loaded(server.url) == [MODEL]
        client = ollama.Client(host=server.url)
        reply = client.chat(model=MODEL, messages=ASK, options={"num_predict": 4}, keep_alive=0)
        assert reply.message.content
        assert eventually(lambda: loaded(server.url) == [])  # unloaded as the response ended
        again = chat(server.url)
        assert again.status_code == 200 and again.json()["load_duration"] > 0
        assert loaded(server.url) == [MODEL]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "slm_model_unloads_total 1" in metrics


def test_an_empty_request_with_keep_alive_zero_unloads_as_ollama_does() -> None:
    with InProcess(create_app([MODEL], **SMALL)) as server:
        reply = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=60)
        assert reply.status_code == 200 and reply.json()["done_reason"] == "unload"
        assert eventually(lambda: loaded(server.url) == [])


def test_an_idle_model_is_unloaded_when_its_keep_alive_has_passed() -> None:
    clock = FakeClock()
    app = create_app([MODEL], keep_alive=3600, clock=clock, **SMALL)
    with InProcess(app) as server:
        assert chat(server.url, keep_alive="10m").status_code == 200
        [shown] = httpx.get(f"{server.url}/api/ps").json()["models"]
        assert shown["expires_at"] != "9999-12-31T23:59:59Z"
        assert eventually(released(app))  # its keep-alive counts from here
        clock.advance(599)
        assert eventually(reaped_twice_more(app))
        assert loaded(server.url) == [MODEL]  # not yet
        clock.advance(2)
        assert eventually(lambda: loaded(server.url) == [])  # the reaper's next round
        assert chat(server.url, keep_alive=-1).status_code == 200
        [shown] = httpx.get(f"{server.url}/api/ps").json()["models"]
        assert shown["expires_at"] == "9999-12-31T23:59:59Z"  # kept forever


def test_a_model_in_use_is_not_unloaded() -> None:
    clock = FakeClock()
    app = create_app([MODEL], keep_alive=0.2, clock=clock, **SMALL)
    with InProcess(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, stream=True,
                                                temperature=0, logit_bias={"2": -100})
        parts = []
        for chunk in stream:
            parts += [c.delta.content or "" for c in chunk.choices]
            if len(parts) == 5:
                clock.advance(3600)  # well past the keep-alive, mid-stream
                assert eventually(reaped_twice_more(app))
                assert loaded(server.url) == [MODEL]
        assert len(parts) > 5
        assert eventually(released(app))  # the response ended
        clock.advance(1)  # and the keep-alive has passed since
        assert eventually(lambda: loaded(server.url) == [])  # and gone once idle


def test_a_bad_keep_alive_names_the_field() -> None:
    with InProcess(create_app([MODEL], **SMALL)) as server:
        reply = chat(server.url, keep_alive="soon")
        assert reply.status_code == 400 and "keep_alive" in reply.json()["error"]
        assert chat(server.url).status_code == 200


def test_the_memory_budget_unloads_an_idle_model_to_make_room(smollm2_path: Path) -> None:
    need = slm.estimate_memory(MODEL, n_ctx=512, max_sequences=1) + PREFIX_CACHE_BYTES
    # The same file under two names: two models of the same size, room for one of them.
    app = create_app([MODEL, str(smollm2_path)], memory_budget=int(need * 1.5), **SMALL)
    other = app.state.pool.names[1]
    with InProcess(app) as server:
        assert loaded(server.url) == [MODEL]  # the second did not fit at start
        assert chat(server.url, model=other).status_code == 200
        assert loaded(server.url) == [other]  # the idle first one made room
        assert chat(server.url).status_code == 200
        assert loaded(server.url) == [MODEL]


def test_a_model_beyond_the_memory_budget_is_refused_with_a_clear_error(smollm2_path: Path) -> None:
    with InProcess(create_app([MODEL], memory_budget=50 << 20, preload=False, **SMALL)) as server:
        reply = chat(server.url)
        assert reply.status_code == 503
        message = reply.json()["error"]
        assert "memory budget" in message and "--memory-budget" in message
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "insufficient_memory"  # type: ignore[index]


def test_a_request_past_its_deadline_gets_504_and_the_next_one_works() -> None:
    # 2 s: a 2-token answer fits it many times over even on a loaded machine; 460 tokens do not (~70/s).
    with InProcess(create_app([MODEL], timeout=2.0, **SMALL)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        endless = {"2": -100}  # SmolLM2's end of turn banned: it would write all 460 tokens
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=460, logit_bias=endless)
        assert caught.value.status_code == 504 and "--timeout" in caught.value.message
        stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=460, logit_bias=endless,
                                                stream=True)
        with pytest.raises(openai.APIError, match="did not finish within"):
            for _ in stream:
                pass
        stats = httpx.get(f"{server.url}/health").json()["models"][MODEL]
        assert eventually(lambda: httpx.get(f"{server.url}/health").json()["models"][MODEL]["running"] == 0)
        assert stats["failed"] == 0
        quick = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
        assert quick.choices[0].finish_reason == "length"


@pytest.mark.parametrize("origins", [(), ("http://localhost:3000",)])
def test_cors_is_off_unless_origins_are_given(origins: tuple[str, ...]) -> None:
    with InProcess(create_app([MODEL], cors_origins=origins, api_key="secret", **SMALL)) as server:
        preflight = httpx.options(f"{server.url}/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        })
        allowed = preflight.headers.get("access-control-allow-origin")
        if origins:
            assert preflight.status_code == 200 and allowed == "http://localhost:3000"
            other = httpx.options(f"{server.url}/v1/models", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
            assert other.headers.get("access-control-allow-origin") is None
        else:
            assert allowed is None
        # CORS or not, the API key is still required for the real call.
        assert httpx.get(f"{server.url}/v1/models", headers={"Origin": "http://localhost:3000"}).status_code == 401


# --- embedding models come and go the same way ----------------------------------------------------------


def embed(url: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/api/embed", json={"model": model, "input": ["a cat", "a dog"], **extra}, timeout=60)


def test_an_embedding_model_is_leased_kept_alive_and_unloaded_like_the_others(minilm_path: Path) -> None:
    clock = FakeClock()
    app = create_app([str(minilm_path)], keep_alive=3600, clock=clock, **SMALL)
    name = app.state.pool.names[0]
    with InProcess(app) as server:
        assert loaded(server.url) == [name]  # preloaded, listed by /api/ps as Ollama lists embedding models
        reply = embed(server.url, name, keep_alive=0)
        assert reply.status_code == 200 and len(reply.json()["embeddings"]) == 2
        assert eventually(lambda: loaded(server.url) == [])  # keep_alive 0: unloaded as the response ended
        again = embed(server.url, name, keep_alive="10m")
        assert again.status_code == 200 and again.json()["load_duration"] > 0
        assert again.json()["embeddings"] == reply.json()["embeddings"]
        [shown] = httpx.get(f"{server.url}/api/ps").json()["models"]
        assert shown["expires_at"] != "9999-12-31T23:59:59Z" and shown["context_length"] == 256
        assert eventually(lambda: all(e.leases == 0 for e in app.state.pool.loaded_embedders()))
        clock.advance(599)
        assert eventually(reaped_twice_more(app))
        assert loaded(server.url) == [name]  # not yet
        clock.advance(2)
        assert eventually(lambda: loaded(server.url) == [])  # the reaper's next round
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "slm_model_unloads_total 2" in metrics
        assert embed(server.url, name, keep_alive="soon").status_code == 400


def test_the_memory_budget_counts_embedding_models(minilm_path: Path) -> None:
    need = slm.estimate_memory(MODEL, n_ctx=512, max_sequences=1) + PREFIX_CACHE_BYTES
    app = create_app([MODEL, str(minilm_path)], memory_budget=need + (10 << 20), **SMALL)
    minilm = app.state.pool.names[1]
    with InProcess(app) as server:
        assert loaded(server.url) == [MODEL]  # the embedding model did not fit beside it at start
        assert embed(server.url, minilm).status_code == 200
        assert loaded(server.url) == [minilm]  # the idle chat model made room
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'slm_embedding_requests_total{{model="{minilm}"}} 1' in metrics
        assert f'slm_model_memory_bytes{{model="{minilm}"}}' in metrics
        assert chat(server.url).status_code == 200
        assert loaded(server.url) == [MODEL]
