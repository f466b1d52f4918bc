"""Phi-3.5-vision on the transformers engine, through slm's own loop: the tiny random checkpoint
(``tests/phi3v_models.py``) loaded by ``slm.load`` and checked against the published model's forward as
``slm.engines.phi3v`` composes it (the published processor's ids, image rows in place of the ``-N`` ids)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import slm
import vision_checks
from phi3v_models import tiny_phi3v
from slm.engines import media, phi3v
from slm.engines.phi3v_processor import prompt_ids
from slm.generation.params import GenerationParams
from slm.model import Model
from vision_checks import last_logits, picture

ASK = "Describe this:"


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
    image = picture(1, *size)
    m = model()
    assert m.takes_images
    ours = m.chat_tokens(conversation(image))
    ids, _ = published([image])
    assert as_published(ours) == ids
    assert sum(t < 0 for t in ours) == reference()[2].positions(media.load(image))


@pytest.mark.parametrize("count", [1, 2])
def test_logits_after_images_are_the_published_forwards(count: int) -> None:
    images = [picture(2, 500, 300), picture(3, 200, 640)][:count]
    _, embeds = published(images)
    with torch.inference_mode():
        expected = reference()[1](inputs_embeds=embeds).logits[0, -1].numpy()
    got = last_logits(model(), model().chat_tokens(conversation(*images)))
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= 1e-4 * scale
    # The other image's rows in its place change the answer: the image is read, not ignored
    other = last_logits(model(), model().chat_tokens(conversation(picture(9, 500, 300), *images[1:])))
    assert float(np.abs(other - expected).max()) > 100 * 1e-4 * scale


def test_greedy_answer_is_the_published_models_own() -> None:
    image = picture(4, 640, 480)
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
    image_tokens = m.chat_tokens(conversation(picture(5, 336, 336)))
    alone = m.generate(image_tokens, params).tokens
    got = vision_checks.beside_text(m, image_tokens, params, 64)  # an image is 757 positions: read whole
    assert got == (vision_checks.alone(m, params), alone)
