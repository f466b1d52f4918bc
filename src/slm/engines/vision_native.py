"""transformers' own vision-language model classes behind the engine's image seam (``engines/vision.py``).

Gemma 3 and LLaVA give a fixed run of image positions (``NativeEncoder``: the model's image processor, the PIL
one as torchvision is absent, and its own ``get_image_features``); Idefics3 and SmolVLM cut an image into
tiles with text between them, laid out as their processors do (``TiledEncoder``); Qwen2.5-VL's image takes as
many positions as its resized size has merged patches, with M-RoPE grid positions (``GridEncoder``). Each
``load_*`` returns (tokenizer, the VLM itself as the causal LM, its encoder).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slm.engines import media
from slm.engines.vision import Loaded
from slm.errors import EngineError, InvalidModelFile


class NativeEncoder:
    """The image side of a transformers VLM class: its processor's image processor (the PIL one, as
    torchvision is absent) and the model's own ``get_image_features``. ``count`` reads how many positions an
    image takes from its processed pixels, (1, 3, H, W), as the model's processor does."""

    def __init__(self, model: Any, image_processor: Any, around: tuple[str, str],
                 count: Callable[[torch.Tensor], int], bidirectional: bool) -> None:
        self.model = model
        self.image_processor = image_processor
        self.bidirectional = bidirectional
        self._around = around
        self._count = count
        self._pixels: OrderedDict[str, torch.Tensor] = OrderedDict()  # digest -> processed pixels, the last few

    def around(self) -> tuple[str, str]:
        return self._around

    def positions(self, image: media.Image) -> int:
        return self._count(self._processed(image))

    def encode(self, image: media.Image) -> torch.Tensor:
        processed = self._processed(image)
        count = self._count(processed)
        self._pixels.pop(image.digest)  # processed when its prompt was tokenized; not needed again
        with torch.inference_mode():
            features = self.model.get_image_features(pixel_values=processed.to(self.model.device, self.model.dtype),
                                                     return_dict=True).pooler_output
        rows: torch.Tensor = features[0].float()  # the image's (positions, hidden), from a batch of one
        if rows.shape[0] != count:
            raise EngineError(f"the image encoder gave {rows.shape[0]} rows for an image of {count} positions")
        return rows

    def _processed(self, image: media.Image) -> torch.Tensor:
        from PIL import Image as PILImage

        pixels = self._pixels.get(image.digest)
        if pixels is None:
            picture = PILImage.frombytes("RGB", (image.width, image.height), image.rgb)
            pixels = self._pixels[image.digest] = self.image_processor(images=[picture],
                                                                       return_tensors="pt")["pixel_values"]
            while len(self._pixels) > 4:
                self._pixels.popitem(last=False)
        self._pixels.move_to_end(image.digest)
        return pixels


def _load_native(folder: Path, class_name: str) -> tuple[Any, Any]:
    """(processor, float32 model) of a VLM folder, by transformers' class name."""
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(folder)
        model = getattr(transformers, class_name).from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidModelFile(f"{folder} could not be loaded as a {class_name}: {e}") from None
    return processor, model


def load_gemma3(folder: Path) -> Loaded:
    """Gemma 3 (``Gemma3ForConditionalGeneration``): a fixed number of image positions, read both ways."""
    processor, model = _load_native(folder, "Gemma3ForConditionalGeneration")
    if getattr(processor.image_processor, "do_pan_and_scan", False):
        raise InvalidModelFile(f"{folder}'s image processor asks for pan and scan (crops of each image), which "
                               "slm's transformers engine does not lay out")
    tokenizer = processor.tokenizer
    # The processor writes each image as before + image_token * count + after
    full, token = processor.full_image_sequence, tokenizer.image_token
    around = (full[: full.index(token)], full[full.rindex(token) + len(token) :])
    count = int(processor.image_seq_length)
    return tokenizer, model, NativeEncoder(model, processor.image_processor, around, lambda _: count,
                                           bidirectional=True)


def load_llava(folder: Path) -> Loaded:
    """LLaVA (``LlavaForConditionalGeneration``): one position per patch of the vision tower (its CLS too
    unless the model drops it), nothing written around them, read causally."""
    processor, model = _load_native(folder, "LlavaForConditionalGeneration")
    patch, extra = int(processor.patch_size), int(processor.num_additional_image_tokens)
    dropped = 1 if processor.vision_feature_select_strategy == "default" else 0

    def count(pixels: torch.Tensor) -> int:  # as LlavaProcessor.replace_image_token
        height, width = pixels.shape[-2:]
        return (height // patch) * (width // patch) + extra - dropped

    return processor.tokenizer, model, NativeEncoder(model, processor.image_processor, ("", ""), count,
                                                     bidirectional=False)


class TiledEncoder:
    """Idefics3 and SmolVLM: an image is cut into tiles plus a global view, each a block of image positions
    behind its own tag (``<row_1_col_1>``, ``<global-img>``), with newlines between rows of tiles. The whole
    layout is the image's run of positions, its text positions included (their rows are their token
    embeddings), so an image stays one run however it is cut. Read causally."""

    bidirectional = False

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, per_tile: int) -> None:
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self._per_tile = per_tile
        self._image_token = int(model.config.image_token_id)
        self._laid: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()  # digest -> (ids, processed), the last few

    def around(self) -> tuple[str, str]:
        return "", ""

    def positions(self, image: media.Image) -> int:
        return len(self._laid_out(image)[0])

    def encode(self, image: media.Image) -> torch.Tensor:
        ids, processed = self._laid_out(image)
        self._laid.pop(image.digest)  # laid out when its prompt was tokenized; not needed again
        tokens = torch.tensor(ids, device=self.model.device)
        with torch.inference_mode():
            rows: torch.Tensor = self.model.get_input_embeddings()(tokens).float()  # (positions, hidden)
            features = self.model.get_image_features(
                pixel_values=processed["pixel_values"].to(self.model.device, self.model.dtype),
                pixel_attention_mask=processed["pixel_attention_mask"].to(self.model.device),
                return_dict=True).pooler_output[0]  # (tiles * per_tile, hidden), in the layout's order
            where = tokens == self._image_token
            if int(where.sum()) != features.shape[0]:
                raise EngineError(f"the image encoder gave {features.shape[0]} rows for {int(where.sum())} image "
                                  "positions")
            rows[where] = features.float()
        return rows

    def _laid_out(self, image: media.Image) -> tuple[list[int], Any]:
        from PIL import Image as PILImage

        laid = self._laid.get(image.digest)
        if laid is None:
            picture = PILImage.frombytes("RGB", (image.width, image.height), image.rgb)
            processed = self.image_processor(images=[[picture]], return_row_col_info=True, return_tensors="pt")
            text = tile_layout(processed["rows"][0][0], processed["cols"][0][0], self._per_tile)
            laid = self._laid[image.digest] = (self.tokenizer.encode(text, add_special_tokens=False), processed)
            while len(self._laid) > 4:
                self._laid.popitem(last=False)
        self._laid.move_to_end(image.digest)
        return laid


def tile_layout(rows: int, cols: int, per_tile: int) -> str:
    """The text Idefics3's and SmolVLM's processors write for an image cut into ``rows`` x ``cols`` tiles (0 x 0:
    not cut), each tile and the global view ``per_tile`` ``<image>`` positions."""
    fake, image = "<fake_token_around_image>", "<image>" * per_tile
    view = f"{fake}<global-img>{image}{fake}"
    if not rows and not cols:
        return view
    tiles = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                    for r in range(rows))
    return f"{tiles}\n{view}"


def _load_tiled(folder: Path, class_name: str) -> Loaded:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
        model = getattr(transformers, class_name).from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidModelFile(f"{folder} could not be loaded as a {class_name}: {e}") from None
    vision = model.config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2
    return tokenizer, model, TiledEncoder(model, image_processor, tokenizer, per_tile)


def load_idefics3(folder: Path) -> Loaded:
    """Idefics3 (``Idefics3ForConditionalGeneration``): images cut into tiles (``TiledEncoder``)."""
    return _load_tiled(folder, "Idefics3ForConditionalGeneration")


def load_smolvlm(folder: Path) -> Loaded:
    """SmolVLM (``SmolVLMForConditionalGeneration``): Idefics3's layout and tiles, its own classes."""
    return _load_tiled(folder, "SmolVLMForConditionalGeneration")


class GridEncoder:
    """Qwen2.5-VL: an image resized to whole patches (its processor's ``smart_resize``), one position per 2 x 2
    merged patches, written between ``<|vision_start|>`` and ``<|vision_end|>`` as Qwen2VLProcessor does; each
    position's M-RoPE position is (0, row, column) on the merged grid (``vision.GridPositions``). Read causally."""

    bidirectional = False

    def __init__(self, model: Any, image_processor: Any, around: tuple[str, str]) -> None:
        self.model = model
        self.image_processor = image_processor
        self._around = around
        self._merge = int(image_processor.merge_size)
        self._processed: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # digest -> processed, the last few

    def around(self) -> tuple[str, str]:
        return self._around

    def positions(self, image: media.Image) -> int:
        return int(self._grid(image).prod()) // self._merge**2

    def grid_positions(self, image: media.Image) -> torch.Tensor:
        t, h, w = (int(n) for n in self._grid(image))
        h, w = h // self._merge, w // self._merge
        # as Qwen2_5_VLModel.get_vision_position_ids for an image: (time, row, column), row-major
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        return grid.reshape(3, -1)

    def encode(self, image: media.Image) -> torch.Tensor:
        processed = self._process(image)
        count = self.positions(image)
        self._processed.pop(image.digest)  # processed when its prompt was tokenized; not needed again
        with torch.inference_mode():
            features = self.model.get_image_features(
                pixel_values=processed["pixel_values"].to(self.model.device, self.model.dtype),
                image_grid_thw=processed["image_grid_thw"].to(self.model.device), return_dict=True).pooler_output
        rows: torch.Tensor = features[0].float()  # (positions, hidden), from a batch of one
        if rows.shape[0] != count:
            raise EngineError(f"the image encoder gave {rows.shape[0]} rows for an image of {count} positions")
        return rows

    def _grid(self, image: media.Image) -> torch.Tensor:
        """(3,): the image's (time, height, width) in patches, before merging."""
        return self._process(image)["image_grid_thw"][0]

    def _process(self, image: media.Image) -> dict[str, torch.Tensor]:
        from PIL import Image as PILImage

        processed = self._processed.get(image.digest)
        if processed is None:
            picture = PILImage.frombytes("RGB", (image.width, image.height), image.rgb)
            out = self.image_processor(images=[picture], return_tensors="pt")
            processed = self._processed[image.digest] = {"pixel_values": out["pixel_values"],
                                                         "image_grid_thw": out["image_grid_thw"]}
            while len(self._processed) > 4:
                self._processed.popitem(last=False)
        self._processed.move_to_end(image.digest)
        return processed


def load_qwen2_5_vl(folder: Path) -> Loaded:
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images at their own aspect, M-RoPE positions
    (``GridEncoder``). Its image processor and tokenizer are read on their own (its processor class would also
    want a video processor, which needs torchvision)."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidModelFile(f"{folder} could not be loaded as a Qwen2_5_VLForConditionalGeneration: {e}") from None
    return tokenizer, model, GridEncoder(model, image_processor, ("<|vision_start|>", "<|vision_end|>"))
