"""The HTTP server: one FastAPI app serving the OpenAI, Anthropic and Ollama APIs over a pool of models.

    app = create_app(["smollm2"], parallel=4, api_key="secret")
    uvicorn.run(app, port=8080)

Handlers only parse, build scheduler requests and format what comes back; each model's engine runs
on its scheduler's thread. Every error leaves as JSON with a status, in the shape of the API it was
asked through, never as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slm import __version__
from slm.errors import BodyTooLarge, ClientGone, RequestError, SlmError, Unauthorized
from slm.server import (
    anthropic_api,
    embeddings_api,
    metrics,
    ollama_api,
    openai_api,
    playground,
    responses_api,
    tokenizer_api,
)
from slm.server.backends import WRITE_TIMEOUT
from slm.server.errors import error_response
from slm.server.openapi import document_bodies
from slm.server.pool import KEEP_ALIVE, ModelPool
from slm.server.response_store import ResponseStore
from slm.serving.prefix_cache import MAX_BYTES as PREFIX_CACHE_BYTES

MAX_BODY_BYTES = 32 << 20
"""The largest request body: room for an image of ``media.MAX_BYTES`` in base64, and the text around it."""
UNVERSIONED = ("/chat/completions", "/completions", "/models", "/embeddings", "/responses")
"""OpenAI paths also served without ``/v1`` (a client whose base URL lacks it), as llama.cpp's server does."""
OPEN_PATHS = frozenset({"/health", "/"})
"""Paths served without the API key (also the playground's files, under ``playground.STATIC_PATH``)."""
KNOWN_ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/api/chat", "/api/generate",
    "/api/tags", "/api/show", "/api/ps", "/api/version", "/health", "/metrics", "/", "/ui/models",
    "/v1/embeddings", "/api/embed", "/api/embeddings", "/tokenize", "/detokenize", "/v1/messages",
    "/v1/messages/count_tokens",
})


def create_app(
    model_names: Sequence[str] = (),
    *,
    parallel: int = 4,
    max_queue: int = 64,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    preload: bool = True,
    keep_alive: float = KEEP_ALIVE,
    memory_budget: int | None = None,
    timeout: float | None = None,
    cors_origins: Sequence[str] = (),
    cors_credentials: bool = False,
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
    allow_image_urls: bool = False,
    clock: Callable[[], float] = time.time,
    lookup: int = 0,
    write_timeout: float | None = None,
    ui: bool = True,
    any_model_name: bool = False,
    **load_options: Any,
) -> FastAPI:
    """An app serving ``model_names`` (default: the embedded SmolLM2), ``parallel`` sequences at a
    time per model. With ``preload`` the models are loaded now (errors raise here); otherwise each
    on its first request. An idle model is unloaded after ``keep_alive`` seconds (inf: never); loads
    beyond ``memory_budget`` bytes are refused; a request may take ``timeout`` seconds; each model keeps
    up to ``prefix_cache_bytes`` of finished requests' KV caches for prefix reuse. Browsers on
    ``cors_origins`` ("*": any) may call the API, sending credentials (cookies, an Authorization header)
    with ``cors_credentials``. ``allow_image_urls``: fetch the http(s) images a request names (off: only
    data: URIs are taken). ``load_options`` go to ``slm.load`` (``n_ctx``,
    ``threads``, ``kv_cells``, ``flash_attention``, ``draft``: a draft model for speculative decoding). ``clock``
    (wall-clock seconds) times keep-alives. ``lookup``: prompt-lookup draft length for every request that does
    not set one (0: none). ``write_timeout``: seconds a stream waits for a client that does not read before it
    is dropped (None: ``WRITE_TIMEOUT``). ``ui``: the playground page at ``/`` (see ``playground``).
    ``any_model_name``: a server of one model answers whatever model a request names with it."""
    pool = ModelPool(model_names, parallel=parallel, max_queue=max_queue, keep_alive=keep_alive,
                     memory_budget=memory_budget, timeout=timeout, prefix_cache_bytes=prefix_cache_bytes,
                     load_options=load_options, clock=clock, lookup=lookup, any_name=any_model_name)
    if preload:
        pool.load_all()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(pool.run_reaper())
        yield
        reaper.cancel()
        # In-flight requests finish first (uvicorn waits for open responses before this).
        await asyncio.to_thread(pool.close)

    app = FastAPI(title="slm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool = pool
    app.state.allow_image_urls = allow_image_urls
    app.state.write_timeout = WRITE_TIMEOUT if write_timeout is None else write_timeout
    app.state.dropped = dropped = Counter[str]()
    app.state.responses = ResponseStore()
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(responses_api.router)
    app.include_router(embeddings_api.router)
    app.include_router(tokenizer_api.router)
    app.include_router(anthropic_api.router)
    document_bodies(app)
    app.add_exception_handler(SlmError, _on_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.add_exception_handler(Exception, _on_bug)
    responses: Counter[tuple[str, int]] = Counter()
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes, responses=responses, pool=pool)
    if cors_origins:  # added last, so it runs first: a browser's preflight needs no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=cors_credentials,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["*"])  # the SDKs send headers of their own (x-stainless-*)

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        """Prometheus text format (behind the API key when there is one)."""
        return PlainTextResponse(metrics.render(pool, responses, dropped), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Open without an API key: for load balancers and start-up scripts."""
        return {"status": "ok", "models": {**{s.name: s.scheduler.stats() for s in pool.loaded()},
                                           **pool.embedding_stats()}}

    playground.install(app, ui)
    return app


def _versioned(path: str) -> str:
    """``/chat/completions`` -> ``/v1/chat/completions`` (and the other ``UNVERSIONED`` paths, with what follows
    them: ``/models/smollm2``, ``/responses/ID``); any other path as it is."""
    for alias in UNVERSIONED:
        if path == alias or path.startswith(alias + "/"):
            return "/v1" + path
    return path


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(playground.STATIC_PATH)


async def _on_error(request: Request, error: Exception) -> Response:
    return error_response(error, request.url.path)


async def _on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return error_response(RequestError(message, error.status_code), request.url.path)


async def _on_client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"


async def _on_bug(request: Request, error: Exception) -> Response:
    # A bug: the client gets a one-line 500; uvicorn logs the traceback once this returns.
    return error_response(error, request.url.path)


class Gate:
    """Checks the API key (except on /health) and caps the request body, before any route runs; returns
    the call's leases on models once its response has ended."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 responses: Counter[tuple[str, int]], pool: ModelPool) -> None:
        self.app = app
        self.pool = pool
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.responses = responses  # (route, status) -> count, for /metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] = _versioned(scope["path"])
        send = self._counted(path, send)
        headers = dict(scope["headers"])
        if self.api_key and not _open(path) and not self._authorized(headers):
            await error_response(Unauthorized(), path)(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await error_response(BodyTooLarge(self.max_body_bytes), path)(scope, receive, send)
            return
        try:
            await self.app(scope, self._capped(receive), send)
        finally:  # the response has ended, however: the models it used may go idle
            await self.pool.release(scope)

    def _counted(self, path: str, send: Send) -> Send:
        route = path if path in KNOWN_ROUTES else "other"  # unknown paths must not grow the label set

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.responses[(route, message["status"])] += 1
            await send(message)

        return counted

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        """The key as ``Authorization: Bearer <key>`` (OpenAI's clients) or ``x-api-key: <key>`` (Anthropic's)."""
        assert self.api_key is not None
        expected = self.api_key.encode()
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode("latin-1"), expected):
            return True
        return hmac.compare_digest(headers.get(b"x-api-key", b"").strip(), expected)

    def _capped(self, receive: Receive) -> Receive:
        """A body sent without a length (chunked) is counted as it arrives."""
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return capped
