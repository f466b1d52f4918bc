"""Embeddings: OpenAI's /v1/embeddings, Ollama's /api/embed and its older /api/embeddings.

Inputs are tokenized and checked here, on a worker thread, so a bad one is a 400 naming it before anything
is queued; the vectors come from the model's ``EmbedBatcher``, which runs the sequences of concurrent
requests in shared passes. OpenAI's API never truncates (an input past the model's limit is refused);
Ollama's truncates unless ``truncate`` is false, as Ollama does.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter
from starlette.requests import Request

from slm.errors import InvalidParameter
from slm.server.pool import pool_of
from slm.server.schemas import Strict, parse
from slm.units import parse_duration

router = APIRouter()


class OpenAIEmbeddingRequest(Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class OllamaEmbedRequest(Strict):
    model: str
    input: str | list[str]
    truncate: bool = True
    keep_alive: float | str | None = None
    """How long the model stays loaded after this request, as /api/chat's ``keep_alive``."""


class OllamaEmbeddingsRequest(Strict):
    model: str
    prompt: str
    keep_alive: float | str | None = None


async def _embed(request: Request, model: str, inputs: Any, truncate: bool,
                 keep_alive: float | str | None = None) -> tuple[np.ndarray, int, float]:
    """(vectors, prompt tokens, seconds spent loading the model)."""
    seconds = None if keep_alive is None else parse_duration(keep_alive, "keep_alive")
    batcher, load_seconds = await pool_of(request).embedder(model, request, seconds)
    batches = await asyncio.to_thread(batcher.model.token_batches, inputs, truncate)
    vectors = await asyncio.wrap_future(batcher.submit(batches))
    return vectors, sum(len(b) for b in batches), load_seconds


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> dict[str, Any]:
    body = parse(OpenAIEmbeddingRequest, await request.body())
    if body.dimensions is not None:
        raise InvalidParameter("dimensions", f"{body.model} makes vectors of a fixed size; leave dimensions out")
    vectors, tokens, _ = await _embed(request, body.model, body.input, truncate=False)
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI's SDKs decode it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


@router.post("/api/embed")
async def ollama_embed(request: Request) -> dict[str, Any]:
    start = time.perf_counter()
    body = parse(OllamaEmbedRequest, await request.body())
    vectors, tokens, load_seconds = await _embed(request, body.model, body.input, body.truncate, body.keep_alive)
    return {"model": body.model, "embeddings": [[float(x) for x in v] for v in vectors],
            "total_duration": int((time.perf_counter() - start) * 1e9), "load_duration": int(load_seconds * 1e9),
            "prompt_eval_count": tokens}


@router.post("/api/embeddings")
async def ollama_embeddings(request: Request) -> dict[str, Any]:
    body = parse(OllamaEmbeddingsRequest, await request.body())
    vectors, _, _ = await _embed(request, body.model, body.prompt, truncate=True, keep_alive=body.keep_alive)
    return {"embedding": [float(x) for x in vectors[0]]}
