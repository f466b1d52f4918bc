"""Qwen2.5-VL's reference for slm's engines: the tiny random checkpoint (``tests/vision_models.py``) read by
transformers' ``Qwen2_5_VLForConditionalGeneration`` on Qwen2VLProcessor's inputs, and the conversation both
sides are given (text after the image, so M-RoPE positions past it are checked)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

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
