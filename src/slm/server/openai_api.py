"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

Responses follow OpenAI's field for field, so the official SDKs and the tools built on them work
unchanged; streams are server-sent events ending with ``data: [DONE]``. Tool calls are read from the
model's text on the engine thread; here they are only written out: in a message's ``tool_calls``, or
streamed as OpenAI streams them (each call's id and name, then its arguments).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from slm import __version__
from slm.engines.registry import image_side
from slm.errors import InvalidParameter, SlmError
from slm.generation.generator import TokenLogprob
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, Usage
from slm.generation.tool_use import ToolCall
from slm.model import Prompt
from slm.server import llamacpp_fields
from slm.server.backends import Answers, Backend, RemoteBackend, reported, respond
from slm.server.errors import openai_body
from slm.server.image_urls import fetch_image_urls
from slm.server.pool import ModelPool, pool_of
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
    file = pool.file(name)
    capabilities = (["embedding"] if pool.is_embedding(name)  # as Ollama's /api/show
                    else ["completion", *(["vision"] if image_side(file, pool.engine) else [])])
    return {"id": name, "object": "model", "created": int(file.path.stat().st_mtime), "owned_by": "slm",
            "capabilities": capabilities}


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = parse(ChatCompletionRequest, await request.body())
    conversation, tools, params = body.conversation(), body.tool_use(), body.params()
    conversation = await fetch_image_urls(conversation, request.app.state.allow_image_urls)
    backend = await pool_of(request).backend(body.model, request)
    params = _ignoring_end(body, backend, params)
    answers = await backend.answer([Prompt.chat(conversation, tools)], params, body.n)
    return await _respond(request, ChatAnswer(backend, params), body, answers)


@router.post("/completions")
async def completions(request: Request) -> Response:
    body = parse(CompletionRequest, await request.body())
    prompts, params = [Prompt.raw(p) for p in body.prompts()], body.params()
    backend = await pool_of(request).backend(body.model, request)
    params = _ignoring_end(body, backend, params)
    answers = await backend.answer(prompts, params, body.n)
    return await _respond(request, TextAnswer(backend, params), body, answers)


def _ignoring_end(body: OpenAISampling, backend: Backend, params: GenerationParams) -> GenerationParams:
    """llama.cpp's ``ignore_eos``: the model's end-of-generation tokens banned (a local model's: a remote one's
    tokens are not known here)."""
    if not body.ignore_eos:
        return params
    if isinstance(backend, RemoteBackend):
        raise InvalidParameter("ignore_eos", f"applies to local models; {backend.name} is remote")
    return llamacpp_fields.without_end(params, backend.model.info.special.end_of_generation)


async def _respond(request: Request, answer: Answer, body: OpenAISampling, answers: Answers) -> Response:
    return await respond(request, answers, body.stream,
                         lambda first, rest: _events(answer, first, rest, body.n, body.include_usage),
                         lambda finished: answer.response(finished, body.n), "text/event-stream")


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(answer: Answer, first: tuple[int, Chunk], answers: Answers, n: int,
                  include_usage: bool) -> AsyncIterator[str]:
    usage = {"usage": None} if include_usage else {}
    started: set[int] = set()
    finals: dict[int, Usage] = {}
    served_by: dict[str, str] = {}
    item: tuple[int, Chunk] | None = first
    try:
        while item is not None:
            index, chunk = item
            if chunk.served_by:
                served_by = {"served_by": chunk.served_by}
            for choice in answer.stream_choices(index, chunk, first=index not in started):
                yield _event(answer.envelope(answer.chunk_object, [choice], **usage, **served_by))
            started.add(index)
            if chunk.usage is not None:
                finals[index] = chunk.usage
            item = None if answers.done else await answers.next()
    except Exception as e:  # the status line is sent: the error goes in the stream, as OpenAI's does
        if not isinstance(e, SlmError):
            log.exception("generation failed mid-stream")
        yield _event(openai_body(e))
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        usages = [finals[i] for i in sorted(finals)]
        yield _event(answer.envelope(answer.chunk_object, [], usage=_usage(usages, n), **served_by))
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

    def __init__(self, backend: Backend, params: GenerationParams) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name = backend.name
        self.logprobs = params.logprobs
        self._end_of_generation = backend.model.info.special.end_of_generation

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.model_name,
            "system_fingerprint": FINGERPRINT, "choices": choices, **extra,
        }

    def response(self, completions: list[Completion], n: int) -> dict[str, Any]:
        choices = [self.choice(i, c) for i, c in enumerate(completions)]
        served_by = {"served_by": completions[0].served_by} if completions and completions[0].served_by else {}
        return self.envelope(self.object, choices, usage=_usage([c.usage for c in completions], n), **served_by)

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        raise NotImplementedError

    def stream_choices(self, index: int, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        raise NotImplementedError

    def shown(self, logprobs: Sequence[TokenLogprob | None]) -> list[TokenLogprob]:
        """The logprobs to report: none for the end-of-turn token, which is not part of the text."""
        return [lp for lp in logprobs if lp is not None and lp.token not in self._end_of_generation]


class ChatAnswer(Answer):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, backend: Backend, params: GenerationParams) -> None:
        super().__init__(backend, params)
        self._calls: dict[int, int] = {}  # per choice: tool calls streamed so far

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        calls = completion.tool_calls
        # A reply that is only calls has no content, as OpenAI's has none.
        content = completion.text if completion.text.strip() or not calls else None
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [c.spec() for c in calls]
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(completion.logprobs),
            "finish_reason": completion.finish_reason,
        }

    def stream_choices(self, index: int, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        choices = []
        if first:  # the role alone, with empty content, as OpenAI and llama.cpp open a choice's stream
            choices.append({"index": index, "delta": {"role": "assistant", "content": "", "refusal": None},
                            "logprobs": None, "finish_reason": None})
        logprobs = self._logprobs([chunk.logprob]) if self.shown([chunk.logprob]) else None
        if chunk.text or logprobs:
            choices.append({"index": index, "delta": {"content": chunk.text}, "logprobs": logprobs,
                            "finish_reason": None})
        for call in chunk.tool_calls:
            choices.extend(self._call_deltas(index, call))
        if chunk.finish_reason is not None:
            choices.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": chunk.finish_reason})
        return choices

    def _call_deltas(self, index: int, call: ToolCall) -> list[dict[str, Any]]:
        """A call streamed as OpenAI streams one: its index, id and name, then its arguments."""
        number = self._calls.get(index, 0)
        self._calls[index] = number + 1
        spec = call.spec()
        head = {"index": number, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        arguments = {"index": number, "function": {"arguments": spec["function"]["arguments"]}}
        return [{"index": index, "delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}
                for part in (head, arguments)]

    def _logprobs(self, logprobs: Sequence[TokenLogprob | None]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [self._entry(lp) for lp in self.shown(logprobs)], "refusal": None}

    def _entry(self, lp: TokenLogprob) -> dict[str, Any]:
        top = [self._token(lp, t, p) for t, p in lp.top]
        return {**self._token(lp, lp.token, lp.logprob), "top_logprobs": top}

    @staticmethod
    def _token(lp: TokenLogprob, token: int, logprob: float) -> dict[str, Any]:
        text, raw = lp.text_of(token)
        return {"token": text, "logprob": reported(logprob), "bytes": list(raw)}


class TextAnswer(Answer):
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, backend: Backend, params: GenerationParams) -> None:
        super().__init__(backend, params)
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
        tokens = [lp.text_of(lp.token).text for lp in shown]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [reported(lp.logprob) for lp in shown],
            "top_logprobs": [{lp.text_of(t).text: reported(p) for t, p in lp.top} for lp in shown],
            "text_offset": offsets,
        }
