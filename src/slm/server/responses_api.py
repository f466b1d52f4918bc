"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A request is parsed into ``ResponsesRequest``, its input (after the stored conversation it continues, and
its ``instructions`` as a system message) becomes a chat prompt, and the answer comes back through the same
backends as /v1/chat/completions: one ``message`` item with ``output_text``. Streamed, it is OpenAI's typed
events (``event:`` and ``data:`` lines, each with a ``sequence_number``); there is no ``[DONE]``. Responses
with ``store`` (the default) are kept in memory (``response_store``) for ``previous_response_id``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from slm.errors import SlmError
from slm.generation.stream import Chunk, Usage
from slm.model import Prompt
from slm.server.backends import Answers, respond
from slm.server.errors import openai_body
from slm.server.pool import pool_of
from slm.server.response_store import ResponseStore
from slm.server.responses_schema import ResponsesRequest
from slm.server.schemas import parse

log = logging.getLogger("slm.server")

router = APIRouter(prefix="/v1")


def store_of(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


@router.post("/responses")
async def create_response(request: Request) -> Response:
    body = parse(ResponsesRequest, await request.body())
    store = store_of(request)
    earlier = store.previous(body.previous_response_id).conversation if body.previous_response_id else []
    conversation = [*earlier, *body.messages()]
    params = body.params()
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    backend = await pool_of(request).backend(body.model, request)
    answers = await backend.answer([Prompt.chat([*system, *conversation])], params)
    turn = Turn(backend.name, body.echoed(params), conversation, store if body.store else None)
    return await respond(request, answers, body.stream, lambda first, rest: _events(turn, first, rest),
                         lambda finished: turn.finish(finished[0].text, finished[0].finish_reason, finished[0].usage),
                         "text/event-stream")


@router.get("/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> dict[str, Any]:
    return store_of(request).get(response_id).response


@router.delete("/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    store_of(request).delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


class Turn:
    """One response object: its identity, the request's settings it repeats, and (once answered) its output;
    stored when it ends if the request asked for that."""

    def __init__(self, model: str, echoed: dict[str, Any], conversation: list[dict[str, str]],
                 store: ResponseStore | None) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.echoed = echoed
        self.conversation = conversation
        self.store = store

    def object(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
               incomplete: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None, "incomplete_details": incomplete, "model": self.model, "output": output,
            "usage": usage, **self.echoed,
        }

    def item(self, text: str | None, status: str) -> dict[str, Any]:
        """The message item: no content while in progress (``text`` None), else its one ``output_text``."""
        content = [] if text is None else [_part(text)]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def finish(self, text: str, finish_reason: str | None, usage: Usage | None) -> dict[str, Any]:
        """The finished response (stored, if asked): ``incomplete`` when it ran out of ``max_output_tokens``."""
        done = finish_reason != "length"
        response = self.object(
            "completed" if done else "incomplete", [self.item(text, "completed" if done else "incomplete")],
            _usage(usage), None if done else {"reason": "max_output_tokens"})
        if self.store is not None:
            self.store.put(response, [*self.conversation, {"role": "assistant", "content": text}])
        return response


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


class _Events:
    """Server-sent events as OpenAI sends them: the type as ``event:`` and in the data, numbered in order."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def __call__(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **data}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(turn: Turn, first: tuple[int, Chunk], answers: Answers) -> AsyncIterator[str]:
    event = _Events()
    where = {"item_id": turn.item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=turn.object("in_progress", []))
    yield event("response.in_progress", response=turn.object("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=turn.item(None, "in_progress"))
    yield event("response.content_part.added", **where, part=_part(""))
    pieces: list[str] = []
    finish_reason: str | None = None
    usage: Usage | None = None
    item: tuple[int, Chunk] | None = first
    try:
        while item is not None:
            _, chunk = item
            if chunk.text:
                pieces.append(chunk.text)
                yield event("response.output_text.delta", **where, delta=chunk.text, logprobs=[])
            if chunk.finish_reason is not None:
                finish_reason, usage = chunk.finish_reason, chunk.usage
            item = None if answers.done else await answers.next()
    except Exception as e:  # the status line is sent: the error goes in the stream, as OpenAI's does
        if not isinstance(e, SlmError):
            log.exception("generation failed mid-stream")
        error = openai_body(e)["error"]
        assert isinstance(error, dict)
        yield event("error", code=error["code"], message=error["message"], param=error["param"])
        return
    text = "".join(pieces)
    response = turn.finish(text, finish_reason, usage)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=_part(text))
    yield event("response.output_item.done", output_index=0, item=response["output"][0])
    yield event(f"response.{response['status']}", response=response)
