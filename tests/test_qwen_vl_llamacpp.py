"""Qwen2.5-VL on llama.cpp through slm's own loop: the tiny random checkpoint converted by slm (a qwen2vl GGUF
and its mmproj) and read by libmtmd, checked against transformers' forward of the same weights.

The model takes M-RoPE positions: an image's tokens a time, a row and a column each (libmtmd decodes them), and
the text after it goes on from the larger side of the image's grid, not from its token count. The engine keeps
each sequence's images that take fewer positions than tokens, so a rewind, a fork, a save and a restore put
the next token where transformers' ``get_rope_index`` does; every check has text after the image."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import slm
import vision_checks
from qwen_vl_reference import SIZES, conversation, hf_inputs, hf_last, reference, within
from slm.errors import EngineError
from slm.generation.params import GenerationParams
from slm.model import Model
from vision_checks import beside_text, last_logits, picture
from vision_models import converted_tiny_qwen2_5_vl

TOLERANCE = 2e-3
"""Of transformers' largest logit, as for Gemma 3 on llama.cpp: ggml's kernels sum in another order."""


@functools.cache
def model() -> Model:
    text, projector = converted_tiny_qwen2_5_vl()
    assert projector.is_file()
    return slm.load(str(text), n_ctx=1024)  # the mmproj beside it is found by its name


def off(ours: np.ndarray, theirs: np.ndarray) -> float:
    return within(ours, theirs, TOLERANCE)


@pytest.mark.parametrize("size", [*SIZES, (224, 112)])
def test_the_prompt_and_the_logits_after_an_image_and_text_are_transformers(size: tuple[int, int]) -> None:
    m = model()
    image = picture(0, *size)
    tokens = m.chat_tokens(conversation(image))
    inputs = hf_inputs(image)
    image_token = reference()[1].config.image_token_id
    assert [image_token if t < 0 else t for t in tokens] == inputs["input_ids"][0].tolist()
    assert sum(t < 0 for t in tokens) == size[0] * size[1] // 28**2
    ours = last_logits(m, tokens)
    assert off(ours, hf_last(inputs)) < 1
    assert off(last_logits(m, m.chat_tokens(conversation(picture(1, *size)))), ours) > 5  # pixels matter


def test_sequential_positions_after_an_image_break_the_tolerance() -> None:
    # Negative control: transformers' model given plain positions (as if the image took one per token) is
    # outside the tolerance from ours, and more than twice as far as its own M-RoPE reading. The tiny random
    # model's attention is nearly uniform, so positions move its logits little: the largest image (64 tokens,
    # 8 positions) gives the widest gap.
    m = model()
    image = picture(3, 224, 224)
    tokens = m.chat_tokens(conversation(image))
    ours = last_logits(m, tokens)
    sequential = torch.arange(len(tokens))[None, None].expand(3, 1, -1)
    inputs = hf_inputs(image)
    right, plain = off(ours, hf_last(inputs)), off(ours, hf_last(inputs | {"position_ids": sequential}))
    assert right < 1 < plain and plain > 2 * right


def test_greedy_answer_is_transformers_own_also_beside_text_and_in_small_chunks() -> None:
    m = model()
    image = picture(3, 168, 112)
    inputs = hf_inputs(image)
    with torch.no_grad():
        out = reference()[1].generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
    params = GenerationParams(temperature=0, max_tokens=8)
    assert m.chat(conversation(image), params).tokens == theirs
    text_params = GenerationParams(temperature=0, max_tokens=20)
    for chunk in (4, 64):  # 4: the prompt's text in chunks of 4 (the image whole, in a chunk of its own)
        got = beside_text(m, m.chat_tokens(conversation(image)), params, chunk, text_params)
        assert got == (vision_checks.alone(m, text_params), theirs)


def test_rows_of_one_batch_with_images_of_different_grids_equal_each_alone() -> None:
    m = model()
    two = [{"role": "user", "content": [{"type": "image", "image": picture(4)}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": picture(5, 168, 112)},
                                        {"type": "text", "text": "which is larger?"}]}]
    prompts = [m.chat_tokens(conversation(picture(6, 168, 112))), m.chat_tokens([{"role": "user", "content": "Hi"}]),
               m.chat_tokens(two)]
    alone = [last_logits(m, tokens) for tokens in prompts]
    seqs = [m.engine.new_sequence() for _ in prompts]
    try:
        batched = m.engine.evaluate(list(zip(seqs, prompts, strict=True)))
    finally:
        for seq in seqs:
            m.engine.free(seq)
    for one, row in zip(alone, batched, strict=True):
        assert off(row, one) < 0.1


def continued(m: Model, seq: int, more: list[int]) -> np.ndarray:
    return m.engine.evaluate([(seq, more)])[0]


def test_rewind_after_and_before_an_image_then_continuing_is_a_fresh_run_and_into_one_is_refused() -> None:
    m = model()
    engine = m.engine
    tokens = m.chat_tokens(conversation(picture(7, 168, 112)))
    image = [i for i, t in enumerate(tokens) if t < 0]
    other = m.chat_tokens(conversation(picture(8), after=" briefly"))  # another image, another grid
    more = m.tokenize(" and its colours?", False)
    seq = engine.new_sequence()
    try:
        engine.evaluate([(seq, tokens)])
        with pytest.raises(EngineError, match="inside an image"):
            engine.rewind(seq, image[0] + 5)
        assert engine.sequence_length(seq) == len(tokens)  # left as it was
        cut = image[-1] + 4  # in the text after the image
        engine.rewind(seq, cut)
        assert off(continued(m, seq, more), last_logits(m, tokens[:cut] + more)) < 0.1
        # before the image: its <|vision_start|> stays, a different image of another grid follows
        engine.rewind(seq, image[0])
        assert off(continued(m, seq, other[image[0] :]), last_logits(m, other)) < 0.1
        assert off(last_logits(m, other), hf_last(hf_inputs(picture(8), " briefly"))) < 1
    finally:
        engine.free(seq)


def test_fork_save_and_restore_keep_the_positions_past_an_image() -> None:
    m = model()
    engine = m.engine
    tokens = m.chat_tokens(conversation(picture(9, 168, 112)))
    more = m.tokenize(" and its colours?", False)
    fresh = last_logits(m, tokens + more)
    seq = engine.new_sequence()
    try:
        engine.evaluate([(seq, tokens)])
        fork = engine.fork(seq)
        saved = engine.save(seq)
        assert off(continued(m, seq, more), fresh) < 0.1  # the parent goes on; the fork and the save do not move
        assert off(continued(m, fork, more), fresh) < 0.1
        engine.free(fork)
        restored = engine.restore(saved)
        assert off(continued(m, restored, more), fresh) < 0.1
        engine.free(restored)
    finally:
        engine.free(seq)


def test_a_prefix_cache_hit_past_an_image_gives_the_same_answer() -> None:
    got, alone = vision_checks.after_a_prefix_hit(model(), conversation(picture(10)))
    assert got == alone


def test_the_converter_refuses_a_qwen_vision_tower_llama_cpp_would_run_otherwise(tmp_path: Path) -> None:
    from slm.store.catalog import resolve
    from slm.tools.convert import convert
    from vision_models import tiny_qwen2_5_vl

    folder = tmp_path / "wide-windows"
    config = (tiny_qwen2_5_vl() / "config.json").read_text()
    folder.mkdir()
    for item in tiny_qwen2_5_vl().iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(config.replace('"window_size": 112', '"window_size": 224'))
    with pytest.raises(slm.InvalidParameter, match=r"window_size is not what llama.cpp's encoder runs \(112\)"):
        convert(resolve(str(folder)), "gguf", output=tmp_path / "out.gguf", precision="fp32")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "mmproj-out.gguf").exists()
