"""llama.cpp's tokenizer endpoints: ``POST /tokenize`` and ``POST /detokenize``, in its request and response
shapes, for any served local model.

llama.cpp's server has one model; here ``model`` may name one (default: the first local model served).

    POST /tokenize    {"content": "Hello", "add_special": false, "parse_special": true, "with_pieces": false}
                   -> {"tokens": [19556]}   or, with pieces, {"tokens": [{"id": 19556, "piece": "Hello"}]}
    POST /detokenize  {"tokens": [19556]} -> {"content": "Hello"}

A piece is text when its bytes are whole UTF-8, else the list of its bytes (a token may hold part of a
character), as llama.cpp answers. Special tokens are read from the text (``parse_special``) and written back
as their text by /detokenize, so the two round-trip a chat-formatted prompt.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request

from slm.errors import InvalidParameter
from slm.model import Model
from slm.server.pool import pool_of
from slm.server.schemas import Strict, parse

router = APIRouter()


class TokenizeRequest(Strict):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False
    model: str | None = Field(default=None, min_length=1)


class DetokenizeRequest(Strict):
    tokens: list[int]
    model: str | None = Field(default=None, min_length=1)


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    body = parse(TokenizeRequest, await request.body())
    model = await _model(request, body.model)
    ids = await asyncio.to_thread(model.tokenize, body.content, body.add_special, body.parse_special)
    if not body.with_pieces:
        return {"tokens": ids}
    pieces = await asyncio.to_thread(lambda: [_piece(model, token) for token in ids])
    return {"tokens": [{"id": token, "piece": piece} for token, piece in zip(ids, pieces, strict=True)]}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    body = parse(DetokenizeRequest, await request.body())
    model = await _model(request, body.model)
    vocab = model.info.vocab_size
    for i, token in enumerate(body.tokens):
        if not 0 <= token < vocab:
            raise InvalidParameter(f"tokens[{i}]", f"{token} is not a token of {model.name} (0 to {vocab - 1})")
    return {"content": await asyncio.to_thread(model.detokenize, body.tokens, True)}


async def _model(request: Request, name: str | None) -> Model:
    """The served local model ``name`` (default: the first), leased for the call."""
    pool = pool_of(request)
    if name is None:
        local = [n for n in pool.names if not pool.is_remote_name(n) and not pool.is_embedding(n)]
        if not local:
            raise InvalidParameter("model", "this server has no local model to tokenize with")
        name = local[0]
    elif pool.is_remote_name(name):
        raise InvalidParameter("model", f"{name} is remote: its tokenizer is not here")
    served, _ = await pool.get(name, request)
    return served.model


def _piece(model: Model, token: int) -> str | list[int]:
    data = model.engine.token_bytes(token) or model.detokenize([token], special=True).encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)
