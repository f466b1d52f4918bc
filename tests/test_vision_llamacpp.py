"""Images on llama.cpp through slm's own loop: a tiny random Gemma 3 VLM converted by slm (GGUF + mmproj),
checked against transformers' forward of the same weights."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import slm
import vision_checks
from slm.engines import media
from slm.errors import EngineError, InvalidParameter
from slm.generation.params import GenerationParams
from slm.model import Model
from vision_checks import last_logits, picture
from vision_models import converted_tiny_gemma3_vlm, tiny_gemma3_vlm

ASK = "Describe this:"


def conversation(image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": ASK}, {"type": "image", "image": image}]}]


@functools.cache
def model() -> Model:
    text, projector = converted_tiny_gemma3_vlm()
    assert projector.is_file()
    return slm.load(str(text), n_ctx=512)  # the mmproj beside it is found by its name


@functools.cache
def reference() -> tuple:
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    folder = tiny_gemma3_vlm()
    processor = AutoProcessor.from_pretrained(folder)
    hf = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return processor, hf


def hf_inputs(image: Image.Image) -> dict:
    processor, _ = reference()
    turn = [{"role": "user", "content": [{"type": "text", "text": ASK}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    # The template writes <bos> itself; the processor would add a second one.
    return dict(processor(text=prompt, images=[image], return_tensors="pt", add_special_tokens=False))


def test_the_prompt_holds_the_image_where_and_as_long_as_transformers_puts_it() -> None:
    tokens = model().chat_tokens(conversation(picture(0)))
    image_token = reference()[1].config.image_token_index
    assert [image_token if t < 0 else t for t in tokens] == hf_inputs(picture(0))["input_ids"][0].tolist()
    assert sum(t < 0 for t in tokens) == 16 and model().takes_images


def test_logits_after_an_image_match_transformers_and_attention_over_it_must_be_both_ways() -> None:
    image = picture(0)
    ours = last_logits(model(), model().chat_tokens(conversation(image)))
    inputs = hf_inputs(image)
    _, hf = reference()
    with torch.no_grad():
        theirs = hf(**inputs).logits[0, -1].numpy()
        # Negative control: the image read causally, as text is, is off by far more than the tolerance.
        causal = hf(**(inputs | {"token_type_ids": torch.zeros_like(inputs["token_type_ids"])})).logits[0, -1].numpy()
    vocab = len(ours)
    tolerance = 2e-3 * float(np.abs(theirs).max())
    assert float(np.abs(ours - theirs[:vocab]).max()) < tolerance
    assert float(np.abs(ours - causal[:vocab]).max()) > 10 * tolerance
    other = last_logits(model(), model().chat_tokens(conversation(picture(1))))
    assert float(np.abs(other - ours).max()) > 10 * tolerance  # the image's pixels matter


def test_greedy_answer_about_an_image_is_transformers_own() -> None:
    image = picture(2)
    ours = model().chat(conversation(image), temperature=0, max_tokens=8)
    inputs = hf_inputs(image)
    with torch.no_grad():
        out = reference()[1].generate(**inputs, max_new_tokens=8, do_sample=False)
    assert ours.tokens == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_the_same_image_keeps_its_number_and_is_encoded_once() -> None:
    m = model()
    first, again = m.chat_tokens(conversation(picture(3))), m.chat_tokens(conversation(picture(3)))
    assert first == again and first != m.chat_tokens(conversation(picture(4)))
    projector = m.engine._projector  # type: ignore[attr-defined]
    number = media.placeholder(next(t for t in first if t < 0))[0]
    last_logits(model(), first)
    encoded = projector._encoded[number]
    last_logits(model(), again)
    assert projector._encoded[number] is encoded


def test_a_chunk_that_splits_an_image_is_refused_by_the_engine() -> None:
    tokens = model().chat_tokens(conversation(picture(0)))
    inside = next(i for i, t in enumerate(tokens) if t < 0) + 3
    gen = model().generator(temperature=0)
    try:
        gen.append_tokens(tokens)
        with pytest.raises(EngineError, match="part of an image"):
            model().engine.evaluate([(gen.seq, tokens[:inside] + tokens[-1:])])
        assert model().engine.sequence_length(gen.seq) == 0  # left as it was
    finally:
        gen.close()


def test_images_to_a_text_only_model_are_refused_by_place() -> None:
    with slm.load("smollm2", n_ctx=512) as text_only:
        assert not text_only.takes_images
        with pytest.raises(InvalidParameter, match="does not take images") as caught:
            text_only.chat(conversation(picture(0)), max_tokens=2)
        assert caught.value.field == "messages[0].content[1]"


def test_a_bad_image_is_refused_before_anything_runs() -> None:
    broken = [{"role": "user", "content": [{"type": "text", "text": "x"},
                                           {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(InvalidParameter) as caught:
        model().chat(broken, max_tokens=2)
    assert caught.value.field == "messages[0].content[1]"
    assert model().chat(conversation(picture(0)), max_tokens=2).finish_reason == "length"


def test_two_images_in_one_message_each_take_their_place() -> None:
    two = [{"role": "user", "content": [{"type": "image", "image": picture(5)}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": picture(6)}]}]
    tokens = model().chat_tokens(two)
    images = [image for _, _, image in media.runs(tokens) if image is not None]
    assert len(images) == 2 and images[0] != images[1] and sum(t < 0 for t in tokens) == 32
    processor, hf = reference()
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=prompt, images=[picture(5), picture(6)], return_tensors="pt",
                            add_special_tokens=False))
    with torch.no_grad():
        theirs = hf(**inputs).logits[0, -1].numpy()
    ours = last_logits(model(), tokens)
    assert float(np.abs(ours - theirs[: len(ours)]).max()) < 2e-3 * float(np.abs(theirs).max())


def test_the_scheduler_reads_an_image_whole_in_small_chunks_beside_a_text_stream() -> None:
    m = model()
    tokens = m.chat_tokens(conversation(picture(7)))
    params = GenerationParams(temperature=0, max_tokens=6)
    alone = m.chat(conversation(picture(7)), params).tokens
    text_params = GenerationParams(temperature=0, max_tokens=20)
    text, image = vision_checks.beside_text(m, tokens, params, 4, text_params)  # 4 < an image's 16 positions
    assert image == alone and text == vision_checks.alone(m, text_params)
