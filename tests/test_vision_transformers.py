"""Images on the transformers engine through slm's own loop: the tiny random Gemma 3 VLM's folder, checked
against transformers' own forward and generate() on the processor's inputs, and against the llama.cpp engine
on the same weights converted by slm (GGUF + mmproj); a tiny random LLaVA and Idefics3 (SmolVLM's
architecture) the same way against transformers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slm
import vision_checks
from slm.engines import TakesImages, media, vision
from slm.engines.transformers import IMAGE_MARKER
from slm.errors import EngineError, InvalidModelFile, InvalidParameter
from slm.generation.params import GenerationParams
from slm.model import Model
from vision_checks import beside_text, last_logits, picture
from vision_models import converted_tiny_gemma3_vlm, tiny_gemma3_vlm, tiny_idefics3, tiny_llava, tiny_smolvlm

ASK = "Describe this:"


def conversation(image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": ASK}, {"type": "image", "image": image}]}]


@functools.cache
def model() -> Model:
    return slm.load(str(tiny_gemma3_vlm()), engine="transformers", n_ctx=512)


@functools.cache
def reference() -> tuple:
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    folder = tiny_gemma3_vlm()
    processor = AutoProcessor.from_pretrained(folder)
    hf = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return processor, hf


def hf_inputs(turn: list[dict], images: list[Image.Image]) -> dict:
    processor, _ = reference()
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    # The template writes <bos> itself; the processor would add a second one.
    return dict(processor(text=prompt, images=images, return_tensors="pt", add_special_tokens=False))


def one_image_inputs(image: Image.Image) -> dict:
    return hf_inputs([{"role": "user", "content": [{"type": "text", "text": ASK}, {"type": "image"}]}], [image])


def within(ours: np.ndarray, theirs: np.ndarray) -> float:
    """How far ours are from theirs, in units of the tolerance (2e-3 of their largest logit)."""
    return float(np.abs(ours - theirs[: len(ours)]).max()) / (2e-3 * float(np.abs(theirs).max()))


def test_the_prompt_holds_the_image_where_and_as_long_as_transformers_puts_it() -> None:
    m = model()
    tokens = m.chat_tokens(conversation(picture(0)))
    image_token = reference()[1].config.image_token_index
    assert [image_token if t < 0 else t for t in tokens] == one_image_inputs(picture(0))["input_ids"][0].tolist()
    assert sum(t < 0 for t in tokens) == 16 and m.takes_images and isinstance(m.engine, TakesImages)


def test_logits_after_an_image_match_transformers_and_attention_over_it_must_be_both_ways() -> None:
    m = model()
    image = picture(0)
    tokens = m.chat_tokens(conversation(image))
    ours = last_logits(m, tokens)
    inputs = one_image_inputs(image)
    _, hf = reference()
    with torch.no_grad():
        theirs = hf(**inputs).logits[0, -1].numpy()
        causal = hf(**(inputs | {"token_type_ids": torch.zeros_like(inputs["token_type_ids"])})).logits[0, -1].numpy()
    assert within(ours, theirs) < 1
    # Negative control: the image read causally, as text is, is off by far more than the tolerance; and our
    # own engine reading it causally is exactly transformers' causal reading (the mask is what differs).
    assert within(ours, causal) > 10
    encoder = m.engine._images.encoder  # type: ignore[attr-defined]
    encoder.bidirectional = False
    try:
        assert within(last_logits(m, tokens), causal) < 1
    finally:
        encoder.bidirectional = True
    other = last_logits(m, m.chat_tokens(conversation(picture(1))))
    assert within(other, ours) > 10  # the image's pixels matter


def test_an_image_past_the_sliding_window_matches_transformers() -> None:
    # 512-position windows: the image's own positions lose the prompt's first keys in sliding layers, and
    # the last token sees the image only through the full-attention layer.
    with slm.load(str(tiny_gemma3_vlm()), engine="transformers", n_ctx=2048) as m:
        long = " ".join(f"w{i}" for i in range(160))
        turn = [{"role": "user", "content": [{"type": "text", "text": long}, {"type": "image", "image": picture(9)},
                                             {"type": "text", "text": long}]}]
        tokens = m.chat_tokens(turn)
        first = next(i for i, t in enumerate(tokens) if t < 0)
        assert first > 512 and len(tokens) - first > 512
        ours = last_logits(m, tokens)
    inputs = hf_inputs([{"role": "user", "content": [{"type": "text", "text": long}, {"type": "image"},
                                                     {"type": "text", "text": long}]}], [picture(9)])
    with torch.no_grad():
        theirs = reference()[1](**inputs).logits[0, -1].numpy()
    assert within(ours, theirs) < 1


def test_images_in_several_rows_of_one_batch_equal_each_alone() -> None:
    m = model()
    prompts = [m.chat_tokens(conversation(picture(15))), m.chat_tokens([{"role": "user", "content": "Hi"}]),
               m.chat_tokens([{"role": "user", "content": [{"type": "image", "image": picture(16)},
                                                           {"type": "text", "text": "and a longer question"},
                                                           {"type": "image", "image": picture(15)}]}])]
    alone = [last_logits(m, tokens) for tokens in prompts]
    gens = [m.generator(temperature=0) for _ in prompts]
    try:
        for gen, tokens in zip(gens, prompts, strict=True):
            gen.append_tokens(tokens)
        batched = m.engine.evaluate([(gen.seq, tokens) for gen, tokens in zip(gens, prompts, strict=True)])
    finally:
        for gen in gens:
            gen.close()
    for one, row in zip(alone, batched, strict=True):
        assert within(row, one) < 1


def test_greedy_answer_about_an_image_is_transformers_own() -> None:
    image = picture(2)
    ours = model().chat(conversation(image), temperature=0, max_tokens=8)
    inputs = one_image_inputs(image)
    with torch.no_grad():
        out = reference()[1].generate(**inputs, max_new_tokens=8, do_sample=False)
    assert ours.tokens == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_greedy_answer_about_an_image_is_the_llamacpp_engines_on_the_converted_model() -> None:
    text, _projector = converted_tiny_gemma3_vlm()
    with slm.load(str(text), engine="llamacpp", n_ctx=512) as gguf:
        image = picture(2)
        theirs_tokens = gguf.chat_tokens(conversation(image))
        theirs = gguf.chat(conversation(image), temperature=0, max_tokens=8).tokens
    ours_tokens = model().chat_tokens(conversation(image))
    assert [max(t, -1) for t in ours_tokens] == [max(t, -1) for t in theirs_tokens]
    assert model().chat(conversation(image), temperature=0, max_tokens=8).tokens == theirs


def test_the_same_image_keeps_its_number_and_is_encoded_once() -> None:
    m = model()
    first, again = m.chat_tokens(conversation(picture(3))), m.chat_tokens(conversation(picture(3)))
    assert first == again and first != m.chat_tokens(conversation(picture(4)))
    images = m.engine._images  # type: ignore[attr-defined]
    number = media.placeholder(next(t for t in first if t < 0))[0]
    last_logits(m, first)
    encoded = images._encoded[number]
    assert number not in images._waiting  # its pixels are let go once encoded
    last_logits(m, again)
    assert images._encoded[number] is encoded
    assert m.chat_tokens(conversation(picture(3))) == first  # still the same number


class CountingEncoder:
    """Two positions an image, rows of its first byte; counts what it encodes (for ``Images``' bookkeeping)."""

    bidirectional = False

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def around(self) -> tuple[str, str]:
        return "", ""

    def positions(self, image: media.Image) -> int:
        return 2

    def encode(self, image: media.Image) -> torch.Tensor:
        self.encoded.append(image.digest)
        return torch.full((2, 4), float(image.rgb[0]))


def test_images_are_numbered_held_until_encoded_then_kept_as_rows_within_their_limits() -> None:
    encoder = CountingEncoder()
    images = vision.Images(encoder)
    many = [media.Image.of_pixels(1, 1, bytes([i, 0, 0])) for i in range(vision.HELD_IMAGES + 1)]

    def number(image: media.Image) -> int:
        ids = images.tokenize(IMAGE_MARKER, IMAGE_MARKER, [image], lambda text, special: [], False)
        return media.placeholder(ids[0])[0]

    numbers = [number(image) for image in many]
    assert numbers == list(range(len(many)))
    with pytest.raises(EngineError, match="no longer holds"):  # the first was dropped before it was encoded
        images.rows(0, media.placeholders(0, 2))
    assert images.rows(1, media.placeholders(1, 2))[0, 0] == 1 and number(many[1]) == 1
    assert images.rows(1, media.placeholders(1, 2)) is images.rows(1, media.placeholders(1, 2))
    assert encoder.encoded == [many[1].digest]  # once
    fresh = [media.Image.of_pixels(1, 1, bytes([i, 1, 0])) for i in range(vision.ENCODED_IMAGES)]
    for image in fresh:  # as many images again, encoded: the rows of the first encoded go
        images.rows(number(image), media.placeholders(number(image), 2))
    first_new = len(many) + len(fresh)
    assert number(many[1]) == first_new and number(many[0]) == first_new + 1  # let go: new numbers
    assert number(many[-1]) == len(many) - 1  # still waiting to be encoded


def test_a_chunk_that_splits_an_image_is_refused_and_changes_nothing() -> None:
    m = model()
    tokens = m.chat_tokens(conversation(picture(0)))
    inside = next(i for i, t in enumerate(tokens) if t < 0) + 3
    gen = m.generator(temperature=0)
    try:
        gen.append_tokens(tokens)
        with pytest.raises(EngineError, match="part of an image"):
            m.engine.evaluate([(gen.seq, tokens[:inside] + tokens[-1:])])
        assert m.engine.sequence_length(gen.seq) == 0
    finally:
        gen.close()
    assert m.chat(conversation(picture(0)), max_tokens=2).finish_reason == "length"


def test_two_images_in_one_message_each_take_their_place() -> None:
    m = model()
    two = [{"role": "user", "content": [{"type": "image", "image": picture(5)}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": picture(6)}]}]
    tokens = m.chat_tokens(two)
    images = [image for _, _, image in media.runs(tokens) if image is not None]
    assert len(images) == 2 and images[0] != images[1] and sum(t < 0 for t in tokens) == 32
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    inputs = hf_inputs(turn, [picture(5), picture(6)])
    image_token = reference()[1].config.image_token_index
    assert [image_token if t < 0 else t for t in tokens] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        theirs = reference()[1](**inputs).logits[0, -1].numpy()
    assert within(last_logits(m, tokens), theirs) < 1


def test_the_scheduler_reads_an_image_whole_in_small_chunks_beside_a_text_stream() -> None:
    m = model()
    params = GenerationParams(temperature=0, max_tokens=6)
    alone = m.chat(conversation(picture(7)), params).tokens
    text_params = GenerationParams(temperature=0, max_tokens=20)
    got = beside_text(m, m.chat_tokens(conversation(picture(7))), params, 4, text_params)  # 4 < an image's 16
    assert got == (vision_checks.alone(m, text_params), alone)


def test_a_prefix_cache_hit_past_an_image_gives_the_same_answer() -> None:
    got, alone = vision_checks.after_a_prefix_hit(model(), conversation(picture(8)))
    assert got == alone


def test_more_images_than_places_for_them_are_refused() -> None:
    engine = model().engine
    assert isinstance(engine, TakesImages)
    image = media.load(picture(0))
    with pytest.raises(InvalidParameter, match="2 images for 1 places") as caught:
        engine.tokenize_with_images(f"{ASK} {IMAGE_MARKER}", [image, image])
    assert caught.value.field == "images"
    assert model().chat(conversation(picture(0)), max_tokens=2).finish_reason == "length"


def test_images_to_a_text_only_transformers_model_are_refused_by_place(smollm2_hf_path: Path) -> None:
    with slm.load(str(smollm2_hf_path), engine="transformers", n_ctx=512) as text_only:
        assert not text_only.takes_images and not isinstance(text_only.engine, TakesImages)
        with pytest.raises(InvalidParameter, match="does not take images") as caught:
            text_only.chat(conversation(picture(0)), max_tokens=2)
        assert caught.value.field == "messages[0].content[1]"
        assert text_only.chat([{"role": "user", "content": "Hi"}], max_tokens=2).finish_reason == "length"


@pytest.mark.parametrize(("config", "named"), [
    ({"model_type": "qwen2_vl", "vision_config": {}}, "of type qwen2_vl, which slm's transformers engine has not"),
    ({"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"], "vision_config": {}},
     r"is a vision-language model \(PaliGemmaForConditionalGeneration\) that slm's transformers engine does not"),
])
def test_a_vision_language_model_slm_does_not_drive_is_refused_by_name(tmp_path: Path, config: dict,
                                                                      named: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")  # refused by its config before any weight is read
    with pytest.raises(InvalidModelFile, match=named):
        slm.load(str(tmp_path), engine="transformers")
    assert model().chat(conversation(picture(0)), max_tokens=2).finish_reason == "length"


PHI3_V_CONFIG = {  # microsoft/Phi-3.5-vision-instruct's config.json, at small widths
    "model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"], "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                 "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": 32064, "max_position_embeddings": 131072,
    "img_processor": {"image_dim_out": 1024, "layer_idx": -2, "name": "clip_vision_model", "num_img_tokens": 144},
}


def test_memory_for_a_vision_model_counts_its_image_side_and_never_runs_checkpoint_code(tmp_path: Path) -> None:
    from slm.engines.base import SharedCacheOptions
    from slm.engines.transformers import memory_needed

    folder = tiny_gemma3_vlm()
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # float32, vision tower included
    assert memory_needed(folder, SharedCacheOptions(n_ctx=512)) > stored
    # Phi-3-vision's model_type only its checkpoint's code knows: its text settings are read as written
    (tmp_path / "config.json").write_text(json.dumps(PHI3_V_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(bytes(1 << 20))  # stands for 1 MB of bfloat16 weights
    needed = memory_needed(tmp_path, SharedCacheOptions(n_ctx=512))
    assert needed > max(2 << 20, 32064 * 64 * 2 * 4)


# --- LLaVA: the same path, causal over the image, a CLIP tower's patches -----------------------------------


@functools.cache
def llava() -> tuple[Model, object, object]:
    """(slm's model, transformers' processor, transformers' model) of the tiny LLaVA."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = tiny_llava()
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return slm.load(str(folder), engine="transformers", n_ctx=512), AutoProcessor.from_pretrained(folder), hf


def processor_inputs(m: Model, processor: object, turn: list[dict], images: list) -> dict:
    """The processor's inputs for the text slm renders (the marker where the processor wants ``<image>``)."""
    text = m.apply_chat_template([{"role": "user", "content": "".join(
        part["text"] if part["type"] == "text" else IMAGE_MARKER for part in turn[0]["content"])}])
    return dict(processor(text=text.replace(IMAGE_MARKER, "<image>"), images=images,  # type: ignore[operator]
                          return_tensors="pt", add_special_tokens=False))


def llava_inputs(m: Model, turn: list[dict], images: list[Image.Image]) -> dict:
    return processor_inputs(m, llava()[1], turn, images)


@pytest.mark.parametrize("size", [(56, 56), (100, 80)])
def test_llava_reads_an_image_as_transformers_does(size: tuple[int, int]) -> None:
    m, _, hf = llava()
    image = picture(10).resize(size)
    turn = conversation(image)
    tokens = m.chat_tokens(turn)
    inputs = llava_inputs(m, turn, [image])
    image_token = hf.config.image_token_index  # type: ignore[attr-defined]
    assert [image_token if t < 0 else t for t in tokens] == inputs["input_ids"][0].tolist()
    assert sum(t < 0 for t in tokens) == 16 and m.takes_images
    with torch.no_grad():
        theirs = hf(**inputs).logits[0, -1].numpy()  # type: ignore[operator]
    ours = last_logits(m, tokens)
    assert within(ours, theirs) < 1
    # Negative control: LLaVA reads its image causally; read both ways, as Gemma 3 does, it is off
    encoder = m.engine._images.encoder  # type: ignore[attr-defined]
    encoder.bidirectional = True
    try:
        assert within(last_logits(m, tokens), theirs) > 10
    finally:
        encoder.bidirectional = False


def test_llava_greedy_answer_is_transformers_own_also_batched_beside_text() -> None:
    m, _, hf = llava()
    image = picture(11)
    inputs = llava_inputs(m, conversation(image), [image])
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False)  # type: ignore[attr-defined]
    params = GenerationParams(temperature=0, max_tokens=8)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert m.chat(conversation(image), params).tokens == theirs
    got = beside_text(m, m.chat_tokens(conversation(image)), params, 8)
    assert got == (vision_checks.alone(m, params), theirs)


# --- Idefics3 (SmolVLM's architecture): images cut into tiles, the whole layout one run ----------------------


@functools.cache
def idefics3() -> tuple[Model, object, object]:
    """(slm's model, transformers' processor, transformers' model) of the tiny Idefics3."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    folder = tiny_idefics3()
    hf = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return slm.load(str(folder), engine="transformers", n_ctx=512), AutoProcessor.from_pretrained(folder), hf


def test_idefics3_lays_images_out_in_tiles_as_its_processor_and_reads_them_as_transformers() -> None:
    m, processor, hf = idefics3()
    lengths = set()
    for size in [(100, 60), (100, 30), (40, 40)]:  # cut 2 x 2, 1 x 2 (at most 128 px a side, 64 px tiles), ...
        image = picture(12).resize(size)
        turn = conversation(image)
        tokens = m.chat_tokens(turn)
        inputs = processor_inputs(m, processor, turn, [[image]])
        theirs = inputs["input_ids"][0].tolist()
        run = [i for i, t in enumerate(tokens) if t < 0]
        assert len(tokens) == len(theirs) and run == list(range(run[0], run[-1] + 1))
        assert [t for t in tokens if t >= 0] == theirs[: run[0]] + theirs[run[-1] + 1 :]
        laid = m.engine._images.encoder._laid_out(media.load(image))[0]  # type: ignore[attr-defined]
        assert theirs[run[0] : run[-1] + 1] == laid  # the tiles' tags and newlines are the image's own positions
        lengths.add(len(run))
        with torch.no_grad():
            reference_logits = hf(**inputs).logits[0, -1].numpy()  # type: ignore[operator]
        assert within(last_logits(m, tokens), reference_logits) < 1
    assert len(lengths) > 1  # the images were cut differently


def test_idefics3_greedy_answer_is_transformers_own_also_in_small_chunks() -> None:
    m, processor, hf = idefics3()
    image = picture(13).resize((100, 60))
    inputs = processor_inputs(m, processor, conversation(image), [[image]])
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False)  # type: ignore[attr-defined]
    params = GenerationParams(temperature=0, max_tokens=8)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert m.chat(conversation(image), params).tokens == theirs
    got = beside_text(m, m.chat_tokens(conversation(image)), params, 4)
    assert got == (vision_checks.alone(m, params), theirs)


def test_smolvlm_reads_an_image_as_transformers_does() -> None:
    # SmolVLMProcessor lays images out as Idefics3Processor does (checked above) but needs num2words, not
    # installed here: the reference reads the layout slm wrote, with the image processor's pixels.
    from transformers import SmolVLMForConditionalGeneration

    folder = tiny_smolvlm()
    hf = SmolVLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with slm.load(str(folder), engine="transformers", n_ctx=512) as m:
        image = picture(14).resize((100, 60))
        tokens = m.chat_tokens(conversation(image))
        laid, processed = m.engine._images.encoder._laid_out(media.load(image))  # type: ignore[attr-defined]
        run = [i for i, t in enumerate(tokens) if t < 0]
        ids = torch.tensor([tokens[: run[0]] + laid + tokens[run[-1] + 1 :]])
        inputs = {"input_ids": ids, "pixel_values": processed["pixel_values"],
                  "pixel_attention_mask": processed["pixel_attention_mask"]}
        with torch.no_grad():
            theirs = hf(**inputs).logits[0, -1].numpy()
            out = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert within(last_logits(m, tokens), theirs) < 1
        assert m.chat(conversation(image), temperature=0, max_tokens=8).tokens == out[0, ids.shape[1]:].tolist()
