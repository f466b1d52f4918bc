"""Phi-3/3.5-vision on transformers (slm.engines.phi3v, phi3v_processor): the tiny random Phi-3.5-vision
checkpoint read strictly, its text side equal to transformers' own Phi3ForCausalLM, and its image side
checked against small re-implementations of the published algorithm (image_processing_phi3_v.py,
image_embedding_phi3_v.py of microsoft/Phi-3.5-vision-instruct)."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from phi3v_models import tiny_phi3v
from slm.engines import media, phi3v
from slm.engines.phi3v_processor import (
    CLIP_MEAN,
    CLIP_STD,
    ProcessorConfig,
    hd_image,
    hd_size,
    pixel_values,
    prompt_ids,
)
from slm.errors import InvalidModelFile

PROMPT = "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"
# microsoft/Phi-3.5-vision-instruct's config.json (its 48 long and short rope factors elided to 1.0).
PUBLISHED_CONFIG: dict[str, Any] = {
    "_name_or_path": "Phi-3.5-vision-instruct", "architectures": ["Phi3VForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                 "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
    "bos_token_id": 1,
    "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                   "use_hd_transform": True, "with_learnable_separator": True},
    "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 3072,
    "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                      "name": "clip_vision_model", "num_img_tokens": 144},
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3_v",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.0] * 48, "short_factor": [1.0] * 48, "type": "su"}, "rope_theta": 10000.0,
    "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1", "use_cache": True, "vocab_size": 32064,
    "_attn_implementation": "flash_attention_2",
}
SIZES = [(336, 336), (1000, 500), (500, 1000), (64, 64), (2000, 300), (300, 2000), (1344, 1008), (777, 333)]


@functools.cache
def loaded() -> tuple[Any, Any, phi3v.ImageEncoder]:
    return phi3v.load(tiny_phi3v())


def picture(width: int, height: int, seed: int = 0) -> media.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, width * height * 3, dtype=np.uint8)
    return media.Image.of_pixels(width, height, pixels.tobytes())


# --- the published processor, re-derived (image_processing_phi3_v.py) --------------------------------------

def published_hd_size(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """``calc_hd_transform_size``: transpose a portrait image, the largest scale with
    scale * ceil(scale / ratio) <= hd_num, width scale * 336, height padded up to a multiple of 336."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_width = int(scale * 336)
    new_height = int(np.ceil(int(new_width / ratio) / 336) * 336)
    return (new_height, new_width) if transposed else (new_width, new_height)


def published_token_count(width: int, height: int, hd_num: int) -> int:
    """``calc_num_image_tokens_from_image_size``: (h*w + 1) * 144 + 1 + (h + 1) * 12 for h x w crops."""
    new_width, new_height = published_hd_size(width, height, hd_num)
    return int((new_height // 336 * new_width // 336 + 1) * 144 + 1 + (new_height // 336 + 1) * 12)


@pytest.mark.parametrize("num_crops", [4, 16])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_positions_are_the_published_token_count(width: int, height: int, num_crops: int) -> None:
    encoder = loaded()[2]
    encoder = phi3v.ImageEncoder(encoder.embedding, ProcessorConfig(num_crops=num_crops))
    image = picture(width, height)
    assert encoder.positions(image) == published_token_count(width, height, num_crops)
    # ... and the count of the image the processor really makes (the published calc_num_image_tokens)
    made = hd_image(image, num_crops).size
    assert made == hd_size(width, height, num_crops) == published_hd_size(width, height, num_crops)


def test_num_crops_can_be_overridden() -> None:
    """Phi-3.5-vision's card suggests 16 crops for a single image; its preprocessor_config.json says 4."""
    assert phi3v.load(tiny_phi3v(), num_crops=16)[2].positions(picture(336, 336)) == 2509
    assert loaded()[2].positions(picture(336, 336)) == 757


def test_a_sliver_is_one_row_of_crops() -> None:
    """Past 1344:1 (4 crops) the published resize makes a height of 0 and fails; slm keeps one row."""
    encoder = loaded()[2]
    image = picture(2000, 1)
    assert hd_size(2000, 1, 4) == (1344, 336) and hd_size(1, 2000, 4) == (336, 1344)
    assert encoder.encode(image).shape[0] == encoder.positions(image) == (4 + 1) * 144 + 1 + 2 * 12


def test_known_token_counts() -> None:
    """By hand: a square image is 2x2 crops under Phi-3.5-vision's 4 (757 positions), 4x4 under Phi-3-vision's
    16 (2509); 1000x500 is 1x2 crops under 4 (12 rows of 25, a separator, 12 rows of 13: 457)."""
    assert published_token_count(336, 336, 4) == 5 * 144 + 1 + 3 * 12 == 757
    assert published_token_count(336, 336, 16) == 17 * 144 + 1 + 5 * 12 == 2509
    assert published_token_count(1000, 500, 4) == 12 * 25 + 1 + 12 * 13 == 457
    assert loaded()[2].positions(picture(1000, 500)) == 457


# --- reading the checkpoint ---------------------------------------------------------------------------------

def copy_with(tmp_path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Path:
    """The tiny folder's files in ``tmp_path``, with these tensors (one file) and optionally this config."""
    source = tiny_phi3v()
    for file in source.iterdir():
        if "safetensors" not in file.name:
            shutil.copy(file, tmp_path / file.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def test_checkpoint_has_the_published_tensor_names() -> None:
    names = set(phi3v.read_tensors(tiny_phi3v()))
    for name in ["model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight",
                 "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.self_attn.q_proj.weight",
                 "model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.sub_GN",
                 "model.vision_embed_tokens.img_projection.0.weight", "model.vision_embed_tokens.img_projection.2.bias",
                 "model.embed_tokens.weight", "model.layers.1.self_attn.qkv_proj.weight",
                 "model.layers.0.mlp.gate_up_proj.weight", "model.norm.weight", "lm_head.weight"]:
        assert name in names


def test_missing_tensor_is_refused_by_name(tmp_path: Path) -> None:
    tensors = phi3v.read_tensors(tiny_phi3v())
    del tensors["model.vision_embed_tokens.sub_GN"]
    with pytest.raises(InvalidModelFile, match=r"model\.vision_embed_tokens\.sub_GN is missing"):
        phi3v.load(copy_with(tmp_path, tensors))


def test_unexpected_tensor_is_refused_by_name(tmp_path: Path) -> None:
    tensors = phi3v.read_tensors(tiny_phi3v()) | {"model.vision_embed_tokens.extra": torch.zeros(2)}
    with pytest.raises(InvalidModelFile, match=r"model\.vision_embed_tokens\.extra is not a tensor"):
        phi3v.load(copy_with(tmp_path, tensors))


def test_wrong_shape_is_refused_by_name(tmp_path: Path) -> None:
    tensors = phi3v.read_tensors(tiny_phi3v())
    tensors["model.vision_embed_tokens.glb_GN"] = torch.zeros(1, 1, 8)
    with pytest.raises(InvalidModelFile, match=r"glb_GN has shape \(1, 1, 8\)"):
        phi3v.load(copy_with(tmp_path, tensors))


def test_text_only_checkpoint_is_refused(tmp_path: Path) -> None:
    tensors = {k: v for k, v in phi3v.read_tensors(tiny_phi3v()).items() if not k.startswith(phi3v.VISION_PREFIX)}
    with pytest.raises(InvalidModelFile, match=r"tensor model\.vision_embed_tokens\.\S+ is missing"):
        phi3v.load(copy_with(tmp_path, tensors))


@pytest.mark.parametrize(("section", "key", "value"), [
    ("embd_layer", "hd_transform_order", "glb_sub"), ("embd_layer", "use_hd_transform", False),
    ("embd_layer", "projection_cls", "linear"), ("img_processor", "model_name", "openai/clip-vit-base-patch32"),
    ("img_processor", "image_dim_out", 1024), ("img_processor", "layer_idx", 7),
])
def test_unsupported_config_is_refused_by_name(tmp_path: Path, section: str, key: str, value: Any) -> None:
    config = json.loads((tiny_phi3v() / "config.json").read_text(encoding="utf-8"))
    config[section][key] = value
    with pytest.raises(InvalidModelFile, match=f"{section}.{key}"):
        phi3v.load(copy_with(tmp_path, phi3v.read_tensors(tiny_phi3v()), config))


@pytest.mark.parametrize(("key", "value"), [("num_crops", 0), ("image_mean", [0.5, 0.5]),
                                            ("image_processor_type", "CLIPImageProcessor")])
def test_bad_processor_config_is_refused_by_name(tmp_path: Path, key: str, value: Any) -> None:
    folder = copy_with(tmp_path, phi3v.read_tensors(tiny_phi3v()))
    settings = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8")) | {key: value}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings), encoding="utf-8")
    with pytest.raises(InvalidModelFile, match=f"preprocessor_config.json: {key}"):
        phi3v.load(folder)


def test_text_logits_equal_transformers_phi3(tmp_path: Path) -> None:
    """The text side is Phi3ForCausalLM with the checkpoint's weights: transformers' own loader, given the
    text configuration and the same shards, computes the same logits."""
    from transformers import Phi3ForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer, model, _ = loaded()
    phi3v.read_config(tiny_phi3v()).text.save_pretrained(tmp_path)
    for file in tiny_phi3v().glob("model*.safetensors*"):
        shutil.copy(file, tmp_path / file.name)
    hf_logging.set_verbosity_error()  # it names every vision tensor it leaves out
    reference = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False)])
    with torch.inference_mode():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    assert ours.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.equal(ours, theirs)


def test_load_never_asks_to_run_the_checkpoints_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json's auto_map names remote code; transformers asks on stdin whether to run it unless told not to."""
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("asked on stdin"))
    assert phi3v.load(tiny_phi3v())[2].positions(picture(64, 64)) == 757


def test_tokenizer_and_seam_settings() -> None:
    tokenizer, _, encoder = loaded()
    assert encoder.bidirectional is False
    # Phi-3's tokenizer starts every piece with <s>, and the processor tokenizes the text after an image on its own;
    # the published prompts write a newline after each image tag.
    assert encoder.around() == ("", "<s>\n")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is this?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"
    for token in ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>"]:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_published_config_builds_the_published_shapes(tmp_path: Path) -> None:
    """The real Phi-3.5-vision config (no clip_config: ViT-L/14-336), built with empty weights: the names and
    shapes a loaded checkpoint must have."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG), encoding="utf-8")
    text, vision = phi3v.build(phi3v.read_config(tmp_path))
    shapes = {name: tuple(module.state_dict()[key].shape)
              for name, (module, key) in phi3v.checkpoint_names(text, vision).items()}
    clip = "model.vision_embed_tokens.img_processor.vision_model."
    assert shapes["model.vision_embed_tokens.glb_GN"] == (1, 1, 4096)
    assert shapes["model.vision_embed_tokens.sub_GN"] == (1, 1, 1, 4096)
    assert shapes["model.vision_embed_tokens.img_projection.0.weight"] == (3072, 4096)
    assert shapes["model.vision_embed_tokens.img_projection.2.weight"] == (3072, 3072)
    assert shapes[clip + "embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes[clip + "embeddings.position_embedding.weight"] == (577, 1024)
    assert shapes[clip + "encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["model.layers.31.self_attn.qkv_proj.weight"] == (3 * 3072, 3072)
    assert shapes["model.layers.31.mlp.gate_up_proj.weight"] == (2 * 8192, 3072)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (32064, 3072)
    assert not any(".wte." in name or "position_ids" in name for name in shapes)


def test_prompt_ids_follow_the_published_processor() -> None:
    """Split at <|image_1|>, each piece tokenized on its own, the image's positions written -1: so the text
    after the image starts with BOS, which is what ``around()`` tells the engine to write after them."""
    tokenizer, _, encoder = loaded()
    ids = prompt_ids(tokenizer, PROMPT, [picture(1000, 500)], 4)
    head = tokenizer("<|user|>\n")["input_ids"]
    tail = tokenizer("\nWhat is this?<|end|>\n<|assistant|>\n")["input_ids"]
    assert ids == head + [-1] * 457 + tail
    assert head[0] == tail[0] == tokenizer.bos_token_id
    assert tokenizer(encoder.around()[1], add_special_tokens=False)["input_ids"] == tail[:2]


def test_image_positions_are_causal() -> None:
    """The text model reads the image rows causally: logits before the image do not depend on it (and equal
    the text model on the same ids), logits after it do."""
    tokenizer, model, encoder = loaded()
    ids = prompt_ids(tokenizer, PROMPT, [picture(1000, 500)], 4)
    start = ids.index(-1)
    with torch.inference_mode():
        first, second = (model(inputs_embeds=phi3v.prompt_embeddings(model, encoder, ids, [picture(1000, 500, seed)]))
                         .logits[0] for seed in (5, 6))
        text = model(input_ids=torch.tensor([ids[:start]])).logits[0]
    assert torch.equal(first[:start], second[:start])
    assert torch.allclose(first[:start], text, atol=1e-5)
    assert not torch.allclose(first[-1], second[-1], atol=1e-3)


def test_greedy_with_an_image_cached_equals_recomputed() -> None:
    """transformers' generate() from the image prompt's embeddings (KV cache, positions from the embeddings'
    length) picks the tokens a full recompute at every step picks."""
    tokenizer, model, encoder = loaded()
    image = picture(500, 1000, seed=2)
    ids = prompt_ids(tokenizer, PROMPT, [image], 4)
    embeds = phi3v.prompt_embeddings(model, encoder, ids, [image])
    with torch.inference_mode():
        cached = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=6, min_new_tokens=6, do_sample=False)[0].tolist()
        recomputed: list[int] = []
        for _ in range(6):
            recomputed.append(int(model(inputs_embeds=embeds).logits[0, -1].argmax()))
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([recomputed[-1:]]))], dim=1)
    assert cached == recomputed


# --- the image side -----------------------------------------------------------------------------------------

def reference_pixels(image: media.Image, num_crops: int) -> torch.Tensor:
    """The published preprocess, written out: HD_transform (transpose, PIL bilinear resize, white padding
    split top/bottom), ToTensor, Normalize, the bicubic global view, then the crops row by row."""
    picture_ = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    transposed = picture_.width < picture_.height
    if transposed:
        picture_ = picture_.transpose(Image.Transpose.TRANSPOSE)
    width, height = picture_.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    new_width = (scale - 1) * 336
    new_height = int(new_width / ratio)
    resized = np.asarray(picture_.resize((new_width, new_height), Image.Resampling.BILINEAR))
    target = math.ceil(new_height / 336) * 336
    top = int((target - new_height) / 2)
    padded = np.full((target, new_width, 3), 255, dtype=np.uint8)
    padded[top:top + new_height] = resized
    if transposed:
        padded = padded.transpose(1, 0, 2)
    hd = (torch.from_numpy(padded.copy()).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(3, 1, 1)
    views = [F.interpolate(hd[None], size=(336, 336), mode="bicubic")[0]]
    for top_ in range(0, hd.shape[1], 336):
        for left in range(0, hd.shape[2], 336):
            views.append(hd[:, top_:top_ + 336, left:left + 336])
    return torch.stack(views)


def reference_layout(features: torch.Tensor, rows: int, columns: int, sub: torch.Tensor,
                     glb: torch.Tensor) -> torch.Tensor:
    """hd_feature_transform written position by position: the 2x2 patches of a position side by side as
    (top-left, top-right, bottom-left, bottom-right); the crops' grid row by row, each row closed by sub_GN;
    glb_GN; the global view's 12 rows, each closed by sub_GN."""
    channels = features.shape[-1]

    def position(crop: torch.Tensor, y: int, x: int) -> torch.Tensor:
        grid = crop.reshape(24, 24, channels)
        top, bottom = grid[2 * y], grid[2 * y + 1]
        return torch.cat([top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]])

    out = []
    for y in range(12 * rows):
        for x in range(12 * columns):
            out.append(position(features[1 + (y // 12) * columns + x // 12], y % 12, x % 12))
        out.append(sub.flatten())
    out.append(glb.flatten())
    for y in range(12):
        out.extend(position(features[0], y, x) for x in range(12))
        out.append(sub.flatten())
    return torch.stack(out)


@pytest.mark.parametrize(("width", "height"), [(1000, 500), (300, 2000), (777, 333)])
def test_pixels_equal_the_published_preprocess(width: int, height: int) -> None:
    image = picture(width, height, seed=width)
    ours = pixel_values(image, ProcessorConfig(num_crops=4))
    theirs = reference_pixels(image, 4)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(("rows", "columns"), [(1, 2), (3, 1), (2, 2)])
def test_hd_layout_equals_the_reference(rows: int, columns: int) -> None:
    generator = torch.Generator().manual_seed(rows * 10 + columns)
    features = torch.randn(1 + rows * columns, 576, 5, generator=generator)
    sub, glb = torch.randn(1, 1, 1, 20, generator=generator), torch.randn(1, 1, 20, generator=generator)
    layout = phi3v.hd_layout(features, rows, columns, sub, glb)
    assert layout.shape == ((rows * columns + 1) * 144 + 1 + (rows + 1) * 12, 20)
    assert torch.equal(layout, reference_layout(features, rows, columns, sub, glb))


def test_encode_equals_the_reference_on_a_non_square_image(tmp_path: Path) -> None:
    """End to end on a 2:1 image (1x2 crops): the published preprocess, CLIP's next-to-last hidden states
    (transformers' own CLIPVisionModel, loaded by its own loader from the checkpoint's CLIP tensors), the
    written-out layout, the projection."""
    from transformers import CLIPVisionModel

    encoder = loaded()[2]
    tensors = phi3v.read_tensors(tiny_phi3v())
    prefix = phi3v.VISION_PREFIX + "img_processor."  # what follows is an openai/clip-vit checkpoint's names
    phi3v.read_config(tiny_phi3v()).clip.save_pretrained(tmp_path)
    save_file({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
              str(tmp_path / "model.safetensors"))
    clip = CLIPVisionModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    image = picture(1000, 500, seed=3)
    with torch.inference_mode():
        features = clip(pixel_values=reference_pixels(image, 4), output_hidden_states=True).hidden_states[-2][:, 1:]
        layout = reference_layout(features, 1, 2, tensors[phi3v.VISION_PREFIX + "sub_GN"],
                                  tensors[phi3v.VISION_PREFIX + "glb_GN"])
        expected = encoder.embedding.img_projection(layout)
    assert torch.allclose(encoder.encode(image), expected, atol=1e-5)


def test_patch_features_are_the_next_to_last_layer() -> None:
    """layer_idx -2 of a 2-layer tower: the output of its first layer (after the embeddings and the pre-norm),
    the class token dropped; computed here layer by layer, independent of how hidden states are collected."""
    vision = loaded()[2].embedding
    tower = vision.img_processor
    pixels = pixel_values(picture(400, 300, seed=9), ProcessorConfig(num_crops=4))
    with torch.no_grad():
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))
        out = tower.encoder.layers[0](hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(vision.patch_features(pixels), hidden[:, 1:], atol=1e-6)
        assert vision.patch_features(pixels).shape == (pixels.shape[0], 576, 32)


def test_features_shape_separators_and_determinism() -> None:
    """Known separators come out at the rows the HD layout puts them: after each of the 12 * h_crop rows of
    12 * w_crop + 1, one glb_GN, after each of the global view's 12 rows of 13."""
    _, model, encoder = loaded()
    vision = encoder.embedding
    image = picture(500, 1000, seed=1)  # portrait: 2 rows x 1 column of crops under 4
    rows, columns = 2, 1
    saved = vision.sub_GN.detach().clone(), vision.glb_GN.detach().clone()
    try:
        with torch.no_grad():
            vision.sub_GN.fill_(3.0)
            vision.glb_GN.fill_(-2.0)
        out = encoder.encode(image)
        assert out.shape == (encoder.positions(image), model.config.hidden_size) and out.dtype == torch.float32
        assert torch.equal(out, encoder.encode(image))
        with torch.inference_mode():
            sub_row = vision.img_projection(vision.sub_GN.reshape(1, -1))[0]
            glb_row = vision.img_projection(vision.glb_GN.reshape(1, -1))[0]
        width = 12 * columns + 1
        sub_at = [r * width + 12 * columns for r in range(12 * rows)]
        glb_at = 12 * rows * width
        sub_at += [glb_at + 1 + r * 13 + 12 for r in range(12)]
        assert glb_at + 1 + 12 * 13 == out.shape[0]
        for index in range(out.shape[0]):
            if index in sub_at:
                assert torch.allclose(out[index], sub_row, atol=1e-5), index
            elif index == glb_at:
                assert torch.allclose(out[index], glb_row, atol=1e-5)
            else:
                assert not torch.allclose(out[index], sub_row, atol=1e-3), index
    finally:
        with torch.no_grad():
            vision.sub_GN.copy_(saved[0])
            vision.glb_GN.copy_(saved[1])
