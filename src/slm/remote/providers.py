"""Remote models at the text level: messages in, streamed text out, usage back.

Two wire formats cover every provider slm knows: the OpenAI chat API (GitHub Models, Azure AI Foundry,
NVIDIA NIM, OpenAI, and any OpenAI-compatible server: vLLM, SGLang, llama.cpp's server, another slm) and
Ollama's own API. A ``RemoteModel`` has the same ``chat`` / ``chat_stream`` / ``generate`` / ``stream``
as a local ``slm.Model``; a parameter the provider does not take is refused before any request.

Every call has a deadline; every failure is a ``RemoteError`` that says what happened and whether trying
again (or elsewhere) may help. Keys come from the environment and are sent only in the Authorization
header; they never appear in a message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import httpx

from slm.engines.base import SpecialTokens
from slm.errors import (
    InvalidParameter,
    RemoteBadResponse,
    RemoteContextExceeded,
    RemoteError,
    RemoteRejected,
    RemoteTimeout,
    RemoteUnavailable,
)
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, Timings, Usage, collect
from slm.model import Messages
from slm.remote.config import Provider

OPENAI_SAMPLING = {"max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty", "stop", "seed",
                   "logit_bias"}
EXTENDED_SAMPLING = {"top_k", "min_p", "typical_p", "repetition_penalty"}
OLLAMA_OPTIONS = {"max_tokens": "num_predict", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "min_p": "min_p", "typical_p": "typical_p", "repetition_penalty": "repeat_penalty",
                  "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
                  "seed": "seed", "stop": "stop"}
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class RemoteInfo:
    """What slm knows of a remote model without asking it."""

    architecture: str = "remote"
    context_length: int | None = None
    special: SpecialTokens = SpecialTokens(None, None, frozenset())
    """No token ids come back from a remote model: none of them ends a turn here."""


class RemoteModel:
    """A model behind an HTTP API, with the surface of ``slm.Model``."""

    instruct = True

    def __init__(self, provider: Provider, model: str, timeout: float = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` reads the time for deadlines and timings; a route passes its own, so that the
        deadlines it hands over are on the same clock."""
        self.provider, self.model = provider, model
        self.name = f"{provider.name}:{model}"
        self.info = RemoteInfo()
        self.timeout = timeout
        self._clock = clock
        self._url = provider.url()
        key = provider.key()  # a missing key fails here, naming its variable
        self._secret = key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if provider.name == "azure" and key:
            headers["api-key"] = key
        # No redirects: a key must not follow one to another host (httpx drops only Authorization).
        self._client = httpx.Client(headers=headers, follow_redirects=False)

    # --- the surface of slm.Model ----------------------------------------------------------

    def chat_stream(self, messages: Messages, params: GenerationParams | None = None,
                    deadline: float | None = None, **overrides: Any) -> Iterator[Chunk]:
        """The assistant's next turn, streamed; ``deadline`` (on the model's clock) bounds the whole call."""
        params = GenerationParams.of(params, **overrides)
        sent = self._sampling(params)
        if self.provider.kind == "ollama":
            body = {"model": self.model, "messages": list(messages), "stream": True, "options": sent}
            return self._ollama("/api/chat", body, deadline)
        body = {"model": self.model, "messages": list(messages), "stream": True,
                "stream_options": {"include_usage": True}, **sent}
        return self._openai("/chat/completions", body, deadline)

    def chat(self, messages: Messages, params: GenerationParams | None = None,
             deadline: float | None = None, **overrides: Any) -> Completion:
        return collect(self.chat_stream(messages, params, deadline, **overrides))

    def stream(self, prompt: str, params: GenerationParams | None = None, deadline: float | None = None,
               **overrides: Any) -> Iterator[Chunk]:
        """Raw completion of ``prompt``, where the provider offers it (servers of one's own, OpenAI)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidParameter("prompt", "must be non-empty text for a remote model")
        params = GenerationParams.of(params, **overrides)
        sent = self._sampling(params)
        if self.provider.kind == "ollama":
            body = {"model": self.model, "prompt": prompt, "raw": True, "stream": True, "options": sent}
            return self._ollama("/api/generate", body, deadline)
        if not self.provider.completions:
            raise InvalidParameter("raw", f"{self.provider.name} offers chat only, not raw completion; use chat")
        body = {"model": self.model, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True},
                **sent}
        return self._openai("/completions", body, deadline)

    def generate(self, prompt: str, params: GenerationParams | None = None, deadline: float | None = None,
                 **overrides: Any) -> Completion:
        return collect(self.stream(prompt, params, deadline, **overrides))

    def alive(self, timeout: float) -> bool:
        """Whether the server answers within ``timeout`` seconds: a GET of its model list (``/models``,
        Ollama's ``/api/tags``), which vLLM, SGLang, llama.cpp's server, slm and Ollama all serve without
        running the model. Any status below 500 is a server that is up (a 401 or 404 is for the call to
        report); a 5xx, a timeout or no connection is one that is down."""
        path = "/api/tags" if self.provider.kind == "ollama" else "/models"
        try:
            return self._client.get(self._url + path, timeout=timeout).status_code < 500
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r}, {self._url})"

    # --- parameters ------------------------------------------------------------------------

    def _sampling(self, params: GenerationParams) -> dict[str, Any]:
        """The parameters the caller set (even to slm's default value) or that differ from slm's defaults,
        in the provider's names; one it does not take, set to anything but its neutral default, is an
        error, not silently dropped."""
        default = GenerationParams()
        given = {f.name: getattr(params, f.name) for f in fields(params) if f.name != "given"
                 and (f.name in params.given or getattr(params, f.name) != getattr(default, f.name))}
        if self.provider.kind == "ollama":
            takes = set(OLLAMA_OPTIONS)
        else:
            takes = OPENAI_SAMPLING | (EXTENDED_SAMPLING if self.provider.extended_sampling else set())
        for name in list(given):
            if name not in takes and given[name] == getattr(default, name):
                del given[name]  # set, but to what it means anyway (logprobs off, no stop strings)
            elif name not in takes:
                hint = " (it samples on the server)" if name in ("logits_processors", "logprobs", "top_logprobs") \
                    else ""
                raise InvalidParameter(name, f"{self.provider.name} does not take {name}{hint}; "
                                             f"it takes {', '.join(sorted(takes))}")
        if self.provider.kind == "ollama":
            return {OLLAMA_OPTIONS[k]: list(v) if k == "stop" else v for k, v in given.items()}
        sent = {k: list(v) if k == "stop" else v for k, v in given.items()}
        if "logit_bias" in sent:
            sent["logit_bias"] = {str(k): v for k, v in dict(given["logit_bias"]).items()}
        return sent

    # --- the wire --------------------------------------------------------------------------

    def _openai(self, path: str, body: dict[str, Any], deadline: float | None) -> Iterator[Chunk]:
        """Server-sent events of the OpenAI API -> chunks; the last one has usage and timings."""
        start = self._clock()
        first = last = 0.0
        finish: str | None = None
        usage: dict[str, Any] = {}
        pieces = 0
        for line in self._lines(path, body, deadline or start + self.timeout):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = self._json(data)
            if "error" in event:
                raise RemoteError(f"{self.name}: {_message(event)}")
            try:
                usage = dict(event.get("usage") or usage)
                choices = [dict(c) for c in event.get("choices") or []]
                texts = [str((c.get("delta") or {}).get("content") or c.get("text") or "") for c in choices]
            except (AttributeError, TypeError, ValueError):
                raise RemoteBadResponse(f"{self.name}: the server sent an event of another shape: {data[:80]!r}") \
                    from None
            for choice, text in zip(choices, texts, strict=True):
                if text:
                    now = self._clock()
                    first, last, pieces = first or now, now, pieces + 1
                    yield Chunk(text, None)
                finish = choice.get("finish_reason") or finish
        if finish is None:
            raise RemoteBadResponse(f"{self.name}: the stream ended before the answer did (no finish reason)")
        yield self._last(finish, usage.get("prompt_tokens"), usage.get("completion_tokens"), pieces,
                         start, first, last)

    def _ollama(self, path: str, body: dict[str, Any], deadline: float | None) -> Iterator[Chunk]:
        """Ollama's newline-delimited JSON -> chunks."""
        start = self._clock()
        first = last = 0.0
        pieces = 0
        for line in self._lines(path, body, deadline or start + self.timeout):
            if not line.strip():
                continue
            event = self._json(line)
            if "error" in event:
                raise RemoteError(f"{self.name}: {_message(event)}")
            try:
                text = str((event.get("message") or {}).get("content") or event.get("response") or "")
            except AttributeError:
                raise RemoteBadResponse(f"{self.name}: the server sent a line of another shape: {line[:80]!r}") \
                    from None
            if text:
                now = self._clock()
                first, last, pieces = first or now, now, pieces + 1
                yield Chunk(text, None)
            if event.get("done"):
                reason = "length" if event.get("done_reason") == "length" else "stop"
                yield self._last(reason, event.get("prompt_eval_count"), event.get("eval_count"), pieces,
                                 start, first, last)
                return
        raise RemoteBadResponse(f"{self.name}: the stream ended before the answer did (no done event)")

    def _last(self, finish: str, prompt_tokens: int | None, completion_tokens: int | None, pieces: int,
              start: float, first: float, last: float) -> Chunk:
        """The closing chunk. Without usage from the server, the pieces streamed stand for the tokens."""
        end = self._clock()
        first = first or end
        generated = int(completion_tokens if completion_tokens is not None else pieces)
        decode = max(last - first, 0.0)
        timings = Timings(first - start, decode, 0.0, (generated - 1) / decode if decode > 0 else 0.0)
        usage = Usage(int(prompt_tokens or 0), generated)
        return Chunk("", None, finish_reason="length" if finish == "length" else "stop", usage=usage,
                     timings=timings, served_by=self.name)

    def _lines(self, path: str, body: dict[str, Any], deadline: float) -> Iterator[str]:
        """POST ``body`` and yield the response's lines. The deadline is checked at every piece received
        (so a trickle of bytes cannot outlast it) and bounds every wait for the next one."""
        left = deadline - self._clock()
        if left <= 0:
            raise RemoteTimeout(f"{self.name}: no time left before the deadline")
        timeout = httpx.Timeout(left, connect=min(left, 10.0))
        try:
            with self._client.stream("POST", self._url + path, json=body, timeout=timeout) as response:
                if response.status_code >= 400 or 300 <= response.status_code < 400:
                    response.read()
                    raise _status_error(self.name, response)
                pending = ""
                for piece in response.iter_text():
                    if self._clock() > deadline:
                        raise RemoteTimeout(f"{self.name}: the answer was still coming at the deadline")
                    pending += piece
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        yield line.rstrip("\r")
                if pending:
                    yield pending
        except httpx.TimeoutException:
            raise RemoteTimeout(f"{self.name}: no answer within {left:.0f} s") from None
        except httpx.ConnectError as e:
            raise RemoteUnavailable(f"{self.name}: cannot connect to {self._url} ({self._reason(e)})") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            raise RemoteBadResponse(f"{self.name}: the connection broke mid-answer ({self._reason(e)})") from None
        except httpx.HTTPError as e:
            raise RemoteUnavailable(f"{self.name}: {self._reason(e)}") from None

    def _reason(self, error: Exception) -> str:
        """An HTTP library's message, with the key cut out should it quote a header."""
        text = _reason(error)
        return text.replace(self._secret, "***") if self._secret else text

    def _json(self, data: str) -> dict[str, Any]:
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise RemoteBadResponse(f"{self.name}: the server sent something that is not JSON: {data[:80]!r}") \
                from None
        if not isinstance(event, dict):
            raise RemoteBadResponse(f"{self.name}: the server sent JSON that is not an object: {data[:80]!r}")
        return event


def _status_error(name: str, response: httpx.Response) -> RemoteError:
    status = response.status_code
    try:
        detail = _message(response.json())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        detail = response.text.strip()[:200] or response.reason_phrase
    message = f"{name}: HTTP {status}: {detail}"
    if status in (401, 403):
        return RemoteRejected(message + " (check the API key)", status)
    if status == 429 or status >= 500 or status == 408:
        return RemoteError(message, status)
    if 300 <= status < 400:
        where = response.headers.get("location", "elsewhere")
        return RemoteRejected(f"{name}: HTTP {status}: redirected to {where}; slm does not follow redirects "
                              "(they could carry the key to another host): set the final URL", status)
    if "context" in detail.lower() and ("length" in detail.lower() or "exceed" in detail.lower()):
        return RemoteContextExceeded(message, status)
    return RemoteRejected(message, status)


def _message(payload: Any) -> str:
    """The error message in an OpenAI-style ({"error": {"message"}}) or Ollama-style ({"error": "..."}) body."""
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or json.dumps(error)[:200]
    return str(error)[:300]


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return text[:200] if text else type(error).__name__
