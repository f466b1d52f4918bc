"""Phi-3.5-vision on the transformers engine, through slm's own loop: the tiny random checkpoint
(``tests/phi3v_models.py``) loaded by ``slm.load`` and checked against the published model's forward as
``slm.engines.phi3v`` composes it (the published processor's ids, image rows in place of the ``-N`` ids)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import slm
from phi3v_models import tiny_phi3v
from slm.engines import media, phi3v
from slm.engines.phi3v_processor import prompt_ids
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk
from slm.model import Model
from slm.serving.scheduler import Scheduler

ASK = "Describe this:"


def picture(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, width * height * 3, dtype=np.uint8)
    return Image.frombytes("RGB", (width, height), pixels.tobytes())


def conversation(*images: Image.Image, text: str = ASK) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": text}]}]


@functools.cache
def model() -> Model:
    return slm.load(str(tiny_phi3v()), engine="transformers", n_ctx=4096)


@functools.cache
def reference() -> tuple:
    """(tokenizer, Phi3ForCausalLM, encoder) as the composition loads them, apart from the engine's."""
    return phi3v.load(tiny_phi3v())


def published(images: list[Image.Image], text: str = ASK) -> tuple[list[int], torch.Tensor]:
    """The published processor's ids for the model card's prompt (``<|image_N|>\\n`` before the text), and
    the published forward's ``inputs_embeds`` for them."""
    tokenizer, text_model, encoder = reference()
    tags = "".join(f"<|image_{n}|>\n" for n in range(1, len(images) + 1))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": tags + text}], tokenize=False,
                                           add_generation_prompt=True)
    decoded = [media.load(i) for i in images]
    ids = prompt_ids(tokenizer, prompt, decoded, encoder.processor.num_crops)
    return ids, phi3v.prompt_embeddings(text_model, encoder, ids, decoded)


def as_published(tokens: list[int]) -> list[int]:
    """slm's placeholder ids written as the published processor writes them: the k-th image's as ``-k``."""
    numbers = [image for _, _, image in media.runs(tokens) if image is not None]
    return [t if t >= 0 else -(numbers.index(media.placeholder(t)[0]) + 1) for t in tokens]


@pytest.mark.parametrize("size", [(500, 300), (336, 336), (300, 900)])
def test_the_prompt_is_the_published_processors(size: tuple[int, int]) -> None:
    image = picture(*size, seed=1)
    m = model()
    assert m.takes_images
    ours = m.chat_tokens(conversation(image))
    ids, _ = published([image])
    assert as_published(ours) == ids
    assert sum(t < 0 for t in ours) == reference()[2].positions(media.load(image))


def last_logits(tokens: list[int]) -> np.ndarray:
    engine = model().engine
    seq = engine.new_sequence()
    try:
        return engine.evaluate([(seq, tokens)])[0]
    finally:
        engine.free(seq)


@pytest.mark.parametrize("count", [1, 2])
def test_logits_after_images_are_the_published_forwards(count: int) -> None:
    images = [picture(500, 300, seed=2), picture(200, 640, seed=3)][:count]
    _, embeds = published(images)
    with torch.inference_mode():
        expected = reference()[1](inputs_embeds=embeds).logits[0, -1].numpy()
    got = last_logits(model().chat_tokens(conversation(*images)))
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= 1e-4 * scale
    # The other image's rows in its place change the answer: the image is read, not ignored
    other = last_logits(model().chat_tokens(conversation(picture(500, 300, seed=9), *images[1:])))
    assert float(np.abs(other - expected).max()) > 100 * 1e-4 * scale


def test_greedy_answer_is_the_published_models_own() -> None:
    image = picture(640, 480, seed=4)
    _, text_model, _ = reference()
    _, embeds = published([image])
    ends = sorted(model().info.special.end_of_generation)  # banned on both sides: 8 tokens each
    with torch.inference_mode():
        expected = text_model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False,
                                       suppress_tokens=ends)[0].tolist()
    params = GenerationParams(temperature=0, max_tokens=8, logit_bias=dict.fromkeys(ends, -100.0))
    assert model().chat(conversation(image), params).tokens == expected


def test_an_image_prompt_in_small_chunks_beside_a_text_stream_answers_as_alone() -> None:
    m = model()
    params = GenerationParams(temperature=0, max_tokens=6)
    image_tokens = m.chat_tokens(conversation(picture(336, 336, seed=5)))
    alone = m.generate(image_tokens, params).tokens
    text = m.chat_tokens([{"role": "user", "content": "Count to ten"}])
    text_alone = m.generate(text, params).tokens
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def sink(i: int) -> Callable[[Chunk], None]:
        return lambda chunk: got[i].extend([chunk.token] if chunk.token is not None else [])

    scheduler = Scheduler(m.engine, max_batch_tokens=64, prefix_cache_bytes=0)  # an image is 757 positions
    try:
        scheduler.submit(text, params, sink(0), errors.append)
        scheduler.submit(image_tokens, params, sink(1), errors.append)
        steps = 0
        while scheduler.step():
            steps += 1
            assert steps < 200
    finally:
        scheduler.stop(timeout=60)
    assert not errors and got == [text_alone, alone]
