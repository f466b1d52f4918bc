"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A request is parsed into ``MessagesRequest`` (``anthropic_schema``); its system prompt, messages and tools
become a chat prompt, answered by the same backends as /v1/chat/completions. The answer is a ``message``
whose content is a ``text`` block and a ``tool_use`` block for each call; streamed, it is Anthropic's events
(``event:`` and ``data:`` lines): ``message_start``, each block's ``content_block_start``, deltas and
``content_block_stop``, then ``message_delta`` (stop reason, usage) and ``message_stop``. Prompt tokens
read from the prefix cache are reported as Anthropic reports its cache reads (``cache_read_input_tokens``,
not in ``input_tokens``). Errors are in Anthropic's shape (``errors.anthropic_body``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from slm.errors import InvalidParameter, SlmError
from slm.generation.stream import Chunk, Completion, Usage
from slm.generation.tool_use import ToolCall
from slm.model import Prompt
from slm.server.anthropic_schema import Conversation, CountTokensRequest, MessagesInput, MessagesRequest
from slm.server.backends import Answers, Backend, LocalBackend, respond
from slm.server.errors import anthropic_body
from slm.server.image_urls import fetch_image_urls
from slm.server.pool import pool_of
from slm.server.schemas import parse

log = logging.getLogger("slm.server")

router = APIRouter(prefix="/v1")


@router.post("/messages")
async def create_message(request: Request) -> Response:
    body = parse(MessagesRequest, await request.body())
    params = body.params()
    conversation, prompt, backend = await _prompt(request, body)
    try:
        answers = await backend.answer([prompt], params)
    except InvalidParameter as e:
        raise conversation.named(e) from None
    reply = Reply(backend.name)
    return await respond(request, answers, body.stream, lambda first, rest: _events(reply, first, rest),
                         lambda finished: reply.whole(finished[0]), "text/event-stream")


@router.post("/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, int]:
    """The prompt's tokens as the model's chat template writes it (tools included): the ``input_tokens``
    a message with it would use, cache reads included."""
    body = parse(CountTokensRequest, await request.body())
    conversation, prompt, backend = await _prompt(request, body)
    if not isinstance(backend, LocalBackend):
        raise InvalidParameter("model", f"{backend.name} is a remote model: its tokens are counted by its provider")
    model, scheduler = backend.served.model, backend.served.scheduler
    try:
        tokens = await asyncio.wrap_future(scheduler.call(lambda: model.prompt_tokens(prompt)))
    except InvalidParameter as e:
        raise conversation.named(e) from None
    return {"input_tokens": len(tokens)}


async def _prompt(request: Request, body: MessagesInput) -> tuple[Conversation, Prompt, Backend]:
    """The request's conversation, its prompt (images fetched if the server may) and the backend of its model."""
    conversation, tools = body.conversation(), body.tool_use()
    try:
        messages = await fetch_image_urls(conversation.messages, request.app.state.allow_image_urls)
    except InvalidParameter as e:
        raise conversation.named(e) from None
    backend = await pool_of(request).backend(body.model, request)
    return conversation, Prompt.chat(messages, tools), backend


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    """Anthropic's name for why the answer ended."""
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def usage_of(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.completion_tokens}


def tool_use_block(call: ToolCall, streamed: bool = False) -> dict[str, Any]:
    """A call as a ``tool_use`` block (its input empty when it opens a stream's block: it comes as a delta)."""
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": {} if streamed else call.arguments}


class Reply:
    """One message: its identity, and its shape whole or as it starts a stream."""

    def __init__(self, model: str) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model

    def message(self, content: list[dict[str, Any]], reason: str | None, stop_sequence: str | None,
                usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason, "stop_sequence": stop_sequence, "usage": usage}

    def whole(self, completion: Completion) -> dict[str, Any]:
        """The answer to a request that did not stream: its text, if it says anything or calls nothing, then
        its calls."""
        text, calls = completion.text, completion.tool_calls
        content = [{"type": "text", "text": text}] if text.strip() or not calls else []
        content += [tool_use_block(c) for c in calls]
        return self.message(content, stop_reason(completion.finish_reason, completion.stop_sequence),
                            completion.stop_sequence, usage_of(completion.usage))


def _event(kind: str, **data: Any) -> str:
    payload = json.dumps({"type": kind, **data}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {payload}\n\n"


class _Blocks:
    """A streamed answer's content blocks, one open at a time and numbered in order. Text that is only blank
    is held back until more comes: a reply that only calls tools has no text block (as ``Reply.whole``)."""

    def __init__(self) -> None:
        self.count = 0
        self.text_open = False
        self.held = ""

    def text(self, text: str) -> Iterator[str]:
        self.held += text
        if not self.held or not (self.text_open or self.held.strip()):
            return
        if not self.text_open:
            yield self._start({"type": "text", "text": ""})
            self.text_open = True
        yield _event("content_block_delta", index=self.count, delta={"type": "text_delta", "text": self.held})
        self.held = ""

    def call(self, call: ToolCall) -> Iterator[str]:
        """A call as a block of its own: its id and name, its input whole (it was parsed before it was sent)."""
        yield from self.close()
        yield self._start(tool_use_block(call, streamed=True))
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        yield _event("content_block_delta", index=self.count, delta={"type": "input_json_delta",
                                                                     "partial_json": arguments})
        yield self._stop()

    def end(self) -> Iterator[str]:
        """The last block closed (an empty text block when there was none)."""
        if not self.count and not self.text_open:
            yield self._start({"type": "text", "text": ""})
            self.text_open = True
        yield from self.close()

    def close(self) -> Iterator[str]:
        if self.text_open:
            self.text_open = False
            yield self._stop()

    def _start(self, block: dict[str, Any]) -> str:
        return _event("content_block_start", index=self.count, content_block=block)

    def _stop(self) -> str:
        self.count += 1
        return _event("content_block_stop", index=self.count - 1)


async def _events(reply: Reply, first: tuple[int, Chunk], answers: Answers) -> AsyncIterator[str]:
    # The prompt's size is known now; which of its tokens came from the cache, only at the end.
    start = {"input_tokens": len(answers.prompt_ids(0)), "output_tokens": 0}
    yield _event("message_start", message=reply.message([], None, None, start))
    blocks = _Blocks()
    last = first[1]
    item: tuple[int, Chunk] | None = first
    try:
        while item is not None:
            last = item[1]
            for line in blocks.text(last.text):
                yield line
            for call in last.tool_calls:
                for line in blocks.call(call):
                    yield line
            item = None if answers.done else await answers.next()
    except Exception as e:  # the status line is sent: the error goes in the stream, as Anthropic's does
        if not isinstance(e, SlmError):
            log.exception("generation failed mid-stream")
        yield _event("error", error=anthropic_body(e)["error"])
        return
    for line in blocks.end():
        yield line
    delta = {"stop_reason": stop_reason(last.finish_reason, last.stop_sequence), "stop_sequence": last.stop_sequence}
    yield _event("message_delta", delta=delta, usage=usage_of(last.usage))
    yield _event("message_stop")
