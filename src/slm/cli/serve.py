"""``slm serve``: the HTTP server (OpenAI and Ollama APIs) under uvicorn."""

from __future__ import annotations

import math
import os
import signal
import sys
from types import FrameType
from typing import Any

import click

from slm.cli.options import ENGINE_OPTIONS, as_flag, engine_options, with_options
from slm.cli.output import stderr
from slm.cli.run import ENGINE_FLAGS
from slm.errors import InvalidParameter
from slm.units import format_size, parse_duration, parse_size

DRAIN_SECONDS = 30
"""How long a stopping server lets open responses finish before it cuts them."""

BUDGET_SHARE = 0.9
"""Of the memory available at start-up, what the models may take by default."""


@click.command()
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests generated at once per model (more wait in a queue).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait per model; beyond, the server answers 503.")
@click.option("--api-key", envvar="SLM_API_KEY", help="Require 'Authorization: Bearer KEY' (also $SLM_API_KEY).")
@click.option("--ctx-size", "n_ctx", type=int, default=None,
              help="Context of one request. [default: the model's, at most 8192]")
@click.option("--kv-size", "kv_cells", type=int, default=None,
              help="KV cache positions per model, shared by its requests. [default: --ctx-size]")
@with_options(ENGINE_OPTIONS)
@click.option("--keep-alive", default="5m", show_default=True,
              help="How long an idle model stays loaded (e.g. 30s, 1h; 0: unload at once; -1: forever).")
@click.option("--memory-budget", default=None,
              help="Memory the loaded models may take together (e.g. 4GiB). [default: 90% of what is free at start]")
@click.option("--prefix-cache", default="256MiB", show_default=True,
              help="Host memory per model for finished requests' KV caches, reused by prompts that start "
                   "the same way (0: off).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=1e9), default=600, show_default=True,
              help="Seconds a request may take, queueing included.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let browser pages from ORIGIN call the API (repeatable; '*': any). [default: none]")
@click.option("--cors-credentials", is_flag=True,
              help="Let those pages send credentials (cookies, an Authorization header): answers carry "
                   "Access-Control-Allow-Credentials.")
@click.option("--lookup", type=click.IntRange(0, 32), default=0, show_default=True, metavar="N",
              help="Speculative decoding by prompt lookup for every request: up to N drafted tokens a step (0: off).")
@click.option("--write-timeout", type=click.FloatRange(min=0, min_open=True, max=1e9), default=None,
              help="Seconds a stream waits for a client that reads nothing before dropping it. [default: 30]")
@click.option("--allow-image-urls", is_flag=True,
              help="Fetch images that requests name by http(s) URL (capped, 10 s, no redirects to other hosts). "
                   "[default: data: URIs only]")
@click.option("--no-ui", is_flag=True, help="Serve no playground page at / (the APIs only).")
@click.option("--any-model-name", is_flag=True,
              help="With one model served: answer requests naming any model with it (clients with a model name "
                   "written in, such as gpt-4o-mini).")
def serve(models: tuple[str, ...], host: str, port: int, parallel: int, max_queue: int, api_key: str | None,
          keep_alive: str, memory_budget: str | None, prefix_cache: str, timeout: float,
          cors_origins: tuple[str, ...], cors_credentials: bool, allow_image_urls: bool, lookup: int,
          write_timeout: float | None,
          no_ui: bool, any_model_name: bool, **options: Any) -> None:
    """Serve MODELs (default: the embedded smollm2) over HTTP.

    \b
    OpenAI API  /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/models
    Ollama API  /api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps
    Operations  /health (open even with an API key), /metrics (Prometheus)
    Playground  / in a browser: chat with the models, compare them side by side

    Every model is loaded at start, unloaded after --keep-alive without requests, and loaded again
    by the next request that names it. Ctrl-C or SIGTERM stops taking requests, lets the open ones
    finish, and exits.
    """
    import uvicorn  # only this command needs the server stack

    from slm.server import create_app

    if math.isnan(timeout):
        raise click.BadParameter("is not a number", param_hint="--timeout")
    try:
        idle = parse_duration(keep_alive, "--keep-alive")
        budget = parse_size(memory_budget, "--memory-budget") if memory_budget else _default_budget()
        cache_bytes = parse_size(prefix_cache, "--prefix-cache")
    except InvalidParameter as e:
        raise click.BadParameter(e.reason, param_hint=e.field) from None
    load_options = engine_options(options)
    stderr.print(f"[dim]loading {', '.join(models) or 'smollm2'}...[/]")
    try:
        app = create_app(models, parallel=parallel, max_queue=max_queue, api_key=api_key, keep_alive=idle,
                         memory_budget=budget, timeout=timeout, cors_origins=cors_origins,
                         cors_credentials=cors_credentials,
                         prefix_cache_bytes=cache_bytes, allow_image_urls=allow_image_urls, lookup=lookup,
                         write_timeout=write_timeout, ui=not no_ui, any_model_name=any_model_name, **load_options)
    except InvalidParameter as e:
        if e.field == "any_model_name":
            raise click.BadParameter(e.reason, param_hint="--any-model-name") from None
        if e.field not in ENGINE_FLAGS:
            raise
        raise as_flag(e, ENGINE_FLAGS[e.field]) from None

    pool = app.state.pool
    base = f"http://{host}:{port}"
    stderr.print(f"serving {', '.join(pool.names)} at {base}/v1 (OpenAI) and {base}/api (Ollama)"
                 + (" with an API key" if api_key else ""))
    if not no_ui:
        stderr.print(f"playground: {base}/")
    kept = "forever" if math.isinf(idle) else f"{idle:g} s idle"
    stderr.print(f"[dim]models stay loaded {kept}; memory budget {format_size(budget)}, "
                 f"{format_size(pool.memory_in_use())} in use[/]")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=DRAIN_SECONDS))
    # uvicorn drains on SIGTERM, then raises the signal again: by then there is nothing left to do.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()


def _default_budget() -> int:
    """A share of the memory free now (MemAvailable), or of all memory where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(available * BUDGET_SHARE)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)
