"""What the image tests of every engine share: random pictures, the logits after a prompt, and requests
stepped together through a scheduler."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk
from slm.model import Model
from slm.serving.scheduler import Scheduler


def picture(seed: int, width: int = 224, height: int | None = None) -> Image.Image:
    """Random pixels (square unless ``height`` is given): at a model's own image size, no side resizes them."""
    height = width if height is None else height
    pixels = np.random.default_rng(seed).integers(0, 256, width * height * 3, dtype=np.uint8)
    return Image.frombytes("RGB", (width, height), pixels.tobytes())


def last_logits(model: Model, tokens: list[int]) -> np.ndarray:
    """The engine's logits after ``tokens`` evaluated in one call on a new sequence, freed after. (V,)"""
    engine = model.engine
    seq = engine.new_sequence()
    try:
        return engine.evaluate([(seq, tokens)])[0]
    finally:
        engine.free(seq)


def run_together(scheduler: Scheduler, requests: list[tuple[list[int], GenerationParams]]) -> list[list[int]]:
    """Every request submitted at once and stepped to the end; each one's tokens (no request may fail)."""
    got: list[list[int]] = [[] for _ in requests]
    errors: list[BaseException] = []

    def sink(i: int) -> Callable[[Chunk], None]:
        return lambda chunk: got[i].extend([chunk.token] if chunk.token is not None else [])

    for i, (tokens, params) in enumerate(requests):
        scheduler.submit(tokens, params, sink(i), errors.append)
    steps = 0
    while scheduler.step():
        steps += 1
        assert steps < 500
    assert not errors
    return got


def beside_text(model: Model, tokens: list[int], params: GenerationParams, max_batch_tokens: int,
                text_params: GenerationParams | None = None) -> tuple[list[int], list[int]]:
    """The answers of a text request ("Count to ten") and of the prompt ``tokens``, stepped together through a
    scheduler that reads at most ``max_batch_tokens`` prompt tokens a step (and keeps no prefix cache)."""
    text = model.chat_tokens([{"role": "user", "content": "Count to ten"}])
    scheduler = Scheduler(model.engine, max_batch_tokens=max_batch_tokens, prefix_cache_bytes=0)
    try:
        text_answer, answer = run_together(scheduler, [(text, text_params or params), (tokens, params)])
    finally:
        scheduler.stop(timeout=60)
    return text_answer, answer


def alone(model: Model, params: GenerationParams) -> list[int]:
    """The text request of ``beside_text`` answered on its own."""
    return model.generate(model.chat_tokens([{"role": "user", "content": "Count to ten"}]), params).tokens


def after_a_prefix_hit(model: Model, first: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """The greedy answers to ``first`` and to it continued by a turn each way, through a scheduler with a
    prefix cache (the second must start from the first's cache, past its image), and each answered alone."""
    longer = first + [{"role": "assistant", "content": "Noise."}, {"role": "user", "content": "And now?"}]
    params = GenerationParams(temperature=0, max_tokens=6)
    alone = [model.chat(first, params).tokens, model.chat(longer, params).tokens]
    scheduler = Scheduler(model.engine, max_batch_tokens=64)
    try:
        got = [*run_together(scheduler, [(model.chat_tokens(first), params)]),
               *run_together(scheduler, [(model.chat_tokens(longer), params)])]
        assert scheduler.cache.hits == 1
    finally:
        scheduler.stop(timeout=60)
    return got, alone
