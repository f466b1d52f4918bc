"""From a step generator to text: deltas, stop strings, finish reason, usage and timings.

``stream`` is the streaming layer (text deltas as they become final); ``complete`` is the one-shot
layer, a few lines on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from slm.engines.base import Engine, ModelInfo
from slm.errors import ContextOverflow
from slm.generation.detokenizer import StopMatcher, StreamingDetokenizer
from slm.generation.generator import Generator, TokenLogprob
from slm.generation.params import GenerationParams
from slm.generation.speculative import Proposer, Stats
from slm.generation.tool_use import ToolCall


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV cache was reused from an earlier request (not computed again)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    time_to_first_token: float
    """Seconds from the call to the first sampled token (reading the prompt included)."""
    decode_seconds: float
    """Seconds from the first to the last token."""
    prompt_tokens_per_second: float
    decode_tokens_per_second: float
    draft_tokens: int = 0
    """With speculative decoding: tokens drafted and checked."""
    draft_tokens_accepted: int = 0
    """Of those, the ones the model kept."""


@dataclass
class Chunk:
    """One step of a stream: the text that became final, and the token it came from."""

    text: str
    token: int | None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    """Set on the last chunk: "stop" (end of turn or a stop string) or "length"."""
    usage: Usage | None = None
    timings: Timings | None = None
    served_by: str | None = None
    """On the last chunk of a remote or routed model: the model that answered (``provider:model``)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tool calls the text up to here completed (their text is not in ``text``)."""
    stop_sequence: str | None = None
    """On the last chunk, when a stop string ended the text: which one (Anthropic's ``stop_sequence``)."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    served_by: str | None = None
    """For a remote or routed model: the model that answered (``provider:model``, or a local name)."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The tools the model called (``finish_reason`` is then "tool_calls")."""
    stop_sequence: str | None = None
    """The stop string that ended the text, if one did."""
    parsed: Any = None
    """With a JSON ``response_format``: the answer parsed (a pydantic model's instance when one was asked
    for); None when the answer did not finish."""


def fit_prompt(prompt: Sequence[int], params: GenerationParams, context: int, keep_first: int = 0) -> list[int]:
    """Check that the prompt and the tokens asked for fit the context. If they do not, fail, or with
    ``params.truncate`` drop the oldest prompt tokens (after the first ``keep_first``, e.g. BOS)."""
    wanted = len(prompt) + (params.max_tokens or 1)
    if wanted <= context:
        return list(prompt)
    if not params.truncate:
        asked = f" + max_tokens {params.max_tokens}" if params.max_tokens else ""
        raise ContextOverflow(
            "prompt",
            f"{len(prompt)} prompt tokens{asked} exceed the context of {context} tokens "
            "(shorten the prompt, lower max_tokens, load with a larger context, or ask for truncation)",
            len(prompt), context,
        )
    room = context - (params.max_tokens or 1) - keep_first
    if room <= 0:
        raise ContextOverflow(
            "max_tokens", f"{params.max_tokens} leaves no room for the prompt in a context of {context}",
            len(prompt), context,
        )
    return list(prompt[:keep_first]) + list(prompt[len(prompt) - room :])


def fit_to_context(info: ModelInfo, prompt: Sequence[int], params: GenerationParams) -> list[int]:
    """``fit_prompt`` for a model's context; a leading BOS is kept when older tokens are dropped."""
    bos = info.special.bos_id
    keep = 1 if prompt and bos is not None and prompt[0] == bos else 0
    return fit_prompt(prompt, params, info.context_length, keep_first=keep)


class TextStream:
    """The text side of one generation: turns each new token into a chunk (detokenizing, cutting at
    stop strings, keeping time). ``stream`` drives it for one sequence; the scheduler for many."""

    def __init__(self, engine: Engine, params: GenerationParams, prompt_tokens: int, cached_tokens: int = 0) -> None:
        self.start = self.first = self.last = time.perf_counter()
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self._detok = StreamingDetokenizer(engine.token_bytes)
        self._stops = StopMatcher(params.stop)
        self._end_of_generation = engine.info.special.end_of_generation

    def push(self, gen: Generator) -> list[Chunk]:
        """The chunks for the tokens ``gen``'s last step added (``step_tokens``: one, or with a draft several);
        a stop string ends ``gen`` there, and what the step added after it is taken back."""
        self.last = time.perf_counter()
        tokens, logprobs = gen.step_tokens, gen.step_logprobs
        chunks = []
        for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            later = len(tokens) - 1 - i  # tokens of this step after this one
            chunk = self._chunk(token, logprob, gen.generated - later, gen.finish_reason if not later else None,
                                gen.speculation)
            chunks.append(chunk)
            if chunk.finish_reason is not None:
                if later:  # a stop string inside the step: forget the tokens after it
                    gen.rewind_to(len(gen.tokens) - later)
                gen.finish_reason = chunk.finish_reason
                break
        return chunks

    def _chunk(self, token: int, logprob: TokenLogprob | None, generated: int, finish: str | None,
               speculation: Stats) -> Chunk:
        """The chunk for the ``generated``-th token, ``finish``: why the generation ends after it, if it does."""
        if generated == 1:
            self.first = self.last
        # An end-of-turn token ends the text; it is not part of it.
        piece = "" if token in self._end_of_generation else self._detok.add(token)
        if finish is not None:
            piece += self._detok.flush()
        text = self._stops.feed(piece)
        if self._stops.stopped:
            finish = "stop"
        elif finish is not None:
            text += self._stops.flush()
        if finish is None:
            return Chunk(text, token, logprob)
        usage = Usage(self.prompt_tokens, generated, self.cached_tokens)
        timings = replace(_timings(self.start, self.first, self.last, self.prompt_tokens, generated),
                          draft_tokens=speculation.proposed, draft_tokens_accepted=speculation.accepted)
        return Chunk(text, token, logprob, finish, usage, timings, stop_sequence=self._stops.matched)


def stream(engine: Engine, prompt: Sequence[int], params: GenerationParams,
           proposer: Proposer | None = None) -> Iterator[Chunk]:
    """Generate from ``prompt`` (speculatively with ``proposer``), yielding a chunk per token; the last one
    has the finish reason, usage and timings. Stopping the iteration early frees the sequence."""
    text = TextStream(engine, params, len(prompt))
    with Generator(engine, params, proposer=proposer) as gen:
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
            yield from text.push(gen)


def complete(engine: Engine, prompt: Sequence[int], params: GenerationParams) -> Completion:
    """Generate to the end and return the whole text."""
    return collect(stream(engine, prompt, params))


def collect(chunks: Iterable[Chunk], on_chunk: Callable[[Chunk], None] | None = None) -> Completion:
    """Join a stream into a completion, handing each chunk to ``on_chunk`` as it arrives."""
    parts: list[str] = []
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    calls: list[ToolCall] = []
    for chunk in chunks:
        if on_chunk is not None:
            on_chunk(chunk)
        parts.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if chunk.logprob is not None:
            logprobs.append(chunk.logprob)
        calls.extend(chunk.tool_calls)
        if chunk.finish_reason is not None:
            assert chunk.usage is not None and chunk.timings is not None
            return Completion("".join(parts), chunk.finish_reason, chunk.usage, chunk.timings, tokens, logprobs,
                              chunk.served_by, calls, stop_sequence=chunk.stop_sequence)
    raise AssertionError("a stream always ends with a finish reason")


def _timings(start: float, first: float, last: float, prompt_tokens: int, generated: int) -> Timings:
    ttft = first - start
    decode = last - first
    return Timings(
        time_to_first_token=ttft,
        decode_seconds=decode,
        prompt_tokens_per_second=prompt_tokens / ttft if ttft > 0 else 0.0,
        decode_tokens_per_second=(generated - 1) / decode if decode > 0 else 0.0,
    )
