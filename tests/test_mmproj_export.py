"""`slm convert --to gguf` of a Gemma 3 vision-language model: a text GGUF llama.cpp runs as transformers
does, and an mmproj GGUF libmtmd loads and encodes images with as transformers does.

The model is tests/vision_models.py's tiny random Gemma 3 VLM (real tokenizer, real-shaped config). libmtmd
is reached through llama-cpp-python's own ctypes bindings (``llama_cpp.mtmd_cpp``), so what is checked is
the converted files, read by llama.cpp's code, not an slm adapter around them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from llama_cpp import Llama
from llama_cpp import mtmd_cpp as mt
from PIL import Image
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

import slm
from slm.store.catalog import resolve
from slm.tools.convert import convert
from vision_models import (
    GEMMA3_TEXT,
    IMAGE_TOKEN,
    MM_TOKENS_PER_IMAGE,
    SIGLIP,
    converted_tiny_gemma3_vlm,
    tiny_gemma3_vlm,
)

TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
SIZE = SIGLIP["image_size"]


@pytest.fixture(scope="module")
def folder() -> Path:
    return tiny_gemma3_vlm()


@pytest.fixture(scope="module")
def converted() -> tuple[Path, Path]:
    return converted_tiny_gemma3_vlm()


@pytest.fixture(scope="module")
def reference(folder: Path) -> Any:
    return Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(folder: Path) -> Any:
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def text_model(converted: tuple[Path, Path]) -> Iterator[Llama]:
    llm = Llama(str(converted[0]), n_ctx=512, n_threads=2, logits_all=True, flash_attn=False, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def projector(converted: tuple[Path, Path], text_model: Llama) -> Iterator[Any]:
    params = mt.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    ctx = mt.mtmd_init_from_file(str(converted[1]).encode(), text_model.model, params)
    assert ctx, "libmtmd could not load the converted mmproj"
    yield ctx
    mt.mtmd_free(ctx)


def image() -> Image.Image:
    """Random pixels at the model's own size, so neither side resizes."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_the_text_gguf_computes_as_transformers(converted: tuple[Path, Path], reference: Any, processor: Any,
                                                text_model: Llama) -> None:
    assert converted[0].is_file() and converted[1].is_file()
    for text in TEXTS:
        ids = processor.tokenizer.encode(text)  # <bos> first, as Gemma wants
        assert text_model.tokenize(text.encode(), add_bos=True, special=True) == ids
        text_model.reset()
        text_model.eval(ids)
        ours = np.asarray(text_model.scores[len(ids) - 1])
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids])).logits[0, -1].float().numpy()
        scale = float(np.abs(theirs).max())
        assert scale > 1.0  # not a flat, trivially matched output
        np.testing.assert_allclose(ours, theirs, atol=2e-3 * scale)


def test_the_mmproj_loads_as_gemma3_vision(projector: Any) -> None:
    assert mt.mtmd_support_vision(projector)
    assert mt.mtmd_decode_use_non_causal(projector, None)  # Gemma 3 attends both ways within an image


def test_an_image_becomes_the_tokens_and_embeddings_transformers_makes(projector: Any, reference: Any,
                                                                       processor: Any) -> None:
    picture = image()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=picture, return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    expected_tokens = int((inputs["input_ids"] == image_token).sum())
    with torch.inference_mode():
        expected = reference.get_image_features(inputs["pixel_values"]).pooler_output[0].float().numpy()

    chunk_tokens, embeddings = _encode(projector, f"What is in {mt.mtmd_default_marker().decode()}?", picture)
    assert chunk_tokens == expected_tokens == expected.shape[0] == MM_TOKENS_PER_IMAGE
    assert embeddings.shape == expected.shape == (MM_TOKENS_PER_IMAGE, reference.config.text_config.hidden_size)
    scale = float(np.abs(expected).max())
    assert scale > 0.1  # the random projector makes embeddings of some size, not zeros
    np.testing.assert_allclose(embeddings, expected, atol=2e-3 * scale)


def _encode(ctx: Any, text: str, picture: Image.Image) -> tuple[int, np.ndarray]:
    """The one image chunk libmtmd makes of ``text`` with ``picture`` at its marker: its token count, and
    its embeddings (tokens, text width)."""
    rgb = picture.tobytes()
    bitmap = mt.mtmd_bitmap_init(picture.width, picture.height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
    chunks = mt.mtmd_input_chunks_init()
    try:
        encoded = text.encode()
        prompt = mt.mtmd_input_text(text=encoded, text_len=len(encoded), add_special=True, parse_special=True)
        bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mt.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), bitmaps, 1) == 0
        found = [mt.mtmd_input_chunks_get(chunks, i) for i in range(mt.mtmd_input_chunks_size(chunks))]
        images = [c for c in found if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        n_tokens = mt.mtmd_input_chunk_get_n_tokens(images[0])
        assert mt.mtmd_encode_chunk(ctx, images[0]) == 0
        width = int(GEMMA3_TEXT["hidden_size"])
        out = np.ctypeslib.as_array(mt.mtmd_get_output_embd(ctx), shape=(n_tokens * width,))
        return n_tokens, out.reshape(n_tokens, width).copy()
    finally:
        mt.mtmd_input_chunks_free(chunks)
        mt.mtmd_bitmap_free(bitmap)


def test_a_vision_language_model_slm_does_not_convert_is_refused_by_name(tmp_path: Path) -> None:
    """LLaVA (a CLIP tower and an MLP projector on a Llama): refused from its configuration, nothing written."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=300)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision)).save_pretrained(
        tmp_path / "llava")
    with pytest.raises(slm.InvalidParameter, match=r"vision tower \(clip_vision_model\) and projector of llava"):
        convert(resolve(str(tmp_path / "llava")), "gguf", output=tmp_path / "llava.gguf", precision="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]
