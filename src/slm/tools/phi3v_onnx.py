"""A Phi-3/3.5-vision Hugging Face folder -> the ``phi3v`` folder ONNX Runtime GenAI runs.

    build(source, out, precision, model_builder, work)   # what `slm convert --to onnx` does for one

The folder holds three models, as Microsoft's ``Phi-3.5-vision-instruct-onnx`` does:

- ``model.onnx``: the Phi-3 text decoder without its embedding (inputs_embeds, KV cache -> logits), written
  by ONNX Runtime GenAI's model builder (``exclude_embeds=true``) from the checkpoint's text part, saved as
  a plain Phi-3 folder first (the builder would need the checkpoint's remote code otherwise);
- ``embedding.onnx``: input_ids, image_features -> inputs_embeds. The k-th negative id takes the k-th row
  of image_features, the others the token embedding (no rows: a text-only run);
- ``vision.onnx``: pixel_values (images, 17, 3, 336, 336), image_sizes (images, 2) -> image_features
  (positions, hidden): the CLIP tower over each image's global view and its crops, Phi-3's 2x2 merge, the
  HD layout (each row of crops closed by ``sub_GN``, then ``glb_GN``, then the global view's rows) and the
  projection. It is ``torch.onnx.export`` of slm's own composition (``slm.engines.phi3v``), with the layout
  written as a gather by indices computed from image_sizes, so one graph takes any number of images of any
  crop layout.

``genai_config.json`` (type ``phi3v``) and ``processor_config.json`` (what ONNX Runtime GenAI's phi3v
processor reads) are written by slm; the tokenizer is the builder's copy of the checkpoint's.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slm.engines import phi3v
from slm.engines.transformers import quiet
from slm.errors import InvalidModelFile

CROPS = 17
"""pixel_values' crops per image: the global view and up to 16 crops (ONNX Runtime GenAI's processor pads
every image to that many)."""
SIDE = 336
"""A crop's side in pixels."""
GRID = 12
"""Merged patches a side of one crop (24 CLIP patches a side, merged 2x2)."""
VISION_FILE, EMBEDDING_FILE = "vision.onnx", "embedding.onnx"
OPSET = 17

ModelBuilder = Callable[[Path, Path, list[str]], None]
"""Runs ONNX Runtime GenAI's model builder: (Hugging Face folder, output folder, extra options)."""


def build(source: Path, out: Path, precision: str, model_builder: ModelBuilder, work: Path) -> None:
    """Write the phi3v folder of the checkpoint in ``source`` to ``out`` (decoder in ``precision``; the vision
    and embedding models in float32), using ``work`` for the text part."""
    with quiet():  # transformers narrates the published config's rope settings
        settings = phi3v.read_config(source)  # a setting slm does not implement is refused before anything runs
        text = work / "phi3-text"
        write_text_part(source, text)
        model_builder(text, out, ["exclude_embeds=true"])
        decoder, vision = phi3v.load_weights(source, settings)
        export_embedding(decoder.model.embed_tokens.weight, out / EMBEDDING_FILE)
        export_vision(vision, out / VISION_FILE)
        write_configs(source, out)


# --- the text part -----------------------------------------------------------------------------------


TEXT_ARCHITECTURE = "Phi3ForCausalLM"
VISION_KEYS = ("embd_layer", "img_processor", "auto_map", "vision_config")
"""config.json keys of the vision part (and remote code), left out of the text part's."""


def write_text_part(source: Path, text: Path) -> None:
    """The checkpoint's Phi-3 decoder as a plain Phi-3 folder: its config without the vision keys, its
    tensors without the vision ones, its tokenizer and generation settings."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((source / "config.json").read_text())
    text.mkdir(parents=True)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise InvalidModelFile(f"{source} has no .safetensors weights")
    weight_map: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(phi3v.VISION_PREFIX)}  # noqa: SIM118
        except (OSError, RuntimeError) as e:  # safetensors' own errors are RuntimeError subclasses
            raise InvalidModelFile(f"{shard} could not be read: {e}") from None
        if tensors:
            save_file(tensors, str(text / shard.name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard.name))
    if len(shards) > 1:
        (text / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    plain = {k: v for k, v in config.items() if k not in VISION_KEYS}
    plain.update(architectures=[TEXT_ARCHITECTURE], model_type="phi3")
    (text / "config.json").write_text(json.dumps(plain, indent=2))
    for path in source.iterdir():
        if path.is_file() and path.suffix not in (".safetensors", ".py") and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(path, text / path.name)


# --- the vision and embedding parts ------------------------------------------------------------------


def export_embedding(weight: torch.Tensor, path: Path) -> None:
    """input_ids (batch, length) int64, image_features (positions, hidden) -> inputs_embeds (batch, length,
    hidden), with the token embeddings ``weight``."""
    module = Embedding(weight.detach().float())
    ids = torch.tensor([[1, -1, -1, 2]], dtype=torch.int64)
    features = torch.zeros(2, module.weight.shape[1])
    _export(module, (ids, features), path, ["input_ids", "image_features"], ["inputs_embeds"],
            {"input_ids": {0: "batch_size", 1: "sequence_length"}, "image_features": {0: "num_image_tokens"},
             "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})


def export_vision(vision: phi3v.VisionEmbedding, path: Path) -> None:
    """pixel_values (images, 17, 3, 336, 336), image_sizes (images, 2) int64 -> image_features (positions,
    hidden)."""
    pixels = torch.randn(2, CROPS, 3, SIDE, SIDE)
    sizes = torch.tensor([[2 * SIDE, SIDE], [SIDE, 3 * SIDE]], dtype=torch.int64)
    _export(Vision(vision), (pixels, sizes), path, ["pixel_values", "image_sizes"], ["image_features"],
            {"pixel_values": {0: "num_images"}, "image_sizes": {0: "num_images"},
             "image_features": {0: "num_image_tokens"}})


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    # The tracer warns of every Python value it records as a constant; the shapes it fixes that way (CLIP's
    # 336-px input, the 24x24 patch grid) are the model's own, and the tests run the graph on other image sizes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)


class Embedding(nn.Module):
    """Token embeddings, with the k-th negative id (in reading order) taking row k of image_features."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        image = input_ids < 0  # (B, T)
        text = self.weight[input_ids.clamp(min=0)]  # (B, T, H)
        flat = image.reshape(-1).to(torch.int64)
        rows = torch.cumsum(flat, 0) * flat  # (B*T,): 1-based row of image_features, 0 for text
        pool = torch.cat([torch.zeros_like(self.weight[:1]), image_features.to(self.weight.dtype)])  # a filler row 0
        picked = pool[rows].reshape(text.shape)  # (B, T, H)
        return torch.where(image.unsqueeze(-1), picked, text)


class Vision(nn.Module):
    """``phi3v.VisionEmbedding`` over any number of images at once, each in its own crop layout."""

    def __init__(self, vision: phi3v.VisionEmbedding) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        rows = image_sizes[:, 0] // SIDE  # (N,) crops down
        cols = image_sizes[:, 1] // SIDE  # (N,) crops across
        used = torch.arange(CROPS)[None, :] <= (rows * cols)[:, None]  # (N, 17): the global view and the crops
        rank = (torch.cumsum(used.reshape(-1).to(torch.int64), 0) - 1).reshape(-1, CROPS)  # row in `crops`
        crops = pixel_values.reshape(-1, 3, SIDE, SIDE)[used.reshape(-1)]  # (C, 3, 336, 336)
        merged = phi3v.merge_2x2(self.vision.patch_features(crops))  # (C, 12, 12, 4D)
        width = merged.shape[-1]
        pool = torch.cat([merged.reshape(-1, width), self.vision.sub_GN.reshape(1, width),
                          self.vision.glb_GN.reshape(1, width)])  # (C*144 + 2, 4D)
        index, keep = layout(rows, cols, rank, used.sum() * GRID * GRID)
        return self.vision.img_projection(pool[index[keep]])  # (positions, hidden)


def layout(rows: torch.Tensor, cols: torch.Tensor, rank: torch.Tensor, sub_gn: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the rows of the feature pool its positions read, in order, and which of them are
    real: the crops' grid (12 rows per row of crops; 12 columns per crop, and ``sub_GN`` closing each row),
    then ``glb_GN`` (the row after ``sub_GN``'s), then the global view's 12 x 12 grid, each row closed by
    ``sub_GN``. The crops' grid is laid out for the largest layout (16 crops down or across) and masked to
    the image's, so the graph has no loop."""
    most = (CROPS - 1) * GRID
    r = torch.arange(most)[None, :, None]  # (1, R, 1)
    c = torch.arange(most + 1)[None, None, :]  # (1, 1, R+1)
    down, across = rows[:, None, None], cols[:, None, None]  # (N, 1, 1)
    crop = (1 + (r // GRID) * across + torch.minimum(c // GRID, across - 1)).clamp(0, CROPS - 1)  # (N, R, R+1)
    ranks = torch.gather(rank, 1, crop.flatten(1)).reshape(crop.shape)
    grid = torch.where(c == across * GRID, sub_gn, ranks * GRID * GRID + (r % GRID) * GRID + c % GRID)
    grid_keep = (r < down * GRID) & (c <= across * GRID)
    gr = torch.arange(GRID)[None, :, None]
    gc = torch.arange(GRID + 1)[None, None, :]
    view = rank[:, :1, None] * GRID * GRID + gr * GRID + gc.clamp(max=GRID - 1)  # (N, 12, 13)
    view = torch.where(gc == GRID, sub_gn, view)
    glb = torch.zeros_like(rows[:, None]) + sub_gn + 1  # (N, 1)
    index = torch.cat([grid.flatten(1), glb, view.flatten(1)], 1)  # (N, R * (R+1) + 1 + 12 * 13)
    always = torch.ones_like(torch.cat([glb, view.flatten(1)], 1), dtype=torch.bool)
    keep = torch.cat([grid_keep.flatten(1), always], 1)
    return index, keep


# --- the configuration files -------------------------------------------------------------------------


def write_configs(source: Path, out: Path) -> None:
    """Turn the builder's text-model ``genai_config.json`` into a phi3v one, and write ``processor_config.json``."""
    path = out / "genai_config.json"
    genai = json.loads(path.read_text())
    model = genai["model"]
    model["type"] = "phi3v"
    model["embedding"] = {
        "filename": EMBEDDING_FILE,
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
    }
    model["vision"] = {
        "filename": VISION_FILE,
        "config_filename": "processor_config.json",
        "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
        "outputs": {"image_features": "image_features"},
    }
    path.write_text(json.dumps(genai, indent=4))
    (out / "processor_config.json").write_text(json.dumps(processor_config(source), indent=2))


def processor_config(source: Path) -> dict[str, Any]:
    """What ONNX Runtime GenAI's phi3v processor reads: decode, RGB, Phi-3's HD transform (crops of 336 px,
    144 positions each). ``num_crops`` is the checkpoint's, though onnxruntime-extensions' transform always
    uses up to 16."""
    pre = source / "preprocessor_config.json"
    crops = int(json.loads(pre.read_text()).get("num_crops", 4)) if pre.exists() else 4
    return {"processor": {"name": "image_processing", "transforms": [
        {"operation": {"name": "decode_image", "domain": "com.microsoft.extensions", "type": "DecodeImage",
                       "attrs": {"color_space": "BGR"}}},
        {"operation": {"name": "convert_to_rgb", "domain": "com.microsoft.extensions", "type": "ConvertRGB"}},
        {"operation": {"name": "phi3_image_transform", "domain": "com.microsoft.extensions",
                       "type": "Phi3ImageTransform", "attrs": {"num_crops": crops, "num_img_tokens": 144}}},
    ]}}
