"""Images on the transformers engine: a vision-language model's image side, in front of its text decoder.

A VLM folder loads as three parts (``load_vision``): its tokenizer, a causal LM the engine drives as it
drives any other (keys and values in its own batch buffers), and an ``ImageEncoder`` that turns an image
into rows of the decoder's input-embedding space. A prompt's image is a run of placeholder ids
(``media``); when a step holds one, the engine feeds the decoder embeddings instead of ids, the image's
positions taking the encoder's rows. ``Images`` keeps each image by the engine's number for it and its
rows once computed, so a repeated image is encoded once.

Which encoder a folder gets is read from its ``config.json`` ``model_type``: Gemma 3, LLaVA, Idefics3,
SmolVLM and Qwen2.5-VL (whose images take M-RoPE grid positions, ``GridPositions``) through transformers'
own classes (``engines/vision_native.py``), Phi-3.5-vision through slm's composition (``engines/phi3v.py``).
A VLM this engine does not drive is refused by name; a text-only model gets None.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from slm.engines import media
from slm.engines.registry import VISION_LOADERS
from slm.errors import EngineError, InvalidModelFile, InvalidParameter

HELD_IMAGES = 16
"""Images of tokenized prompts an engine keeps until it encodes them (a prompt that refers to one dropped
since is refused: send the image again)."""
ENCODED_IMAGES = 16
"""Images whose encoder rows an engine keeps (a Gemma 3 4B image's are 2.6 MB)."""


class ImageEncoder(Protocol):
    """A vision-language model's image side, in front of the text decoder the transformers engine drives."""

    bidirectional: bool
    """Positions of one image attend to each other both ways (Gemma 3); else causally, as text does."""

    def around(self) -> tuple[str, str]:
        """Text the model's own processor writes before and after an image's positions (Gemma 3:
        ``"\\n\\n<start_of_image>"``, ``"<end_of_image>\\n\\n"``)."""
        ...

    def positions(self, image: media.Image) -> int:
        """How many positions this image takes in the prompt."""
        ...

    def encode(self, image: media.Image) -> torch.Tensor:
        """(positions(image), hidden) float32 in the text decoder's input-embedding space: what replaces
        those positions' token embeddings."""
        ...


@runtime_checkable
class GridPositions(Protocol):
    """What an ``ImageEncoder`` of a model with M-RoPE (Qwen2.5-VL) also has: each image position's rotary
    position is three numbers (temporal, height, width) laid out by the image's patch grid, and the text after
    the image goes on from the largest of them plus one. Encoders without it give sequential positions."""

    def grid_positions(self, image: media.Image) -> torch.Tensor:
        """(3, positions(image)) int64: the image's positions relative to its first one (that one is 0, 0, 0)."""
        ...


class ImageRun(NamedTuple):
    """One image among a step's new tokens; start and end index the row's new tokens."""

    row: int
    start: int
    end: int
    rows: torch.Tensor
    """Its encoder rows, (end - start, hidden)."""
    grid: torch.Tensor | None
    """Its ``GridPositions.grid_positions``, when the encoder gives them."""

Loaded = tuple[Any, Any, ImageEncoder]
"""(tokenizer, causal LM, image encoder) of a VLM folder."""

LOADERS = VISION_LOADERS
"""config.json's model_type -> the loader of such a folder (``engines.registry`` keeps the list)."""

NOT_DRIVEN: dict[str, str] = {
    "qwen2_vl": "slm's transformers engine has not been checked against (Qwen2.5-VL's is)",
}
"""VLMs transformers has that this engine refuses, and why."""


def load_vision(folder: Path, config: Mapping[str, Any]) -> Loaded | None:
    """(tokenizer, causal LM, image encoder) of a VLM folder, by its ``config.json`` (``config``); None for a
    text-only model. A VLM slm does not drive here is InvalidModelFile naming its model_type."""
    model_type = str(config.get("model_type", ""))
    target = LOADERS.get(model_type)
    if target is None:
        if model_type in NOT_DRIVEN:
            raise InvalidModelFile(f"{folder.name} is a vision-language model of type {model_type}, which "
                                   f"{NOT_DRIVEN[model_type]}")
        if "vision_config" in config:
            names = ", ".join(config.get("architectures") or [model_type])
            raise InvalidModelFile(f"{folder.name} is a vision-language model ({names}) that slm's transformers "
                                   "engine does not drive")
        return None
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise InvalidModelFile(f"{folder.name} is a vision-language model of type {model_type}, and this slm "
                               f"has no {module_name} to load it") from None
    load: Callable[[Path], Loaded] = getattr(module, function)
    return load(folder)


# --- an engine's images ----------------------------------------------------------------------------


class Images:
    """The images of one engine's prompts: each image's number (by its digest; never reused), the image
    itself until it is encoded, then its encoder rows (the pixels are not kept: a photo may be tens of MB)."""

    def __init__(self, encoder: ImageEncoder) -> None:
        self.encoder = encoder
        self._next = 0
        self._numbers: dict[str, int] = {}  # digest -> number, while the image or its rows are kept
        self._waiting: OrderedDict[int, media.Image] = OrderedDict()  # number -> image, not yet encoded
        # number -> (digest, rows, grid positions or None)
        self._encoded: OrderedDict[int, tuple[str, torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.grid = isinstance(encoder, GridPositions)
        """Whether images take M-RoPE grid positions (``GridPositions``)."""

    def tokenize(self, text: str, marker: str, images: Sequence[media.Image],
                 tokenize: Callable[[str, bool], list[int]], add_special: bool) -> list[int]:
        """The ids of ``text``, each ``marker`` in it the next image's run of placeholder ids with the model's
        own text around it. ``tokenize(piece, add_special)`` reads each piece of text between images (the
        text around an image ends in special tokens, where a tokenizer splits anyway)."""
        pieces = text.split(marker)
        if len(pieces) - 1 != len(images):
            raise InvalidParameter("images", f"{len(images)} images for {len(pieces) - 1} places for them")
        before, after = self.encoder.around()
        ids = tokenize(pieces[0] + (before if images else ""), add_special)
        for i, image in enumerate(images):
            ids += media.placeholders(self._hold(image), self.encoder.positions(image))
            ids += tokenize(after + pieces[i + 1] + (before if i + 1 < len(images) else ""), False)
        return ids

    def _hold(self, image: media.Image) -> int:
        number = self._numbers.get(image.digest)
        if number is not None and number in self._encoded:
            self._encoded.move_to_end(number)
            return number
        if number is None:
            number = self._numbers[image.digest] = self._next
            self._next += 1
            self._waiting[number] = image
            while len(self._waiting) > HELD_IMAGES:
                del self._numbers[self._waiting.popitem(last=False)[1].digest]
        self._waiting.move_to_end(number)
        return number

    def rows(self, number: int, ids: Sequence[int]) -> torch.Tensor:
        """The rows of image ``number`` for its placeholder ``ids`` (checked whole), encoded if not kept."""
        kept = self._encoded.get(number)
        image = self._waiting.get(number)
        if kept is not None:
            count = int(kept[1].shape[0])
        elif image is not None:
            count = self.encoder.positions(image)
        else:
            raise EngineError("the prompt refers to an image this engine no longer holds; send the image again")
        if list(ids) != media.placeholders(number, count):
            raise EngineError("a chunk of a prompt holds only part of an image")
        if kept is None:
            assert image is not None
            encoder = self.encoder
            grid = encoder.grid_positions(image) if isinstance(encoder, GridPositions) else None
            kept = self._encoded[number] = (image.digest, encoder.encode(image), grid)
            del self._waiting[number]
            while len(self._encoded) > ENCODED_IMAGES:
                del self._numbers[self._encoded.popitem(last=False)[1][0]]
        self._encoded.move_to_end(number)
        return kept[1]

    def runs(self, tokens: Sequence[Sequence[int]]) -> list[ImageRun]:
        """Every image among each row's new ``tokens``, with its rows (encoded now if not kept)."""
        out: list[ImageRun] = []
        for b, row in enumerate(tokens):
            if min(row) >= 0:
                continue
            for start, end, image in media.runs(row):
                if image is not None:
                    rows = self.rows(image, row[start:end])
                    out.append(ImageRun(b, start, end, rows, self._encoded[image][2]))
        return out


def together(images: Sequence[ImageRun], past: Sequence[int], new: Sequence[int], queries: int,
             keys: int) -> torch.Tensor:
    """(B, 1, queries, keys): whether query and key are positions of the same image, which a bidirectional
    encoder's model lets see each other both ways (transformers' Gemma 3: ``token_type_ids`` make each run
    of image tokens one block). Row b's new tokens are its last ``new[b]`` query columns and key columns
    ``past[b]`` on (key column = position)."""
    query = torch.full((len(past), queries), -1)  # (B, N): the image a query column belongs to; -1: text
    key = torch.full((len(past), keys), -1)  # (B, T): the same for key columns
    for group, (b, start, end, _, _) in enumerate(images):
        first = queries - new[b]
        query[b, first + start : first + end] = group
        key[b, past[b] + start : past[b] + end] = group
    return (query[:, None, :, None] == key[:, None, None, :]) & (query >= 0)[:, None, :, None]
