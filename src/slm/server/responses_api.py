"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A request is parsed into ``ResponsesRequest``, its input (after the stored conversation it continues, and
its ``instructions`` as a system message) becomes a chat prompt, and the answer comes back through the same
backends as /v1/chat/completions: a ``message`` item with ``output_text``, and a ``function_call`` item for
each tool call. Streamed, it is OpenAI's typed events (``event:`` and ``data:`` lines, each with a
``sequence_number``); there is no ``[DONE]``. Responses
with ``store`` (the default) are kept in memory (``response_store``) for ``previous_response_id``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from slm.errors import SlmError
from slm.generation.stream import Chunk, Completion, Usage
from slm.generation.tool_use import ToolCall
from slm.model import Prompt
from slm.server.backends import Answers, respond
from slm.server.errors import openai_body
from slm.server.pool import pool_of
from slm.server.response_store import ResponseStore
from slm.server.responses_schema import ResponsesRequest
from slm.server.schemas import checked_conversation, parse

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
    conversation = checked_conversation([*earlier, *body.messages()])
    params, tools = body.params(), body.tool_use()
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    backend = await pool_of(request).backend(body.model, request)
    answers = await backend.answer([Prompt.chat([*system, *conversation], tools)], params)
    turn = Turn(backend.name, body.echoed(params), conversation, store if body.store else None)
    return await respond(request, answers, body.stream, lambda first, rest: _events(turn, first, rest),
                         lambda finished: turn.whole(finished[0]), "text/event-stream")


@router.get("/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> dict[str, Any]:
    return store_of(request).get(response_id).response


@router.delete("/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    store_of(request).delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


class Turn:
    """One response object: its identity, the request's settings it repeats, and (once answered) its output
    items; stored when it ends if the request asked for that."""

    def __init__(self, model: str, echoed: dict[str, Any], conversation: list[dict[str, Any]],
                 store: ResponseStore | None) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
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

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        """The message item: no content while in progress (``text`` None), else its one ``output_text``."""
        content = [] if text is None else [_part(text)]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call(call: ToolCall, status: str = "completed") -> dict[str, Any]:
        """A ``function_call`` item (its arguments empty while in progress)."""
        arguments = call.spec()["function"]["arguments"] if status == "completed" else ""
        return {"id": f"fc_{call.id.removeprefix('call_')}", "type": "function_call", "status": status,
                "call_id": call.id, "name": call.name, "arguments": arguments}

    def whole(self, completion: Completion) -> dict[str, Any]:
        """The response to a request that did not stream: the message, if it says anything or calls nothing,
        then the calls."""
        text, calls = completion.text, completion.tool_calls
        output = [self.message(text, _item_status(completion.finish_reason))] if text.strip() or not calls else []
        output += [self.call(c) for c in calls]
        return self.finish(output, text, calls, completion.finish_reason, completion.usage)

    def finish(self, output: list[dict[str, Any]], text: str, calls: Sequence[ToolCall], finish_reason: str | None,
               usage: Usage | None) -> dict[str, Any]:
        """The finished response (stored, if asked): ``incomplete`` when it ran out of ``max_output_tokens``."""
        done = finish_reason != "length"
        response = self.object("completed" if done else "incomplete", output, _usage(usage),
                               None if done else {"reason": "max_output_tokens"})
        if self.store is not None:
            answer: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                answer["tool_calls"] = [c.spec() for c in calls]
            self.store.put(response, [*self.conversation, answer])
        return response


def _item_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


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
    """The stream: the message item opens at its first text that is not blank (a reply that only calls
    tools has none, as in ``Turn.whole``), each call is an item of its own as it completes."""
    event = _Events()
    yield event("response.created", response=turn.object("in_progress", []))
    yield event("response.in_progress", response=turn.object("in_progress", []))
    output: list[dict[str, Any]] = []
    message_index: int | None = None
    pieces: list[str] = []
    calls: list[ToolCall] = []
    finish_reason: str | None = None
    usage: Usage | None = None

    def open_message() -> Iterator[str]:
        nonlocal message_index
        message_index = len(output)
        output.append(turn.message(None, "in_progress"))
        yield event("response.output_item.added", output_index=message_index, item=output[-1])
        yield event("response.content_part.added", item_id=turn.message_id, output_index=message_index,
                    content_index=0, part=_part(""))

    item: tuple[int, Chunk] | None = first
    try:
        while item is not None:
            _, chunk = item
            pieces.append(chunk.text)
            if message_index is None and "".join(pieces).strip():
                for line in open_message():
                    yield line
                chunk = replace(chunk, text="".join(pieces))  # what was held back while blank
            if chunk.text and message_index is not None:
                yield event("response.output_text.delta", item_id=turn.message_id, output_index=message_index,
                            content_index=0, delta=chunk.text, logprobs=[])
            for call in chunk.tool_calls:
                for line in _call_events(event, turn, call, len(output)):
                    yield line
                output.append(turn.call(call))
                calls.append(call)
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
    if message_index is None and not calls:
        for line in open_message():
            yield line
    if message_index is not None:
        output[message_index] = turn.message(text, _item_status(finish_reason))
        where = {"item_id": turn.message_id, "output_index": message_index, "content_index": 0}
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=_part(text))
        yield event("response.output_item.done", output_index=message_index, item=output[message_index])
    response = turn.finish(output, text, calls, finish_reason, usage)
    yield event(f"response.{response['status']}", response=response)


def _call_events(event: _Events, turn: Turn, call: ToolCall, index: int) -> Iterator[str]:
    """A call as OpenAI streams one: its item, its arguments (whole: they are parsed before they are sent),
    the item done."""
    done = turn.call(call)
    yield event("response.output_item.added", output_index=index, item=turn.call(call, "in_progress"))
    yield event("response.function_call_arguments.delta", item_id=done["id"], output_index=index,
                delta=done["arguments"])
    yield event("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                arguments=done["arguments"])
    yield event("response.output_item.done", output_index=index, item=done)
