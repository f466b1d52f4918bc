"""Phi-3/3.5-vision's image processor: an image -> its 336-px crops (global view first) and its number of
image positions, as the published ``image_processing_phi3_v.py`` (microsoft/Phi-3-vision-128k-instruct and
microsoft/Phi-3.5-vision-instruct, class ``Phi3VImageProcessor``) computes them, without torchvision.

The published steps, each reproduced here:

1. ``HD_transform``: a portrait image is transposed so the long side is the width; the largest ``scale``
   with ``scale * ceil(scale / ratio) <= num_crops`` sets the width to ``scale * 336`` and the height to
   ``int(width / ratio)``; torchvision's ``resize`` of a PIL image (PIL bilinear); ``padding_336`` pads the
   height up to a multiple of 336 with white, the odd pixel at the bottom; transposed back.
2. ``ToTensor`` and ``Normalize`` with CLIP's mean and std (the padding is white before normalizing).
3. The global view: that normalized HD image resized to 336x336 by ``torch.nn.functional.interpolate``
   (bicubic, no antialiasing).
4. The crops: the HD image cut into ``h_crop x w_crop`` 336-px squares, row by row, after the global view.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slm.engines import media
from slm.errors import InvalidModelFile, InvalidParameter

CROP = 336
"""The side of one crop and of the global view (the CLIP tower's image size)."""
MERGED_SIDE = 12
"""A crop's 24x24 patch features merged 2x2: 12x12 image positions."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WHITE = (255, 255, 255)
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
"""How a Phi-3-vision prompt places image N: ``<|image_N|>`` (N from 1)."""


@dataclass(frozen=True)
class ProcessorConfig:
    """What ``preprocessor_config.json`` sets: the most crops an image is cut into, and the normalization."""

    # Phi3VImageProcessor's default; the published files say 16 (Phi-3-vision) and 4 (Phi-3.5-vision)
    num_crops: int = 1
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def read(cls, folder: Path) -> ProcessorConfig:
        """The folder's ``preprocessor_config.json``, checked; a bad field is an InvalidModelFile naming it."""
        path = Path(folder) / "preprocessor_config.json"
        try:
            raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidModelFile(f"{path} is missing: a Phi-3-vision folder has its image processor's "
                                   "settings") from None
        except (OSError, ValueError) as e:
            raise InvalidModelFile(f"{path} could not be read: {e}") from None
        kind = raw.get("image_processor_type", "Phi3VImageProcessor")
        if kind != "Phi3VImageProcessor":
            raise InvalidModelFile(f"{path}: image_processor_type is {kind!r}, not Phi3VImageProcessor")
        num_crops = raw.get("num_crops", cls.num_crops)
        if not isinstance(num_crops, int) or isinstance(num_crops, bool) or num_crops < 1:
            raise InvalidModelFile(f"{path}: num_crops must be a positive integer, not {num_crops!r}")
        return cls(num_crops, _triple(raw, "image_mean", CLIP_MEAN, path), _triple(raw, "image_std", CLIP_STD, path))


Triple = tuple[float, float, float]


def _triple(raw: dict[str, Any], key: str, default: Triple, path: Path) -> Triple:
    value = raw.get(key, default)
    if not (isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, int | float) for v in value)):
        raise InvalidModelFile(f"{path}: {key} must be three numbers, not {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _scaled(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) of a landscape image (width >= height) resized by ``HD_transform``, before padding."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_width = int(scale * CROP)
    # At a ratio past scale * 336 : 1 the published code resizes to a height of 0 (and fails); one row keeps
    # such an image to one row of crops.
    return new_width, max(1, int(new_width / ratio))


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) of an image after ``HD_transform``: both multiples of 336 (the published
    ``calc_hd_transform_size``)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    new_width, new_height = _scaled(width, height, num_crops)
    padded = (new_width, math.ceil(new_height / CROP) * CROP)
    return (padded[1], padded[0]) if transposed else padded


def crop_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(rows, columns) of 336-px crops an image of this size is cut into."""
    hd_width, hd_height = hd_size(width, height, num_crops)
    return hd_height // CROP, hd_width // CROP


def image_positions(width: int, height: int, num_crops: int) -> int:
    """The number of prompt positions an image takes: ``(h_crop * w_crop + 1) * 144 + 1 + (h_crop + 1) * 12``,
    the published ``calc_num_image_tokens_from_image_size`` (and vLLM's ``get_phi3v_image_feature_size``).

    It is the length of the HD layout (``hd_feature_transform`` of ``image_embedding_phi3_v.py``): the
    sub-images' 12*h_crop rows of 12*w_crop positions, each row followed by ``sub_GN``; one ``glb_GN``; the
    global view's 12 rows of 12, each followed by ``sub_GN``.
    """
    rows, columns = crop_grid(width, height, num_crops)
    return (rows * columns + 1) * MERGED_SIDE**2 + 1 + (rows + 1) * MERGED_SIDE


def hd_image(image: media.Image, num_crops: int) -> Any:
    """The PIL image ``HD_transform`` makes of ``image``: resized (bilinear) and padded with white to
    multiples of 336."""
    from PIL import Image as PILImage

    picture = PILImage.frombytes("RGB", (image.width, image.height), image.rgb)
    transposed = picture.width < picture.height
    if transposed:
        picture = picture.transpose(PILImage.Transpose.TRANSPOSE)
    new_width, new_height = _scaled(picture.width, picture.height, num_crops)
    picture = picture.resize((new_width, new_height), PILImage.Resampling.BILINEAR)
    target = math.ceil(new_height / CROP) * CROP
    top = (target - new_height) // 2
    padded = PILImage.new("RGB", (new_width, target), _WHITE)
    padded.paste(picture, (0, top))
    return padded.transpose(PILImage.Transpose.TRANSPOSE) if transposed else padded


def pixel_values(image: media.Image, config: ProcessorConfig) -> torch.Tensor:
    """(1 + h_crop * w_crop, 3, 336, 336) float32: the global view, then the crops row by row, normalized.
    (The published processor also pads the stack with zero crops up to ``num_crops + 1``; the model never
    reads them, so they are left out.)"""
    import numpy as np

    picture = hd_image(image, config.num_crops)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy())  # (H, W, 3)
    hd = pixels.permute(2, 0, 1).float().div(255)  # (3, H, W), as ToTensor
    mean = torch.tensor(config.image_mean).view(3, 1, 1)
    std = torch.tensor(config.image_std).view(3, 1, 1)
    hd = hd.sub(mean).div(std)
    glob = F.interpolate(hd.unsqueeze(0), size=(CROP, CROP), mode="bicubic", align_corners=False)  # (1, 3, 336, 336)
    rows, columns = hd.shape[1] // CROP, hd.shape[2] // CROP
    crops = hd.reshape(3, rows, CROP, columns, CROP).permute(1, 3, 0, 2, 4).reshape(-1, 3, CROP, CROP)
    return torch.cat([glob, crops])


def prompt_ids(tokenizer: Any, prompt: str, images: Sequence[media.Image], num_crops: int) -> list[int]:
    """A prompt's ids as the published processor makes them (``Phi3VProcessor._convert_images_texts_to_inputs``;
    ONNX Runtime GenAI's ``ProcessImagePrompt`` does the same): the prompt split at each ``<|image_N|>``, every
    piece tokenized on its own (so each starts with the tokenizer's BOS, if it adds one), image N's positions
    written as ``-N``."""
    pieces = IMAGE_TAG.split(prompt)  # text, N, text, N, ..., text
    numbers = [int(n) for n in pieces[1::2]]
    if sorted(set(numbers)) != list(range(1, len(images) + 1)):
        raise InvalidParameter("images", f"the prompt's image tags {sorted(set(numbers))} do not number the "
                                         f"{len(images)} images from 1")
    ids: list[int] = []
    for index, text in enumerate(pieces[::2]):
        ids += tokenizer(text)["input_ids"]
        if index < len(numbers):
            image = images[numbers[index] - 1]
            ids += [-numbers[index]] * image_positions(image.width, image.height, num_crops)
    return ids
