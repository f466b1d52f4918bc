"""Qwen2.5-VL on slm's engines, checked the same way on each: the tiny random checkpoint
(``tests/vision_models.py``) read by transformers' ``Qwen2_5_VLForConditionalGeneration`` on Qwen2VLProcessor's
inputs is the reference; the conversation both sides are given has text after the image, so M-RoPE positions
past it are checked; and the checks of an engine's sequences (batched rows, rewind, fork, save, restore)
that each engine's test runs with its own tolerance."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from slm.generation.params import GenerationParams
from slm.model import Model
from vision_checks import alone, beside_text, last_logits, picture
from vision_models import tiny_qwen2_5_vl

ASK, AFTER = "Describe this:", " in a few words, please."
SIZES = [(112, 112), (168, 112)]
"""A square image (4 x 4 merged patches) and a wide one (6 x 4): multiples of 28 px, so none is resized."""


def conversation(image: Image.Image, after: str = AFTER) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": ASK}, {"type": "image", "image": image},
                                         {"type": "text", "text": after}]}]


@functools.cache
def reference() -> tuple:
    """(Qwen2VLProcessor, Qwen2_5_VLForConditionalGeneration) of the tiny checkpoint."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    class ImagesOnly(Qwen2VLProcessor):  # no video processor: its class needs torchvision, absent here
        def check_argument_for_proper_class(self, argument_name: str, argument: object) -> None:
            return None

    folder = tiny_qwen2_5_vl()
    processor = ImagesOnly(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
                           tokenizer=AutoTokenizer.from_pretrained(folder))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return processor, hf


def hf_inputs(image: Image.Image, after: str = AFTER) -> dict:
    """Qwen2VLProcessor's inputs for the prompt its chat template writes for ``conversation(image)``."""
    processor, _ = reference()
    text = f"{ASK}<|vision_start|><|image_pad|><|vision_end|>{after}"
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
    return dict(processor(text=prompt, images=[image], return_tensors="pt"))


def within(ours: np.ndarray, theirs: np.ndarray, tolerance: float = 1e-4) -> float:
    """How far ours are from theirs, in units of the tolerance (a share of their largest logit)."""
    return float(np.abs(ours - theirs[: len(ours)]).max()) / (tolerance * float(np.abs(theirs).max()))


def hf_last(inputs: dict) -> np.ndarray:
    with torch.no_grad():
        logits: np.ndarray = reference()[1](**inputs).logits[0, -1].numpy()
    return logits


# --- checks both engines' tests run, each with its own tolerance ----------------------------------------

Close = Callable[[np.ndarray, np.ndarray], bool]
"""Whether an engine's logits equal the same engine's logits of a fresh run (its tolerance)."""


def greedy_alone_and_beside_text(m: Model) -> None:
    """The greedy answer about an image is transformers' ``generate()``, alone and stepped beside a text
    request through a scheduler reading 4 (the image whole, in a chunk of its own) or 64 prompt tokens a step."""
    image = picture(3, 168, 112)
    inputs = hf_inputs(image)
    with torch.no_grad():
        out = reference()[1].generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
    params = GenerationParams(temperature=0, max_tokens=8)
    assert m.chat(conversation(image), params).tokens == theirs
    text_params = GenerationParams(temperature=0, max_tokens=20)
    for chunk in (4, 64):
        got = beside_text(m, m.chat_tokens(conversation(image)), params, chunk, text_params)
        assert got == (alone(m, text_params), theirs)


def batched_rows_equal_each_alone(m: Model, close: Close) -> None:
    """One batch of a prompt with an image, a text prompt and a prompt with two images of different grids:
    each row's logits are its prompt's alone."""
    two = [{"role": "user", "content": [{"type": "image", "image": picture(4)}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": picture(5, 168, 112)},
                                        {"type": "text", "text": "which is larger?"}]}]
    prompts = [m.chat_tokens(conversation(picture(6, 168, 112))), m.chat_tokens([{"role": "user", "content": "Hi"}]),
               m.chat_tokens(two)]
    each = [last_logits(m, tokens) for tokens in prompts]
    seqs = [m.engine.new_sequence() for _ in prompts]
    try:
        batched = m.engine.evaluate(list(zip(seqs, prompts, strict=True)))
    finally:
        for seq in seqs:
            m.engine.free(seq)
    for one, row in zip(each, batched, strict=True):
        assert close(row, one)


def continued(m: Model, seq: int, more: list[int]) -> np.ndarray:
    return m.engine.evaluate([(seq, more)])[0]


def rewound_after_and_before_an_image(m: Model, seq: int, close: Close) -> list[int]:
    """Evaluate a prompt with an image into ``seq`` (new), rewind it into the text after the image and go on,
    then to just before the image and go on with another image of another grid: each as a fresh run. Returns
    the prompt ``seq`` then holds."""
    tokens = m.chat_tokens(conversation(picture(7, 168, 112)))
    image = [i for i, t in enumerate(tokens) if t < 0]
    other = m.chat_tokens(conversation(picture(8), after=" briefly"))
    more = m.tokenize(" and its colours?", False)
    m.engine.evaluate([(seq, tokens)])
    cut = image[-1] + 4
    m.engine.rewind(seq, cut)
    assert close(continued(m, seq, more), last_logits(m, tokens[:cut] + more))
    m.engine.rewind(seq, image[0])  # its <|vision_start|> stays
    assert close(continued(m, seq, other[image[0] :]), last_logits(m, other))
    return other


def fork_save_and_restore_keep_the_positions_past_an_image(m: Model, close: Close) -> None:
    engine = m.engine
    tokens = m.chat_tokens(conversation(picture(9, 168, 112)))
    more = m.tokenize(" and its colours?", False)
    fresh = last_logits(m, tokens + more)
    seq = engine.new_sequence()
    try:
        engine.evaluate([(seq, tokens)])
        fork = engine.fork(seq)
        saved = engine.save(seq)
        assert close(continued(m, seq, more), fresh)  # the parent goes on; the fork and the save do not move
        assert close(continued(m, fork, more), fresh)
        engine.free(fork)
        restored = engine.restore(saved)
        assert close(continued(m, restored, more), fresh)
        engine.free(restored)
    finally:
        engine.free(seq)
