"""From a step generator to text: deltas, stop strings, finish reason, usage and timings.

``stream`` is the streaming layer (text deltas as they become final); ``complete`` is the one-shot
layer, a few lines on top of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from slm.engines.base import Engine
from slm.errors import ContextOverflow
from slm.generation.detokenizer import StopMatcher, StreamingDetokenizer
from slm.generation.generator import Generator, TokenLogprob
from slm.generation.params import GenerationParams


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

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


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


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
        )
    room = context - (params.max_tokens or 1) - keep_first
    if room <= 0:
        raise ContextOverflow(
            "max_tokens", f"{params.max_tokens} leaves no room for the prompt in a context of {context}"
        )
    return list(prompt[:keep_first]) + list(prompt[len(prompt) - room :])


def stream(engine: Engine, prompt: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
    """Generate from ``prompt``, yielding a chunk per token; the last one has the finish reason,
    usage and timings. Stopping the iteration early frees the sequence."""
    start = time.perf_counter()
    detok = StreamingDetokenizer(engine.token_bytes)
    stops = StopMatcher(params.stop)
    end_of_generation = engine.info.special.end_of_generation
    with Generator(engine, params) as gen:
        gen.append_tokens(prompt)
        first = last = start
        while not gen.is_done():
            token = gen.generate_next_token()
            last = time.perf_counter()
            if gen.generated == 1:
                first = last
            # An end-of-turn token ends the text; it is not part of it.
            piece = "" if token in end_of_generation else detok.add(token)
            if gen.is_done():
                piece += detok.flush()
            text = stops.feed(piece)
            if stops.stopped:
                gen.finish_reason = "stop"
            elif gen.is_done():
                text += stops.flush()
            if gen.is_done():
                assert gen.finish_reason is not None
                yield Chunk(text, token, gen.last_logprob, gen.finish_reason,
                            Usage(len(prompt), gen.generated),
                            _timings(start, first, last, len(prompt), gen.generated))
            else:
                yield Chunk(text, token, gen.last_logprob)


def complete(engine: Engine, prompt: Sequence[int], params: GenerationParams) -> Completion:
    """Generate to the end and return the whole text."""
    return collect(stream(engine, prompt, params))


def collect(chunks: Iterable[Chunk], on_chunk: Callable[[Chunk], None] | None = None) -> Completion:
    """Join a stream into a completion, handing each chunk to ``on_chunk`` as it arrives."""
    parts: list[str] = []
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    for chunk in chunks:
        if on_chunk is not None:
            on_chunk(chunk)
        parts.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if chunk.logprob is not None:
            logprobs.append(chunk.logprob)
        if chunk.finish_reason is not None:
            assert chunk.usage is not None and chunk.timings is not None
            return Completion("".join(parts), chunk.finish_reason, chunk.usage, chunk.timings, tokens, logprobs)
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
