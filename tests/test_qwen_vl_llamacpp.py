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

import qwen_vl_checks as checks
import slm
import vision_checks
from qwen_vl_checks import SIZES, continued, conversation, hf_inputs, hf_last, reference, within
from slm.errors import EngineError
from slm.model import Model
from vision_checks import last_logits, picture
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


def same(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Logits of one engine, by two paths: a tenth of the tolerance to transformers."""
    return off(ours, theirs) < 0.1


def test_greedy_answer_is_transformers_own_also_beside_text_and_in_small_chunks() -> None:
    checks.greedy_alone_and_beside_text(model())


def test_rows_of_one_batch_with_images_of_different_grids_equal_each_alone() -> None:
    checks.batched_rows_equal_each_alone(model(), same)


def test_rewind_after_and_before_an_image_then_continuing_is_a_fresh_run_and_into_one_is_refused() -> None:
    m = model()
    engine = m.engine
    seq = engine.new_sequence()
    try:
        other = checks.rewound_after_and_before_an_image(m, seq, same)
        assert off(last_logits(m, other), hf_last(hf_inputs(picture(8), " briefly"))) < 1
        first = [i for i, t in enumerate(other) if t < 0][0]
        with pytest.raises(EngineError, match="inside an image"):
            engine.rewind(seq, first + 5)
        assert engine.sequence_length(seq) == len(other)  # left as it was
        assert same(continued(m, seq, m.tokenize(" ok", False)), last_logits(m, other + m.tokenize(" ok", False)))
    finally:
        engine.free(seq)


def test_fork_save_and_restore_keep_the_positions_past_an_image() -> None:
    checks.fork_save_and_restore_keep_the_positions_past_an_image(model(), same)


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
