"""Phi-3-vision and Phi-3.5-vision on transformers: slm's own composition of transformers' parts.

transformers has no class for these models (only the checkpoints' remote code), so this module builds one
from what it has, loading the published checkpoint (microsoft/Phi-3.5-vision-instruct,
microsoft/Phi-3-vision-128k-instruct) by its own tensor names:

    model.vision_embed_tokens.img_processor.vision_model.*   CLIP ViT-L/14-336 (``CLIPVisionModel``)
    model.vision_embed_tokens.glb_GN, .sub_GN                the HD layout's separators, (1, 1, 4C), (1, 1, 1, 4C)
    model.vision_embed_tokens.img_projection.0/.2.*          Linear(4C, hidden), GELU, Linear(hidden, hidden)
    model.embed_tokens, model.layers.*, model.norm, lm_head  the text model: ``Phi3ForCausalLM``

An image becomes ``positions(image)`` rows of the text model's hidden width (``ImageEncoder.encode``), which
replace the embeddings of its placeholder positions; the text model then runs on ``inputs_embeds``, causal
over the image positions as over the text (``bidirectional = False``).

The algorithm follows the published ``image_embedding_phi3_v.py`` (``Phi3ImageEmbedding``): CLIP's hidden
states of ``layer_idx`` (-2: the next-to-last layer) without the class token, 24x24 patches per crop merged
2x2 into 12x12 positions of 4C, then ``hd_feature_transform`` with ``hd_transform_order = "sub_glb"``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slm.engines import media
from slm.engines.phi3v_processor import CROP, MERGED_SIDE, ProcessorConfig, crop_grid, image_positions, pixel_values
from slm.errors import InvalidModelFile, InvalidParameter

VISION_PREFIX = "model.vision_embed_tokens."
"""Where the published checkpoint keeps the image side's tensors."""
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768, "attention_dropout": 0.0, "dropout": 0.0,
}
"""The tower the published code always builds (``CLIP_VIT_LARGE_PATCH14_336_CONFIG``); config.json only names
it. An ``img_processor.clip_config`` object (slm's tiny test models have one) overrides these fields."""
CLIP_NAME = "openai/clip-vit-large-patch14-336"
# Keys of config.json that belong to the image side or to the remote code, not to the Phi-3 text model.
_NOT_TEXT = {"embd_layer", "img_processor", "auto_map", "architectures", "model_type", "torch_dtype",
             "transformers_version", "_name_or_path", "_attn_implementation"}


@dataclass(frozen=True)
class Phi3VConfig:
    """config.json of a Phi-3-vision checkpoint, checked and split into its two models' configurations."""

    text: Any  # transformers.Phi3Config
    clip: Any  # transformers.CLIPVisionConfig
    layer_idx: int  # which of CLIP's hidden states the image features are (-2: the next-to-last layer)

    @property
    def image_dim_out(self) -> int:
        return int(self.clip.hidden_size)


def read_config(folder: Path) -> Phi3VConfig:
    """The folder's config.json as a Phi3VConfig; a setting slm does not implement is an InvalidModelFile
    naming it."""
    from transformers import CLIPVisionConfig, Phi3Config

    path = Path(folder) / "config.json"
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelFile(f"{path} is missing: not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise InvalidModelFile(f"{path} could not be read: {e}") from None
    if raw.get("model_type") != "phi3_v":
        raise InvalidModelFile(f"{path}: model_type is {raw.get('model_type')!r}, not 'phi3_v' (Phi-3-vision)")
    embedding = _section(raw, "embd_layer", path)
    # The published models' settings, the only ones the published code (and so slm) implements.
    for key, wanted in (("embedding_cls", "image"), ("use_hd_transform", True), ("with_learnable_separator", True),
                        ("hd_transform_order", "sub_glb"), ("projection_cls", "mlp")):
        if embedding.get(key) != wanted:
            raise InvalidModelFile(f"{path}: embd_layer.{key} is {embedding.get(key)!r}; slm implements {wanted!r} "
                                   "(the published Phi-3-vision models' setting)")
    processor = _section(raw, "img_processor", path)
    for key, wanted in (("name", "clip_vision_model"), ("model_name", CLIP_NAME), ("type_feature", "patch")):
        if processor.get(key, "patch" if key == "type_feature" else None) != wanted:
            raise InvalidModelFile(f"{path}: img_processor.{key} is {processor.get(key)!r}; slm implements {wanted!r}")
    layer_idx = processor.get("layer_idx", -2)
    overrides = processor.get("clip_config", {})
    if not isinstance(overrides, dict) or not set(overrides) <= set(CLIP_VIT_L14_336):
        raise InvalidModelFile(f"{path}: img_processor.clip_config must be an object of {sorted(CLIP_VIT_L14_336)}")
    clip = CLIPVisionConfig(**(CLIP_VIT_L14_336 | overrides))
    layers = clip.num_hidden_layers
    if not isinstance(layer_idx, int) or not -layers - 1 <= layer_idx <= layers:
        raise InvalidModelFile(f"{path}: img_processor.layer_idx {layer_idx!r} is not a layer"
                               f" of the {layers}-layer tower")
    if processor.get("image_dim_out") != clip.hidden_size:
        raise InvalidModelFile(f"{path}: img_processor.image_dim_out is {processor.get('image_dim_out')!r}, "
                               f"but the CLIP tower's width is {clip.hidden_size}")
    if (clip.image_size, clip.patch_size) != (CROP, CROP // (2 * MERGED_SIDE)):
        raise InvalidModelFile(f"{path}: the HD transform needs 336-px crops of 24x24 patches")
    # The rest is a Phi-3 text configuration (transformers reads the published rope scaling "su" as "longrope").
    text = {k: v for k, v in raw.items() if k not in _NOT_TEXT}
    try:
        return Phi3VConfig(Phi3Config(**text), clip, layer_idx)
    except (TypeError, ValueError, KeyError) as e:
        raise InvalidModelFile(f"{path}: the text model's settings are not a Phi-3 configuration: {e}") from None


def _section(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise InvalidModelFile(f"{path}: {key} must be an object (a Phi-3-vision config has one), not {value!r}")
    return value


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """(N, 576, C) patch features of N crops -> (N, 12, 12, 4C): each 2x2 block of patches side by side in
    the channels, in the order (row in block, column in block, channel), as the published
    ``reshape_hd_patches_2x2merge``."""
    n, length, channels = features.shape
    side = int(length**0.5)
    blocks = features.reshape(n, side // 2, 2, side // 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, side // 2, side // 2, 4 * channels)


def _rows_with_separator(grid: torch.Tensor, sub_gn: torch.Tensor) -> torch.Tensor:
    """(H, W, D) -> (H * (W + 1), D): each row followed by ``sub_GN`` (the published ``add_image_newline``)."""
    height = grid.shape[0]
    return torch.cat([grid, sub_gn.reshape(1, 1, -1).expand(height, 1, -1)], dim=1).reshape(-1, grid.shape[-1])


def hd_layout(features: torch.Tensor, rows: int, columns: int, sub_gn: torch.Tensor,
              glb_gn: torch.Tensor) -> torch.Tensor:
    """(1 + rows * columns, 576, C) CLIP features of the global view and the crops (row by row) ->
    (positions, 4C), in the published "sub_glb" order: the crops stitched into one (12 rows) x (12 columns)
    grid, each row followed by ``sub_GN``; ``glb_GN``; the global view's 12 rows, each followed by ``sub_GN``."""
    merged = merge_2x2(features)  # (1 + rows * columns, 12, 12, 4C)
    side, dim = merged.shape[1], merged.shape[-1]
    stitched = merged[1:].reshape(rows, columns, side, side, dim).permute(0, 2, 1, 3, 4)  # (rows, 12, columns, 12, 4C)
    sub = _rows_with_separator(stitched.reshape(rows * side, columns * side, dim), sub_gn)
    return torch.cat([sub, glb_gn.reshape(1, dim), _rows_with_separator(merged[0], sub_gn)])


class VisionEmbedding(nn.Module):
    """The image side of the checkpoint (``model.vision_embed_tokens``, without the published code's second
    reference to the word embeddings): pixels of one image's crops -> its rows of text-model embeddings."""

    def __init__(self, config: Phi3VConfig) -> None:
        from transformers import CLIPVisionModel

        super().__init__()
        dim, hidden = 4 * config.image_dim_out, config.text.hidden_size
        self.img_processor = CLIPVisionModel(config.clip)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # CLIP's hidden states are the embeddings, then each layer's output: ``layer_idx`` is the output of
        # this many layers (-2: all but the last, whose weights the checkpoint holds but nothing reads).
        layers = config.clip.num_hidden_layers
        self.layers_used = layers + 1 + config.layer_idx if config.layer_idx < 0 else config.layer_idx

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 336, 336) -> (N, 576, C): CLIP's hidden states of ``layer_idx``, class token dropped. The
        tower is run only that far (its forward would run every layer and keep every layer's states)."""
        tower = self.img_processor
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))  # (N, 577, C)
        for layer in tower.encoder.layers[: self.layers_used]:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden[:, 1:]

    def forward(self, pixels: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """(1 + rows * columns, 3, 336, 336), the global view first -> (positions, hidden)."""
        layout = hd_layout(self.patch_features(pixels), rows, columns, self.sub_GN, self.glb_GN)
        return self.img_projection(layout)


class ImageEncoder:
    """Phi-3-vision's side of the engine's image seam (``positions``, ``encode``, ``around``)."""

    bidirectional = False  # the text model attends causally over image positions too

    def __init__(self, embedding: VisionEmbedding, processor: ProcessorConfig, after: str = "") -> None:
        self.embedding = embedding
        self.processor = processor
        self._after = after

    def around(self) -> tuple[str, str]:
        """Text written before and after an image's positions. The published processor (and ONNX Runtime
        GenAI's) splits the prompt at each ``<|image_N|>`` and tokenizes every piece on its own, so the text
        after an image starts with the tokenizer's BOS (``<s>`` for Phi-3) when its tokenizer adds one; and
        the prompts Phi-3-vision was taught with write a newline after each image tag (``<|image_1|>\n``)."""
        return "", self._after

    def positions(self, image: media.Image) -> int:
        return image_positions(image.width, image.height, self.processor.num_crops)

    def encode(self, image: media.Image) -> torch.Tensor:
        """(positions(image), hidden) float32: the image's rows of embeddings."""
        rows, columns = crop_grid(image.width, image.height, self.processor.num_crops)
        parameter = next(self.embedding.parameters())
        pixels = pixel_values(image, self.processor).to(parameter.device, parameter.dtype)
        with torch.no_grad():  # not inference_mode: the engine may write these rows into its own tensors
            return self.embedding(pixels, rows, columns).float()


def prompt_embeddings(model: Any, encoder: ImageEncoder, ids: Sequence[int],
                      images: Sequence[media.Image]) -> torch.Tensor:
    """(1, len(ids), hidden) ``inputs_embeds`` of a prompt in the published processor's ids (``prompt_ids``:
    image N's positions are ``-N``), each image's positions replaced by its ``encode`` rows: the published
    model's forward, for checks against other implementations (slm's engine does this with its own ids)."""
    tokens = torch.tensor(list(ids))
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(tokens.clamp(min=0))  # (T, hidden)
        for number, image in enumerate(images, start=1):
            where = (tokens == -number).nonzero().flatten()
            rows = encoder.encode(image).to(embeds.dtype)
            embeds[where] = rows.repeat(len(where) // len(rows), 1)  # every mention of the image
    return embeds[None]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` names."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise InvalidModelFile(f"{index} could not be read: {e}") from None
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        weight_map, files = {}, ["model.safetensors"]
    else:
        raise InvalidModelFile(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            shard = load_file(folder / name)
        except (OSError, ValueError, RuntimeError) as e:  # safetensors' own errors are RuntimeError subclasses
            raise InvalidModelFile(f"{folder / name} could not be read: {e}") from None
        for key, tensor in shard.items():
            if weight_map and weight_map.get(key) != name:
                raise InvalidModelFile(f"{folder / name} holds {key}, which the index puts in {weight_map.get(key)}")
            tensors[key] = tensor
    return tensors


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path, published: dict[str, str]) -> None:
    """Load ``tensors`` (by state-dict name) into ``module``, built with empty weights, as float32; a wrong
    shape is an InvalidModelFile naming the tensor's ``published`` name."""
    expected = module.state_dict()
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InvalidModelFile(f"{where}: tensor {published[name]} has shape {tuple(tensor.shape)}, "
                                   f"the configuration says {tuple(expected[name].shape)}")
    for name in tensors:
        tensors[name] = tensors[name].float()
    module.load_state_dict(tensors, strict=True, assign=True)


def build(config: Phi3VConfig, empty: bool = True) -> tuple[Any, VisionEmbedding]:
    """(Phi3ForCausalLM, VisionEmbedding) of this configuration: with empty (meta) weights to load into, or
    with transformers' random initialisation (``empty=False``, for building test models)."""
    from accelerate import init_empty_weights
    from transformers import Phi3ForCausalLM

    if not empty:
        return Phi3ForCausalLM(config.text), VisionEmbedding(config)
    with init_empty_weights():  # parameters on the meta device, buffers (rotary frequencies) real
        return Phi3ForCausalLM(config.text), VisionEmbedding(config)


def checkpoint_names(text: Any, vision: VisionEmbedding) -> dict[str, tuple[nn.Module, str]]:
    """The published name of every tensor -> (the module holding it, its name in that module's state dict).
    (transformers 5's CLIPVisionModel has no ``vision_model.`` level; the published names keep it.)"""
    clip_keys = vision.img_processor.state_dict()
    clip_level = "" if "vision_model.embeddings.class_embedding" in clip_keys else "vision_model."
    names: dict[str, tuple[nn.Module, str]] = {key: (text, key) for key in text.state_dict()}
    for key in vision.state_dict():
        published = key
        if key.startswith("img_processor."):
            published = "img_processor." + clip_level + key.removeprefix("img_processor.")
        names[VISION_PREFIX + published] = (vision, key)
    return names


def checkpoint_state(text: Any, vision: VisionEmbedding) -> dict[str, torch.Tensor]:
    """The two models' tensors under their published names, as a checkpoint holds them."""
    states = {id(text): text.state_dict(), id(vision): vision.state_dict()}
    return {published: states[id(module)][key] for published, (module, key) in checkpoint_names(text, vision).items()}


def load_weights(folder: Path, config: Phi3VConfig) -> tuple[Any, VisionEmbedding]:
    """(Phi3ForCausalLM, VisionEmbedding) holding the folder's tensors, read strictly: a missing or an
    unexpected tensor is an InvalidModelFile naming it."""
    tensors = read_tensors(folder)
    text, vision = build(config)
    names = checkpoint_names(text, vision)
    missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    for found, what in ((missing, "is missing"), (unexpected, "is not a tensor of a Phi-3-vision model")):
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise InvalidModelFile(f"{folder}: tensor {found[0]} {what}{more}")
    for module in (text, vision):
        owned = {published: key for published, (owner, key) in names.items() if owner is module}
        # popped, so each tensor as read is freed once converted: the peak is one copy, not two
        _assign(module, {key: tensors.pop(published) for published, key in owned.items()}, folder,
                {key: published for published, key in owned.items()})
    return text.eval(), vision.eval()


def load(folder: Path, num_crops: int | None = None) -> tuple[Any, Any, ImageEncoder]:
    """(tokenizer, Phi3ForCausalLM, ImageEncoder) of a Phi-3/3.5-vision Hugging Face folder, float32.
    ``num_crops`` overrides preprocessor_config.json's most crops per image (Phi-3.5-vision's model card
    suggests 16 for a single image, 4, its file's setting, for several)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = read_config(folder)
    processor = ProcessorConfig.read(folder)
    if num_crops is not None:
        if num_crops < 1:
            raise InvalidParameter("num_crops", f"must be at least 1, not {num_crops}")
        processor = dataclasses.replace(processor, num_crops=num_crops)
    text, vision = load_weights(folder, config)
    try:
        # Given the text configuration, it does not read config.json, whose auto_map names the checkpoint's
        # remote code (transformers would ask on stdin whether to run it)
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config.text, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidModelFile(f"{folder}: its tokenizer could not be loaded: {e}") from None
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    # The model card's prompts (and vLLM's, for image parts) put a newline after each <|image_N|>
    return tokenizer, text, ImageEncoder(vision, processor, (tokenizer.bos_token if adds_bos else "") + "\n")
