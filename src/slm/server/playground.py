"""The playground: a page at ``/`` of ``slm serve`` to chat with the served models and compare them.

The page is three static files shipped in the package (``static/``: HTML, CSS and JavaScript, no build
step, nothing fetched from elsewhere). It talks to the server through the same OpenAI API as any client
(``/v1/chat/completions``, streamed), with the API key the user types when the server has one: the files
themselves are open, every call they make is not. ``/ui/models`` tells the page what each served model is
and what its tokens cost (``[prices]`` of the configuration file), for the compare view's estimates.

``/`` answers a browser (``Accept: text/html``) with the page and anyone else with ``slm is running``, what
Ollama's clients probe for; with ``--no-ui`` always with the latter, and ``/ui/`` is not served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles

from slm.remote import load_config
from slm.server.pool import ModelPool

STATIC = Path(__file__).parent / "static"
STATIC_PATH = "/ui/static/"
"""Where the page's files are served: open without the API key (they hold nothing secret)."""
PROBE_ANSWER = "slm is running"

router = APIRouter()


def install(app: FastAPI, ui: bool) -> None:
    """``/`` (the page, or the probe answer) and, with ``ui``, the page's files and ``/ui/models``."""

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> Response:
        if ui and "text/html" in request.headers.get("accept", ""):
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
        return PlainTextResponse(PROBE_ANSWER)

    if ui:
        app.include_router(router)
        app.mount(STATIC_PATH.rstrip("/"), StaticFiles(directory=STATIC), name="playground")


@router.get("/ui/models", include_in_schema=False)
async def models(request: Request) -> dict[str, Any]:
    """The served models the page may pick, each with its kind and its price (US dollars per million
    tokens; 0 unless the configuration file gives one)."""
    pool: ModelPool = request.app.state.pool
    config = load_config()
    listed = []
    for name in pool.names:
        price = config.price(name)
        listed.append({"id": name, "kind": _kind(pool, name, config.routes),
                       "price": {"input": price.input, "output": price.output}})
    return {"models": listed}


def _kind(pool: ModelPool, name: str, routes: Any) -> str:
    if pool.is_remote_name(name):
        return "route" if name in routes else "remote"
    if pool.adapter_of(name):
        return "adapter"
    return "embedding" if pool.is_embedding(name) else "local"
