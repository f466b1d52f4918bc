"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

Responses follow OpenAI's field for field, so the official SDKs and the tools built on them work
unchanged; streams are server-sent events ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from slm import __version__
from slm.api import Model
from slm.errors import InvalidParameter, SlmError
from slm.generation.generator import TokenLogprob
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, Usage
from slm.server import gateway
from slm.server.bridge import Batch, BatchStream, check_request, jobs_for, unless_disconnected
from slm.server.errors import openai_body
from slm.server.pool import ModelPool, Served, pool_of
from slm.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAISampling, parse

log = logging.getLogger("slm.server")

router = APIRouter(prefix="/v1")

FINGERPRINT = f"slm-{__version__}"
STARTED = int(time.time())


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    pool = pool_of(request)
    return {"object": "list", "data": [_card(pool, name) for name in pool.names]}


@router.get("/models/{name:path}")
async def get_model(request: Request, name: str) -> dict[str, Any]:
    pool = pool_of(request)
    return _card(pool, name if pool.is_remote_name(name) else pool.lookup(name))


def _card(pool: ModelPool, name: str) -> dict[str, Any]:
    if name in pool.names and pool.is_remote_name(name):
        return {"id": name, "object": "model", "created": STARTED, "owned_by": "remote"}
    created = int(pool.file(name).path.stat().st_mtime)
    return {"id": name, "object": "model", "created": created, "owned_by": "slm"}


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = parse(ChatCompletionRequest, await request.body())
    conversation, params = body.conversation(), body.params()
    remote = await asyncio.to_thread(pool_of(request).remote, body.model)
    if remote is not None:
        answer = ChatAnswer(body.model, remote, params)
        return await _remote(request, answer, body, lambda: remote.chat_stream(conversation, params))
    served, _ = await pool_of(request).get(body.model, request)
    prompt = await asyncio.to_thread(served.model.chat_tokens, conversation)
    return await _answer(request, ChatAnswer(served.name, served.model, params), body, served, [prompt], params)


@router.post("/completions")
async def completions(request: Request) -> Response:
    body = parse(CompletionRequest, await request.body())
    texts, params = body.prompts(), body.params()
    remote = await asyncio.to_thread(pool_of(request).remote, body.model)
    if remote is not None:
        if len(texts) != 1 or not isinstance(texts[0], str):
            raise InvalidParameter("prompt", "a remote model or route takes one prompt, as text")
        text = texts[0]
        answer = TextAnswer(body.model, remote, params)
        return await _remote(request, answer, body, lambda: remote.stream(text, params))
    served, _ = await pool_of(request).get(body.model, request)
    prompts = [await asyncio.to_thread(served.model.tokenize, p) if isinstance(p, str) else p for p in texts]
    return await _answer(request, TextAnswer(served.name, served.model, params), body, served, prompts, params)


async def _answer(request: Request, answer: Answer, body: OpenAISampling, served: Served,
                  prompts: list[list[int]], params: GenerationParams) -> Response:
    check_request(served.model, params, prompts)
    batch = Batch(served, jobs_for(prompts, params, body.n))
    try:
        if body.stream:
            # Wait for the first token before answering 200, so a request that fails at once (a prompt
            # beyond the context) gets its error status.
            first = await unless_disconnected(request, batch.next())
            return BatchStream(_events(answer, first, batch, body.n, body.include_usage), batch, "text/event-stream")
        finished = await unless_disconnected(request, batch.completions())
    except BaseException:
        batch.cancel()
        raise
    return JSONResponse(answer.response(finished, body.n))


async def _remote(request: Request, answer: Answer, body: OpenAISampling, start: Callable[[], Any]) -> Response:
    """A remote model's or a route's answer, in this API's format."""
    gateway.only_one_choice(body.n)

    def events(chunk: Chunk, first: bool) -> list[str]:
        extra = {"served_by": chunk.served_by} if chunk.served_by else {}
        lines = [_event(answer.envelope(answer.chunk_object, [choice], **extra))
                 for choice in answer.stream_choices(0, chunk, first)]
        if chunk.usage is not None and body.include_usage:
            lines.append(_event(answer.envelope(answer.chunk_object, [], usage=_usage([chunk.usage], 1), **extra)))
        return lines

    def whole(completion: Completion) -> dict[str, Any]:
        extra = {"served_by": completion.served_by} if completion.served_by else {}
        return {**answer.response([completion], 1), **extra}

    return await gateway.answer(request, start, body.stream, events, whole, gateway.openai_error_line,
                                end="data: [DONE]\n\n")


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(answer: Answer, first: tuple[int, Chunk], batch: Batch, n: int,
                  include_usage: bool) -> AsyncIterator[str]:
    usage = {"usage": None} if include_usage else {}
    started: set[int] = set()
    finals: dict[int, Usage] = {}
    item: tuple[int, Chunk] | None = first
    try:
        while item is not None:
            index, chunk = item
            for choice in answer.stream_choices(index, chunk, first=index not in started):
                yield _event(answer.envelope(answer.chunk_object, [choice], **usage))
            started.add(index)
            if chunk.usage is not None:
                finals[index] = chunk.usage
            item = None if batch.done else await batch.next()
    except Exception as e:  # the status line is sent: the error goes in the stream, as OpenAI's does
        if not isinstance(e, SlmError):
            log.exception("generation failed mid-stream")
        yield _event(openai_body(e))
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        usages = [finals[i] for i in sorted(finals)]
        yield _event(answer.envelope(answer.chunk_object, [], usage=_usage(usages, n)))
    yield "data: [DONE]\n\n"


def _usage(usages: Sequence[Usage], n: int) -> dict[str, Any]:
    """Token counts of a whole response; the n choices of a prompt read it once. Prompt tokens taken
    from the prefix cache are reported as OpenAI reports its own cache hits."""
    prompt = sum(u.prompt_tokens for u in usages[::n])
    cached = sum(u.cached_tokens for u in usages[::n])
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Answer:
    """One response's identity and the shape of its choices; the endpoints differ in the choices."""

    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, model_name: str, model: Model, params: GenerationParams) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name = model_name
        self.model = model
        self.logprobs = params.logprobs
        self._end_of_generation = model.info.special.end_of_generation

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.model_name,
            "system_fingerprint": FINGERPRINT, "choices": choices, **extra,
        }

    def response(self, completions: list[Completion], n: int) -> dict[str, Any]:
        choices = [self.choice(i, c) for i, c in enumerate(completions)]
        return self.envelope(self.object, choices, usage=_usage([c.usage for c in completions], n))

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        raise NotImplementedError

    def stream_choices(self, index: int, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        raise NotImplementedError

    def text_of(self, token: int) -> str:
        return self.model.detokenize([token])

    def shown(self, logprobs: Sequence[TokenLogprob | None]) -> list[TokenLogprob]:
        """The logprobs to report: none for the end-of-turn token, which is not part of the text."""
        return [lp for lp in logprobs if lp is not None and lp.token not in self._end_of_generation]


class ChatAnswer(Answer):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": completion.text, "refusal": None},
            "logprobs": self._logprobs(completion.logprobs),
            "finish_reason": completion.finish_reason,
        }

    def stream_choices(self, index: int, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        choices = []
        logprobs = self._logprobs([chunk.logprob]) if self.shown([chunk.logprob]) else None
        if first or chunk.text or logprobs:
            delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
            choices.append({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None})
        if chunk.finish_reason is not None:
            choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": chunk.finish_reason})
        return choices

    def _logprobs(self, logprobs: Sequence[TokenLogprob | None]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [self._entry(lp) for lp in self.shown(logprobs)], "refusal": None}

    def _entry(self, lp: TokenLogprob) -> dict[str, Any]:
        top = [self._token(t, p) for t, p in lp.top]
        return {**self._token(lp.token, lp.logprob), "top_logprobs": top}

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


class TextAnswer(Answer):
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model_name: str, model: Model, params: GenerationParams) -> None:
        super().__init__(model_name, model, params)
        self._offsets: dict[int, int] = {}  # per choice: characters of text streamed so far

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        return {
            "index": index,
            "text": completion.text,
            "logprobs": self._logprobs(completion.logprobs, 0),
            "finish_reason": completion.finish_reason,
        }

    def stream_choices(self, index: int, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        offset = self._offsets.get(index, 0)
        logprobs = self._logprobs([chunk.logprob], offset) if self.shown([chunk.logprob]) else None
        self._offsets[index] = offset + len(chunk.text)
        if not (chunk.text or logprobs or chunk.finish_reason):
            return []
        return [{"index": index, "text": chunk.text, "logprobs": logprobs, "finish_reason": chunk.finish_reason}]

    def _logprobs(self, logprobs: Sequence[TokenLogprob | None], offset: int) -> dict[str, Any] | None:
        """The legacy completions shape: parallel lists of tokens, their logprobs and offsets."""
        if not self.logprobs:
            return None
        shown = self.shown(logprobs)
        tokens = [self.text_of(lp.token) for lp in shown]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in shown],
            "top_logprobs": [{self.text_of(t): p for t, p in lp.top} for lp in shown],
            "text_offset": offsets,
        }
