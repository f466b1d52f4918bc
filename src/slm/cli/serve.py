"""``slm serve``: the HTTP server (OpenAI and Ollama APIs) under uvicorn."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

import click

from slm.cli.options import as_flag
from slm.cli.output import stderr
from slm.cli.run import ENGINE_FLAGS
from slm.errors import InvalidParameter

DRAIN_SECONDS = 30
"""How long a stopping server lets open responses finish before it cuts them."""


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
              help="Context to allocate per model, shared by its requests. [default: the model's, at most 8192]")
@click.option("--threads", type=int, default=None, help="CPU threads. [default: all cores]")
def serve(models: tuple[str, ...], host: str, port: int, parallel: int, max_queue: int, api_key: str | None,
          n_ctx: int | None, threads: int | None) -> None:
    """Serve MODELs (default: the embedded smollm2) over HTTP.

    \b
    OpenAI API  /v1/chat/completions, /v1/completions, /v1/models
    Ollama API  /api/chat, /api/generate, /api/tags, /api/show, /api/ps
    Health      /health (open even with an API key)

    Ctrl-C or SIGTERM stops taking requests, lets the open ones finish, and exits.
    """
    import uvicorn  # only this command needs the server stack

    from slm.server import create_app

    load_options: dict[str, Any] = {k: v for k, v in (("n_ctx", n_ctx), ("threads", threads)) if v is not None}
    stderr.print(f"[dim]loading {', '.join(models) or 'smollm2'}...[/]")
    try:
        app = create_app(models, parallel=parallel, max_queue=max_queue, api_key=api_key, **load_options)
    except InvalidParameter as e:
        if e.field not in ENGINE_FLAGS:
            raise
        raise as_flag(e, ENGINE_FLAGS[e.field]) from None
    names = ", ".join(app.state.pool.names)
    base = f"http://{host}:{port}"
    stderr.print(f"serving {names} at {base}/v1 (OpenAI) and {base}/api (Ollama)"
                 + (" with an API key" if api_key else ""))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=DRAIN_SECONDS))
    # uvicorn drains on SIGTERM, then raises the signal again: by then there is nothing left to do.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)
