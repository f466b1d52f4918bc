"""Images on ONNX Runtime GenAI: ``phi3v`` folders (Phi-3/3.5-vision), through ONNX Runtime GenAI's own
multimodal pipeline.

A phi3v folder holds three models that ``genai_config.json`` names: ``vision`` (pixel_values, image_sizes
-> image_features), ``embedding`` (input_ids, image_features -> inputs_embeds) and ``decoder``
(inputs_embeds, KV cache -> logits). Its image positions are negative ids: ``-k`` for the prompt's k-th
image, as many as ONNX Runtime GenAI's processor counts for it (``num_image_tokens``).

Why the images go through ``og.Generator.set_inputs`` and not through slm's own runs of the vision model:
ONNX Runtime GenAI runs the vision model only in a Generator's first run, the "prompt stage"
(``MultiModalPipelineState::Run`` in its ``src/models/multi_modal.cpp``), on the ``pixel_values`` given
to ``set_inputs`` before it; every later run feeds the embedding model zero image features. Checked on
0.18: ``set_inputs`` with an image on a Generator that has run text fails in the embedding model (a
Gather over an empty image_features). Its decoder takes ``inputs_embeds`` from the embedding model only,
and no input of a Generator takes embeddings, so features computed outside cannot be fed in either. And
``rewind_to`` raises "RewindTo is currently not supported for phi3v".

So slm's engine runs a chunk that holds an image, with every token the sequence already holds, as the
first run of a new Generator (the images of the whole sequence given to ``set_inputs``); a rewind drops the
Generator and the next chunk is run the same way; chunks of text are appended to the sequence's Generator
as for a text model, and their logits are the decoder's raw output. A prefill that puts text before an
image in an earlier chunk is thus computed again from the start, and an image is encoded again by every
Generator that reads it (ONNX Runtime GenAI keeps no image features between Generators).

ONNX Runtime GenAI's phi3v processor (onnxruntime-extensions' ``Phi3ImageTransform``) always cuts an
image into at most 16 crops (its ``max_crops``, whatever ``num_crops`` the processor config says), so
its count of image tokens is the published processor's with ``num_crops=16``.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime_genai as og

from slm.engines import media
from slm.engines.registry import ONNX_IMAGE_TYPES
from slm.errors import EngineError, InvalidModelFile, InvalidParameter

IMAGE_TYPES = ONNX_IMAGE_TYPES
"""The multimodal folder types slm drives."""
OTHER_MULTIMODAL = ("gemma3", "gemma4", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe", "fara", "mistral3",
                    "phi4mm", "videochat_flash_qwen", "whisper")
"""Folder types ONNX Runtime GenAI runs with more than a decoder, which slm does not drive yet."""
HELD_IMAGES = 64
"""Images an engine keeps (a prompt that refers to one dropped since is refused)."""
MARKER = "<|image|>"


def check_type(model_type: str, where: str) -> None:
    """Refuse, by name, a multimodal folder type slm does not drive."""
    if model_type in OTHER_MULTIMODAL:
        raise InvalidModelFile(f"{where} is an ONNX Runtime GenAI '{model_type}' folder, which slm does not drive "
                               f"yet (it drives text models and {', '.join(IMAGE_TYPES)})")


@dataclass(frozen=True)
class _Held:
    png: bytes
    """The image, encoded losslessly for ``og.Images.open_bytes``."""
    count: int
    """Its positions in a prompt."""


class Phi3VImages:
    """The images of one phi3v engine: each gets a number (its placeholder ids, ``media``), its count of
    positions from ONNX Runtime GenAI's processor, and is handed back to that processor for every
    Generator whose first run holds it."""

    marker = MARKER

    def __init__(self, model: Any) -> None:
        try:
            self._processor = model.create_multimodal_processor()
        except Exception as e:  # onnxruntime_genai raises plain exceptions
            raise InvalidModelFile(f"ONNX Runtime GenAI could not make this folder's image processor: {e}") from None
        self._next = 0
        self._numbers: dict[str, int] = {}  # image digest -> its number
        self._held: OrderedDict[int, _Held] = OrderedDict()

    def tokenize(self, text: str, images: Sequence[media.Image], encode: Callable[[str, bool], list[int]],
                 add_special: bool) -> list[int]:
        """Ids of ``text``, each ``marker`` replaced by the next image's placeholder ids. As Phi-3-vision's
        processor (and ONNX Runtime GenAI's) does, each piece of text between images is tokenized on its own
        with the tokenizer's special tokens (``encode(piece, True)``: a BOS after each image, for Phi-3's
        tokenizer); the first, with them if ``add_special``. Each image is followed by a newline, as the prompts
        Phi-3-vision was taught with write ``<|image_1|>\n`` (the transformers engine's ``phi3v`` does the same)."""
        pieces = text.split(self.marker)
        if len(pieces) - 1 != len(images):
            raise InvalidParameter("images", f"{len(images)} images for {len(pieces) - 1} places for them")
        ids = encode(pieces[0], add_special)
        for image, piece in zip(images, pieces[1:], strict=True):
            number = self._hold(image)
            ids.extend(media.placeholders(number, self._held[number].count))
            ids.extend(encode("\n" + piece, True))
        return ids

    def _hold(self, image: media.Image) -> int:
        number = self._numbers.get(image.digest)
        if number is not None and number in self._held:
            self._held.move_to_end(number)
            return number
        png = _png(image)
        count = int(self._process([png])["num_image_tokens"].as_numpy().reshape(-1)[0])
        number = self._numbers[image.digest] = self._next
        self._next += 1
        self._held[number] = _Held(png, count)
        while len(self._held) > HELD_IMAGES:
            self._held.popitem(last=False)
        return number

    def _process(self, pngs: list[bytes]) -> Any:
        tags = "".join(f"<|image_{k + 1}|>" for k in range(len(pngs)))
        try:
            return self._processor(tags, images=og.Images.open_bytes(*pngs))
        except Exception as e:
            raise EngineError(f"ONNX Runtime GenAI's image processor failed: {e}") from None

    def inputs(self, tokens: Sequence[int]) -> Any:
        """The named inputs of a Generator's first run over ``tokens``: its ids (the k-th image's run as
        ``-k``), and the pixels of its images, in order, from ONNX Runtime GenAI's processor. Each image must
        be whole (EngineError otherwise)."""
        ids = np.asarray(tokens, dtype=np.int32)
        pngs: list[bytes] = []
        for start, end, number in media.runs(tokens):
            if number is None:
                continue
            held = self._held.get(number)
            if held is None:
                raise EngineError("the prompt refers to an image this engine no longer holds; send the image again")
            if list(tokens[start:end]) != media.placeholders(number, held.count):
                raise EngineError("a chunk of a prompt holds only part of an image")
            pngs.append(held.png)
            ids[start:end] = -len(pngs)
        named = self._process(pngs)
        counts = named["num_image_tokens"].as_numpy().reshape(-1)
        if int(counts.sum()) != int((ids < 0).sum()):  # the processor must count as it did for each image
            raise EngineError(f"ONNX Runtime GenAI's processor counted {counts.tolist()} image positions, "
                              f"the prompt holds {int((ids < 0).sum())}")
        named["input_ids"] = ids.reshape(1, -1)
        return named


def _png(image: media.Image) -> bytes:
    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.frombytes("RGB", (image.width, image.height), image.rgb).save(out, format="PNG", compress_level=1)
    return out.getvalue()
