"""Phi-3.5-vision on ONNX Runtime GenAI (engines/onnx_images, tools/phi3v_onnx): the tiny random Phi-3.5-vision
of tests/phi3v_models.py, converted by slm into a phi3v folder (decoder by the model builder, vision and
embedding exported from slm's PyTorch composition), run through slm's loop and checked against that
composition (slm.engines.phi3v: its processor, CLIP tower and HD layout, Phi3ForCausalLM on inputs_embeds)."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import slm
import vision_checks
from phi3v_models import tiny_phi3v
from slm.engines import media, phi3v
from slm.engines.onnx import OnnxGenAIEngine
from slm.engines.onnx_images import _png
from slm.engines.phi3v_processor import ProcessorConfig, crop_grid
from slm.errors import EngineError, InvalidModelFile, InvalidParameter
from slm.generation.params import GenerationParams
from slm.model import Model
from slm.serving.scheduler import Scheduler
from slm.store.catalog import resolve
from slm.tools.convert import convert
from slm.tools.phi3v_onnx import write_text_part

SIZES = [(336, 336), (1000, 500), (500, 1000), (64, 64), (2000, 300), (300, 2000), (777, 333)]
CONTEXT = 6144
ASK = "What is in this picture?"


@functools.cache
def converted() -> Path:
    """The tiny Phi-3.5-vision as a phi3v folder, written by slm's converter once per test process."""
    out = Path(tempfile.mkdtemp(prefix="slm-tiny-phi3v-onnx-")) / "tiny-phi3v-onnx-fp32"
    return convert(resolve(str(tiny_phi3v())), "onnx", output=out, precision="fp32")


@functools.cache
def model() -> Model:
    return slm.load(str(converted()), n_ctx=CONTEXT, max_sequences=4)


@functools.cache
def onnx_processor() -> Any:
    return og.Model(str(converted())).create_multimodal_processor()


@functools.cache
def composition() -> tuple[Any, Any, phi3v.ImageEncoder]:
    """(tokenizer, Phi3ForCausalLM, ImageEncoder) of the same checkpoint, cutting images into up to 16 crops as
    ONNX Runtime GenAI's processor always does (the checkpoint's preprocessor_config.json says 4)."""
    tokenizer, text, encoder = phi3v.load(tiny_phi3v())
    return tokenizer, text, phi3v.ImageEncoder(encoder.embedding, ProcessorConfig(num_crops=16), encoder.around()[1])


def picture(width: int, height: int, seed: int = 0) -> media.Image:
    return media.load(vision_checks.picture(seed, width, height))


def conversation(*images: media.Image) -> list[dict[str, Any]]:
    parts = [{"type": "image", "image": Image.frombytes("RGB", (i.width, i.height), i.rgb)} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": ASK}]}]


def onnx_pixels(image: media.Image) -> torch.Tensor:
    """The crops ONNX Runtime GenAI's processor makes of ``image`` (global view first), unpadded."""
    made = onnx_processor()("<|image_1|>", images=og.Images.open_bytes(_png(image)))
    rows, columns = crop_grid(image.width, image.height, 16)
    return torch.from_numpy(made["pixel_values"].as_numpy()[0, : 1 + rows * columns])


def reference_embeds(tokens: list[int], images: list[media.Image], pixels: str = "own") -> torch.Tensor:
    """The composition's input embeddings of ``tokens`` (placeholders: the images' rows, in order), the images
    made into crops by its own processor (``own``) or by ONNX Runtime GenAI's (``onnx``). (1, T, H)"""
    _, text, encoder = composition()
    with torch.no_grad():
        embeds = text.model.embed_tokens(torch.tensor([max(t, 0) for t in tokens]))  # (T, H)
        rows = [encoder.encode(image) if pixels == "own" else
                encoder.embedding(onnx_pixels(image), *crop_grid(image.width, image.height, 16)) for image in images]
        embeds[torch.tensor([t < 0 for t in tokens])] = torch.cat(rows)
    return embeds[None]


def reference_logits(tokens: list[int], images: list[media.Image], pixels: str = "own") -> np.ndarray:
    """The composition's logits after the last of ``tokens``. (V,)"""
    with torch.no_grad():
        return composition()[1](inputs_embeds=reference_embeds(tokens, images, pixels)).logits[0, -1].numpy()


def images_in(tokens: list[int]) -> int:
    return sum(1 for _, _, image in media.runs(tokens) if image is not None)


# --- what the conversion writes -----------------------------------------------------------------------------

def test_the_folder_is_a_phi3v_folder_of_three_models() -> None:
    folder = converted()
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    assert config["type"] == "phi3v"
    assert (config["decoder"]["filename"], config["embedding"]["filename"], config["vision"]["filename"]) == (
        "model.onnx", "embedding.onnx", "vision.onnx")
    assert config["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds"  # the builder's exclude_embeds
    transform = json.loads((folder / "processor_config.json").read_text())["processor"]["transforms"][-1]
    assert transform["operation"]["type"] == "Phi3ImageTransform"
    assert transform["operation"]["attrs"] == {"num_crops": 4, "num_img_tokens": 144}  # the checkpoint's
    assert not list(folder.parent.glob("*.part"))
    assert model().takes_images and model().info.architecture == "phi3v"
    engine = OnnxGenAIEngine(folder)
    try:  # by default, room for the largest image (2,653 positions) and a question
        assert engine.info.context_length == 4096
    finally:
        engine.close()


# --- image positions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("width", "height"), SIZES)
def test_an_image_takes_as_many_positions_as_the_composition_gives_it(width: int, height: int) -> None:
    image = picture(width, height)
    tokens = model().engine.tokenize_with_images(f"{model().engine.image_marker}{ASK}", [image])
    assert sum(t < 0 for t in tokens) == composition()[2].positions(image)


def test_onnx_runtime_genai_cuts_up_to_16_crops_whatever_the_processor_config_says() -> None:
    """Its phi3v processor (onnxruntime-extensions' Phi3ImageTransform) ignores num_crops: a 1000x500 image is
    1x2 crops under the checkpoint's 4 (457 positions) and 3x5 under 16."""
    image = picture(1000, 500)
    tokens = model().engine.tokenize_with_images(model().engine.image_marker, [image])
    four = phi3v.ImageEncoder(composition()[2].embedding, ProcessorConfig(num_crops=4))
    assert four.positions(image) == 457
    assert sum(t < 0 for t in tokens) == composition()[2].positions(image) == (15 + 1) * 144 + 1 + (3 + 1) * 12


def test_prompt_ids_are_onnx_runtime_genai_processors_own_but_for_the_bos_of_each_piece() -> None:
    """The text between images is tokenized piece by piece, each with a BOS as the published processor's
    tokenizer call adds it (the composition writes the same, ``around``); ONNX Runtime GenAI's processor splits
    the prompt the same way, with its own tokenizer, which adds no BOS for this test tokenizer (a template
    post-processor adds it, which onnxruntime-extensions does not read)."""
    m = model()
    one, two = picture(336, 336, 1), picture(500, 300, 2)
    prompt = m.apply_chat_template([{"role": "user", "content": f"{m.engine.image_marker}Compare with"
                                     f"{m.engine.image_marker}{ASK}"}])
    ours = m.engine.tokenize_with_images(prompt, [one, two], add_special=True)
    bos = composition()[0].bos_token_id
    assert ours.count(bos) == 3 and ours[0] == bos
    assert [t for i, t in enumerate(ours) if i and t >= 0 and ours[i - 1] < 0] == [bos, bos]  # after each image
    processor = onnx_processor()
    # slm writes the newline after each image that the model card's prompts put after each tag
    tagged = prompt.replace(m.engine.image_marker, "<|image_1|>\n", 1).replace(m.engine.image_marker, "<|image_2|>\n")
    theirs = processor(tagged, images=og.Images.open_bytes(_png(one), _png(two)))["input_ids"].as_numpy()[0]
    numbers = [image for _, _, image in media.runs(ours) if image is not None]
    assert [t if t >= 0 else -(numbers.index(media.placeholder(t)[0]) + 1) for t in ours if t != bos] == theirs.tolist()


# --- logits and greedy text --------------------------------------------------------------------------------

@pytest.mark.parametrize(("width", "height"), [(336, 336), (1000, 500), (300, 2000)])
def test_logits_after_an_image_match_the_composition(width: int, height: int) -> None:
    """Given the same crops, the three ONNX models equal the composition (1e-5 of the logit scale). ONNX Runtime
    GenAI's processor makes the global view with an antialiased bicubic resize where the published processor
    interpolates without antialiasing (the crops are the same pixels), which moves the logits by under 2%."""
    image = picture(width, height)
    tokens = model().chat_tokens(conversation(image))
    ours = vision_checks.last_logits(model(), tokens)
    same_pixels = reference_logits(tokens, [image], pixels="onnx")
    scale = float(np.abs(same_pixels).max())
    assert float(np.abs(ours - same_pixels).max()) < 1e-5 * scale
    own_pixels = reference_logits(tokens, [image])
    assert float(np.abs(ours - own_pixels).max()) < 2e-2 * scale
    other = vision_checks.last_logits(model(), model().chat_tokens(conversation(picture(width, height, seed=9))))
    assert float(np.abs(other - ours).max()) > 1e-3 * scale  # the image's pixels matter


def test_two_images_take_their_places_in_order() -> None:
    one, two = picture(336, 336, 3), picture(700, 300, 4)
    tokens = model().chat_tokens(conversation(one, two))
    assert images_in(tokens) == 2
    ours = vision_checks.last_logits(model(), tokens)
    theirs = reference_logits(tokens, [one, two], pixels="onnx")
    assert float(np.abs(ours - theirs).max()) < 1e-5 * float(np.abs(theirs).max())
    swapped = reference_logits(model().chat_tokens(conversation(two, one)), [two, one], pixels="onnx")
    assert float(np.abs(ours - swapped).max()) > 1e-3 * float(np.abs(theirs).max())


def test_greedy_answer_about_an_image_is_the_compositions_own() -> None:
    """slm's loop on the ONNX folder, and a greedy loop on the composition (its own processor's crops)."""
    image = picture(800, 600, 5)
    answer = model().chat(conversation(image), temperature=0, max_tokens=8)
    text = composition()[1]
    theirs: list[int] = []
    with torch.no_grad():
        out = text(inputs_embeds=reference_embeds(model().chat_tokens(conversation(image)), [image]), use_cache=True)
        for _ in range(8):
            theirs.append(int(out.logits[0, -1].argmax()))
            out = text(input_ids=torch.tensor([theirs[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    assert answer.tokens == theirs


# --- prefill in chunks, rewinding, forking -----------------------------------------------------------------

def test_chunks_rewinds_and_forks_give_the_logits_of_one_run() -> None:
    """An image in a later chunk than text (a new Generator over the whole sequence), a rewind (ONNX Runtime
    GenAI cannot rewind a phi3v Generator) and a fork all give what one run gives."""
    engine = model().engine
    tokens = model().chat_tokens(conversation(picture(336, 336, 6)))
    whole = vision_checks.last_logits(model(), tokens)
    seq = engine.new_sequence()
    try:
        engine.evaluate([(seq, tokens[:2])])  # text only
        end = media.chunk_end(tokens[2:], 4) + 2  # the image, whole, and a token after it
        engine.evaluate([(seq, tokens[2:end])])
        chunked = engine.evaluate([(seq, tokens[end:])])[0]
        assert float(np.abs(chunked - whole).max()) < 1e-4 * float(np.abs(whole).max())
        step = engine.evaluate([(seq, [int(whole.argmax())])])[0]
        engine.rewind(seq, len(tokens) - 1)
        again = engine.evaluate([(seq, [tokens[-1]])])[0]
        assert float(np.abs(again - whole).max()) < 1e-4 * float(np.abs(whole).max())
        fork = engine.fork(seq)
        try:
            forked = engine.evaluate([(fork, [int(whole.argmax())])])[0]
        finally:
            engine.free(fork)
        assert float(np.abs(forked - step).max()) < 1e-4 * float(np.abs(step).max())
    finally:
        engine.free(seq)


def test_a_chunk_that_splits_an_image_is_refused_and_the_sequence_left_as_it_was() -> None:
    engine = model().engine
    tokens = model().chat_tokens(conversation(picture(336, 336, 6)))
    inside = next(i for i, t in enumerate(tokens) if t < 0) + 3
    seq = engine.new_sequence()
    try:
        with pytest.raises(EngineError, match="part of an image"):
            engine.evaluate([(seq, tokens[:inside])])
        assert engine.sequence_length(seq) == 0
    finally:
        engine.free(seq)


def test_the_scheduler_reads_an_image_beside_a_text_stream_in_small_chunks() -> None:
    m = model()
    image = picture(640, 480, 7)
    params = GenerationParams(temperature=0, max_tokens=5)
    alone = m.chat(conversation(image), params).tokens
    text_params = GenerationParams(temperature=0, max_tokens=12)
    text, answer = vision_checks.beside_text(m, m.chat_tokens(conversation(image)), params, 4, text_params)
    assert answer == alone and text == vision_checks.alone(m, text_params)


def test_a_repeated_image_is_read_from_the_prefix_cache_with_the_same_answer() -> None:
    """A cached sequence is restored by running its tokens, image included, as a new Generator's first run."""
    m = model()
    image = picture(500, 400, 8)
    params = GenerationParams(temperature=0, max_tokens=4)
    scheduler = Scheduler(m.engine, max_batch_tokens=512)
    answers: list[list[int]] = []
    try:
        for _ in range(2):
            got: list[int] = []
            errors: list[Exception] = []
            scheduler.submit(m.chat_tokens(conversation(image)), params,
                             lambda chunk, got=got: got.extend([chunk.token] if chunk.token is not None else []),
                             errors.append)
            while scheduler.step():
                pass
            assert not errors
            answers.append(got)
        stats = scheduler.stats()
    finally:
        scheduler.stop(timeout=60)
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_hit_tokens"] > 2000  # the image's positions
    assert answers[0] == answers[1] == m.chat(conversation(image), params).tokens


# --- bad input ---------------------------------------------------------------------------------------------

def test_an_image_to_a_text_only_onnx_model_is_refused_by_name(tmp_path: Path) -> None:
    write_text_part(tiny_phi3v(), tmp_path / "phi3")
    text_only = convert(resolve(str(tmp_path / "phi3")), "onnx", output=tmp_path / "phi3-onnx", precision="fp32")
    with slm.load(str(text_only), n_ctx=512) as m:
        assert not m.takes_images
        with pytest.raises(InvalidParameter, match="does not take images") as caught:
            m.chat(conversation(picture(64, 64)), max_tokens=2)
        assert caught.value.field == "messages[0].content[0]"
        engine = OnnxGenAIEngine(text_only, n_ctx=512)
        try:
            with pytest.raises(InvalidParameter, match="text-only ONNX Runtime GenAI model"):
                engine.tokenize_with_images("<|image|>x", [picture(64, 64)])
        finally:
            engine.close()


def test_more_images_than_places_for_them_is_refused() -> None:
    engine = model().engine
    with pytest.raises(InvalidParameter, match="2 images for 1 places"):
        engine.tokenize_with_images(f"{engine.image_marker} {ASK}", [picture(64, 64), picture(64, 64, 1)])


@pytest.mark.parametrize("kind", ["gemma3", "qwen2_5_vl", "phi4mm"])
def test_a_multimodal_folder_slm_does_not_drive_is_refused_by_its_type(kind: str, tmp_path: Path) -> None:
    config = json.loads((converted() / "genai_config.json").read_text())
    config["model"]["type"] = kind
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelFile, match=f"'{kind}' folder, which slm does not drive"):
        OnnxGenAIEngine(tmp_path)


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    """The vision side fails after the builder has written the decoder: no folder, no .part."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in tiny_phi3v().iterdir():
        if "safetensors" not in file.name:
            shutil.copy(file, broken / file.name)
    tensors = phi3v.read_tensors(tiny_phi3v())
    del tensors["model.vision_embed_tokens.sub_GN"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(broken / "model.safetensors"))
    with pytest.raises(InvalidModelFile, match=r"model\.vision_embed_tokens\.sub_GN is missing"):
        convert(resolve(str(broken)), "onnx", output=tmp_path / "out", precision="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
