"""The Ollama API: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Streams are NDJSON (one object a line, the last with ``done: true`` and the counts and durations in
nanoseconds), as Ollama's clients read them; ``"stream": false`` answers with that last object alone.
Tool calls are written as Ollama writes them: ``message.tool_calls`` with the arguments as an object,
streamed in a line of their own once each call is complete, and ``done_reason`` "stop". A beam search
(``options.num_beams``, slm's extension) answers with its best beam, streamed as one line once it has ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from slm import __version__
from slm.engines import ModelInfo
from slm.errors import InvalidParameter, SlmError
from slm.generation.generator import TokenLogprob
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion
from slm.generation.tool_use import ToolCall
from slm.model import Prompt
from slm.server.backends import Answers, Backend, reported, respond, unless_disconnected
from slm.server.errors import ollama_body
from slm.server.pool import pool_of
from slm.server.schemas import ModelRequest, OllamaChatRequest, OllamaGenerateRequest, as_option, parse
from slm.store.catalog import ResolvedModel
from slm.store.describe import describe, human_count

log = logging.getLogger("slm.server")

router = APIRouter(prefix="/api")

NEVER = "9999-12-31T23:59:59Z"
"""When a model kept forever expires (``keep_alive`` < 0)."""


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    pool = pool_of(request)
    loaded = {s.name: s.model.info for s in pool.loaded()}
    return {"models": [_listing(pool.file(name), loaded.get(name)) if not pool.is_remote_name(name)
                       else _remote_listing(name) for name in pool.names]}


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    models = []
    pool = pool_of(request)
    for served in pool.loaded():
        info = served.model.info
        expires = NEVER if math.isinf(served.expires_at) else _iso(served.expires_at)
        models.append({**_listing(served.file, info), "expires_at": expires, "size_vram": 0,
                       "context_length": info.context_length})
    for embedder in pool.loaded_embedders():
        expires = NEVER if math.isinf(embedder.expires_at) else _iso(embedder.expires_at)
        models.append({**_listing(embedder.file, None), "expires_at": expires, "size_vram": 0,
                       "context_length": embedder.batcher.model.max_length})
    return {"models": models}


@router.post("/show")
async def show(request: Request) -> dict[str, Any]:
    name = parse(ModelRequest, await request.body()).model_name()
    if await asyncio.to_thread(pool_of(request).remote, name) is not None:
        listing = _remote_listing(name.removesuffix(":latest"))
        return {"modelfile": f"# {name}: a remote model (or route) reached through slm {__version__}\n",
                "parameters": "", "template": "", "details": listing["details"],
                "model_info": {"general.architecture": "remote"}, "capabilities": ["completion"],
                "modified_at": listing["modified_at"]}
    served, _ = await pool_of(request).get(name, request)
    info = served.model.info
    return {
        "modelfile": f"# served by slm {__version__}\nFROM {served.file.path}\n",
        "parameters": "",
        "template": info.chat_template or "",
        "details": _details(served.file, info),
        "model_info": {
            **info.metadata,
            "general.parameter_count": _parameters(served.file, info),
            f"{info.architecture}.context_length": info.train_context_length,
            f"{info.architecture}.vocab_size": info.vocab_size,
        },
        "capabilities": ["completion", *(["vision"] if getattr(served.model, "takes_images", False) else [])],
        "modified_at": _iso(served.file.path.stat().st_mtime),
    }


@router.post("/chat")
async def chat(request: Request) -> Response:
    started = time.perf_counter()
    body = parse(OllamaChatRequest, await request.body())
    conversation, tools, params = body.conversation(), body.tool_use(), body.params()
    backend = await pool_of(request).backend(body.model, request, body.keep_alive_seconds())
    reply = Reply(body.model, backend, params, chat=True, started=started)
    if not conversation:  # Ollama's way to load a model (or, with keep_alive 0, to unload it)
        return JSONResponse(reply.loaded(unload=body.keep_alive_seconds() == 0))
    return await _respond(request, reply, body.stream, backend, Prompt.chat(conversation, tools), params)


@router.post("/generate")
async def generate(request: Request) -> Response:
    started = time.perf_counter()
    body = parse(OllamaGenerateRequest, await request.body())
    body.check()
    params = body.params()
    backend = await pool_of(request).backend(body.model, request, body.keep_alive_seconds())
    reply = Reply(body.model, backend, params, chat=False, started=started)
    if not body.prompt:  # Ollama's way to load a model (or, with keep_alive 0, to unload it)
        return JSONResponse(reply.loaded(unload=body.keep_alive_seconds() == 0))
    prompt = Prompt.instruction(body.prompt, body.system, raw=body.raw, instruct=backend.model.instruct,
                                context=body.context or (), images=body.images or ())
    try:
        return await _respond(request, reply, body.stream, backend, prompt, params)
    except InvalidParameter as e:  # the images went into a chat turn; the request named them "images"
        where = e.field.split(".images", 1)
        raise (type(e)(f"images{where[1]}", e.reason) if len(where) == 2 else e) from None


async def _respond(request: Request, reply: Reply, stream: bool, backend: Backend, prompt: Prompt,
                   params: GenerationParams) -> Response:
    try:
        answers = await backend.answer([prompt], params)
        if stream and params.num_beams > 1:
            return await _beam_stream(request, reply, answers)
        return await respond(request, answers, stream, lambda first, rest: _lines(reply, first, rest),
                             lambda finished: reply.whole(finished[0], answers.prompt_ids(0)),
                             "application/x-ndjson")
    except InvalidParameter as e:
        raise as_option(e) from None


async def _beam_stream(request: Request, reply: Reply, answers: Answers) -> Response:
    """A beam search's stream, written once the search has ended (no beam is the answer before): the best
    beam's text in one line, then the last line. Made from the whole answer because ``context`` needs its
    tokens, which the search's one chunk does not carry."""
    try:
        (best,) = await unless_disconnected(request, answers.completions())
    except BaseException:
        answers.cancel()
        raise
    return Response(_line(reply.part(best.text, None)) + _line(reply.last(best, answers.prompt_ids(0))),
                    media_type="application/x-ndjson")


def _line(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


async def _lines(reply: Reply, first: tuple[int, Chunk], answers: Answers) -> AsyncIterator[str]:
    tokens: list[int] = []
    _, chunk = first
    try:
        while True:
            if chunk.token is not None:
                tokens.append(chunk.token)
            logprobs = reply.logprobs([chunk.logprob])
            if chunk.text or logprobs or chunk.tool_calls:
                yield _line(reply.part(chunk.text, logprobs, chunk.tool_calls))
            if chunk.finish_reason is not None:
                yield _line(reply.done(chunk, answers.prompt_ids(0) + tokens))
                return
            _, chunk = await answers.next()
    except Exception as e:  # the status line is sent: the error goes in the stream, as Ollama's does
        if not isinstance(e, SlmError):
            log.exception("generation failed mid-stream")
        yield _line(ollama_body(e))


class Reply:
    """The objects of one Ollama answer: chat messages or generate responses, and the final counts."""

    def __init__(self, model_name: str, backend: Backend, params: GenerationParams, *, chat: bool,
                 started: float) -> None:
        self.model_name = model_name
        self.chat = chat
        self.started = started
        self.load_seconds = backend.load_seconds
        self._want_logprobs = params.logprobs
        self._end_of_generation = backend.model.info.special.end_of_generation

    def _head(self, text: str, done: bool, calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
        created = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            content: dict[str, Any] = {"message": message}
        else:
            content = {"response": text}
        return {"model": self.model_name, "created_at": created, **content, "done": done}

    def part(self, text: str, logprobs: list[dict[str, Any]] | None,
             calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
        return {**self._head(text, False, calls), **({"logprobs": logprobs} if logprobs else {})}

    def done(self, last: Chunk, context: list[int], text: str = "",
             logprobs: list[dict[str, Any]] | None = None, calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
        assert last.usage is not None and last.timings is not None
        t = last.timings
        final = {
            **self._head(text, True, calls),
            # Ollama ends a reply that called tools with "stop", as any other that ended by itself.
            "done_reason": "stop" if last.finish_reason == "tool_calls" else last.finish_reason,
            "total_duration": _ns(time.perf_counter() - self.started),
            "load_duration": _ns(self.load_seconds),
            "prompt_eval_count": last.usage.prompt_tokens,
            "prompt_eval_duration": _ns(t.time_to_first_token),
            "eval_count": last.usage.completion_tokens,
            "eval_duration": _ns(t.decode_seconds),
        }
        if logprobs:
            final["logprobs"] = logprobs
        if not self.chat:
            final["context"] = context
        if last.served_by:
            final["served_by"] = last.served_by
        return final

    def whole(self, completion: Completion, prompt: list[int]) -> dict[str, Any]:
        """A finished answer as one object: the last, with the text."""
        return self.done(_last_chunk(completion), prompt + completion.tokens, completion.text,
                         self.logprobs(completion.logprobs), completion.tool_calls)

    def last(self, completion: Completion, prompt: list[int]) -> dict[str, Any]:
        """A finished answer's last object in a stream (the text went in the lines before)."""
        return self.done(_last_chunk(completion), prompt + completion.tokens)

    def loaded(self, unload: bool = False) -> dict[str, Any]:
        return {
            **self._head("", True), "done_reason": "unload" if unload else "load",
            "total_duration": _ns(time.perf_counter() - self.started), "load_duration": _ns(self.load_seconds),
        }

    def logprobs(self, logprobs: Sequence[TokenLogprob | None]) -> list[dict[str, Any]] | None:
        if not self._want_logprobs:
            return None
        shown = [lp for lp in logprobs if lp is not None and lp.token not in self._end_of_generation]
        return [
            {**self._token(lp, lp.token, lp.logprob), "top_logprobs": [self._token(lp, t, p) for t, p in lp.top]}
            for lp in shown
        ] or None

    @staticmethod
    def _token(lp: TokenLogprob, token: int, logprob: float) -> dict[str, Any]:
        return {"token": lp.text_of(token).text, "logprob": reported(logprob)}


def _last_chunk(completion: Completion) -> Chunk:
    return Chunk("", None, finish_reason=completion.finish_reason, usage=completion.usage,
                 timings=completion.timings, served_by=completion.served_by)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _listing(file: ResolvedModel, info: ModelInfo | None) -> dict[str, Any]:
    stat = file.path.stat()
    # A stand-in for Ollama's content digest: hashing a multi-gigabyte file per listing is too slow.
    digest = hashlib.sha256(f"{file.path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    name = _tagged(file.name)
    return {
        "name": name, "model": name, "modified_at": _iso(stat.st_mtime), "size": stat.st_size,
        "digest": digest, "details": _details(file, info),
    }


def _remote_listing(name: str) -> dict[str, Any]:
    """A remote model or route in /api/tags: no file here, so no size or digest of its own."""
    return {"name": _tagged(name), "model": _tagged(name), "modified_at": _iso(time.time()), "size": 0,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "remote", "family": "", "families": None,
                        "parameter_size": "", "quantization_level": ""}}


def _parameters(file: ResolvedModel, info: ModelInfo | None) -> int | None:
    """The loaded engine's count, else what the files say (an ONNX or OpenVINO folder does not record it for its
    engine: 0); None when neither knows."""
    return info.parameters if info is not None and info.parameters else describe(file).parameters


def _details(file: ResolvedModel, info: ModelInfo | None) -> dict[str, Any]:
    family = info.architecture if info is not None else ""
    entry = file.entry
    if entry is not None:
        size, quantization = entry.parameters, entry.quantization
    else:
        count = _parameters(file, info)
        size = human_count(count) if count is not None else ""
        quantization = describe(file).precision or ""
    return {
        "parent_model": "", "format": file.format, "family": family, "families": [family] if family else None,
        "parameter_size": size, "quantization_level": quantization,
    }
