"""Qwen2.5-VL on the transformers engine, through slm's own loop: the tiny random checkpoint
(``tests/vision_models.py``) checked against transformers' ``Qwen2_5_VLForConditionalGeneration`` on
Qwen2VLProcessor's inputs. Its M-RoPE positions part from the engine's cache columns after an image (the
image's follow its patch grid, the text after it goes on from their largest plus one), so every check has
text after the image, and the sequence operations (rewind, fork, save, restore) are checked to keep them."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import qwen_vl_checks as checks
import slm
import vision_checks
from qwen_vl_checks import SIZES, conversation, hf_inputs, hf_last, reference, within
from slm.engines import media
from slm.model import Model
from vision_checks import last_logits, picture
from vision_models import tiny_qwen2_5_vl


@functools.cache
def model() -> Model:
    return slm.load(str(tiny_qwen2_5_vl()), engine="transformers", n_ctx=1024)


@pytest.mark.parametrize("size", SIZES)
def test_the_prompt_and_the_logits_after_an_image_and_text_are_transformers(size: tuple[int, int]) -> None:
    m = model()
    image = picture(0, *size)
    tokens = m.chat_tokens(conversation(image))
    inputs = hf_inputs(image)
    image_token = reference()[1].config.image_token_id
    assert [image_token if t < 0 else t for t in tokens] == inputs["input_ids"][0].tolist()
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert sum(t < 0 for t in tokens) == t * h * w // 4 == size[0] * size[1] // 28**2
    ours = last_logits(m, tokens)
    assert within(ours, hf_last(inputs)) < 1
    assert within(last_logits(m, m.chat_tokens(conversation(picture(1, *size)))), ours) > 100  # pixels matter


def test_sequential_positions_after_an_image_are_off_by_far_more_than_the_tolerance() -> None:
    # Negative control: transformers' model given plain positions (as any text model's) is far from its own
    # M-RoPE reading; and our engine made to give plain positions is exactly that reading (positions are
    # what differs, not the mask or the rows).
    m = model()
    image = picture(2, 168, 112)
    tokens = m.chat_tokens(conversation(image))
    inputs = hf_inputs(image)
    sequential = torch.arange(len(tokens))[None, None].expand(3, 1, -1)
    plain = hf_last(inputs | {"position_ids": sequential})
    assert within(last_logits(m, tokens), plain) > 10
    engine = m.engine
    engine._grid = False  # type: ignore[attr-defined]
    try:
        assert within(last_logits(m, tokens), plain) < 1
    finally:
        engine._grid = True  # type: ignore[attr-defined]


def same(ours: np.ndarray, theirs: np.ndarray) -> bool:
    return within(ours, theirs) < 1


def test_greedy_answer_is_transformers_own_also_beside_text_and_in_small_chunks() -> None:
    checks.greedy_alone_and_beside_text(model())


def test_rows_of_one_batch_with_images_of_different_grids_equal_each_alone() -> None:
    checks.batched_rows_equal_each_alone(model(), same)


def test_rewind_after_into_and_before_an_image_then_continuing_is_a_fresh_run() -> None:
    m = model()
    engine = m.engine
    seq = engine.new_sequence()
    try:
        other = checks.rewound_after_and_before_an_image(m, seq, same)
        # into the image: the next position is one past the largest of the image positions kept, which
        # transformers' get_rope_index gives for the whole prompt
        _, hf = reference()
        whole, _ = hf.model.get_rope_index(torch.tensor([other]).clamp(min=0), (torch.tensor([other]) < 0).int(),
                                           image_grid_thw=hf_inputs(picture(8), " briefly")["image_grid_thw"])
        first = [i for i, t in enumerate(other) if t < 0][0]
        for inside in (first + 9, first + 5, first + 1):  # each rewind shortens it further
            engine.rewind(seq, inside)
            rope = engine._sequences[seq].rope  # type: ignore[attr-defined]
            assert inside + rope.delta == int(whole[:, 0, :inside].max()) + 1
    finally:
        engine.free(seq)


def test_fork_save_and_restore_keep_the_positions_past_an_image() -> None:
    checks.fork_save_and_restore_keep_the_positions_past_an_image(model(), same)


def test_a_prefix_cache_hit_past_an_image_gives_the_same_answer() -> None:
    got, alone = vision_checks.after_a_prefix_hit(model(), conversation(picture(10)))
    assert got == alone


def test_each_image_position_takes_its_grid_position() -> None:
    encoder = model().engine._images.encoder  # type: ignore[attr-defined]
    grid = encoder.grid_positions(media.load(picture(11, 168, 112)))
    assert grid.shape == (3, 24) and grid[0].eq(0).all()
    assert grid[1].tolist() == [r for r in range(4) for _ in range(6)] and grid[2].tolist() == list(range(6)) * 4
