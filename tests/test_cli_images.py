"""`slm run --image`, `/image` in `slm chat` and `slm show`'s images line (cli/run.py, cli/models.py), as a real
subprocess on the tiny Gemma 3 VLM slm converts (GGUF + mmproj) and on the text-only SmolLM2: an image
reaches the prompt (as many more prompt tokens as the model gives it), bad input is one line naming the
--image typed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import ONE_THREAD, as_json, isolated, ok, one_line_error, show, slm_cmd
from vision_models import MM_TOKENS_PER_IMAGE, converted_tiny_gemma3_vlm

__all__ = ["isolated"]  # the module-scoped fixture that gives these runs an empty store

SHORT = ["--temperature", "0", "--max-tokens", "4", *ONE_THREAD]


@pytest.fixture(scope="module")
def vlm() -> str:
    """The tiny Gemma 3 VLM's text GGUF, its mmproj beside it (converted once per test process)."""
    text, projector = converted_tiny_gemma3_vlm()
    assert projector.is_file()
    return str(text)


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding two pictures at the model's size and a file that is not an image."""
    where = tmp_path_factory.mktemp("images")
    for seed, name in ((0, "pic.png"), (1, "other.jpg")):
        pixels = np.random.default_rng(seed).integers(0, 256, 224 * 224 * 3, dtype=np.uint8)
        Image.frombytes("RGB", (224, 224), pixels.tobytes()).save(where / name)
    (where / "notes.txt").write_text("not a picture\n")
    return where


def prompt_tokens(vlm: str, here: Path, *images: str) -> int:
    flags = [arg for image in images for arg in ("--image", image)]
    data = as_json(slm_cmd("run", vlm, *flags, "Describe", "--json", *SHORT, cwd=here))
    assert data["usage"]["completion_tokens"] > 0 and isinstance(data["text"], str)
    return int(data["usage"]["prompt_tokens"])


# --- slm run --image -----------------------------------------------------------------------------


def test_run_with_an_image_prints_an_answer(vlm: str, here: Path) -> None:
    result = ok(slm_cmd("run", vlm, "--image", "pic.png", "Describe", *SHORT, cwd=here))
    assert result.stdout.endswith("\n")


def test_each_image_adds_its_tokens_to_the_prompt(vlm: str, here: Path) -> None:
    text_only = prompt_tokens(vlm, here)
    one = prompt_tokens(vlm, here, "pic.png")
    two = prompt_tokens(vlm, here, "pic.png", "other.jpg")
    assert one - text_only >= MM_TOKENS_PER_IMAGE, (text_only, one)
    assert two - one >= MM_TOKENS_PER_IMAGE, (one, two)


def test_an_image_is_a_prompt_on_its_own(vlm: str, here: Path) -> None:
    ok(slm_cmd("run", vlm, "--image", "pic.png", *SHORT, cwd=here))


@pytest.mark.parametrize(("image", "model", "needles"), [
    ("nope.png", "vlm", ["no such file"]),
    ("notes.txt", "vlm", ["is not an image", "PNG"]),
    (".", "vlm", ["is not a file"]),
    ("pic.png", "smollm2", ["smollm2", "does not take images"]),
])
def test_bad_image_is_one_line_naming_the_flag(vlm: str, here: Path, image: str, model: str,
                                               needles: list[str]) -> None:
    result = slm_cmd("run", vlm if model == "vlm" else model, "--image", image, "Describe", *SHORT, cwd=here)
    one_line_error(result, f"--image {image}:", *needles)


def test_image_with_raw_is_refused(vlm: str, here: Path) -> None:
    one_line_error(slm_cmd("run", vlm, "--raw", "--image", "pic.png", "Describe", cwd=here), "--image", "--raw")


# --- slm chat /image -----------------------------------------------------------------------------


def chat_prompt_tokens(result: str) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) prompt tokens", result)]


def test_chat_attaches_an_image_to_the_next_message_and_goes_on_after_bad_ones(vlm: str, here: Path) -> None:
    lines = "/image nope.png\n/image notes.txt\nDescribe\n/image pic.png\nDescribe\n"
    result = ok(slm_cmd("chat", vlm, "-v", *SHORT, stdin=lines, cwd=here))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, show(result)
    assert "/image nope.png: no such file" in errors[0]
    assert "/image notes.txt: is not an image" in errors[1]
    assert "image attached: pic.png (224x224)" in result.stderr, show(result)
    without = ok(slm_cmd("chat", vlm, "-v", *SHORT, stdin="Describe\nDescribe\n", cwd=here))
    with_image, text_only = chat_prompt_tokens(result.stderr), chat_prompt_tokens(without.stderr)
    assert with_image[0] == text_only[0], (with_image, text_only)  # the bad ones attached nothing
    assert with_image[1] - text_only[1] >= MM_TOKENS_PER_IMAGE, (with_image, text_only)


def test_chat_on_a_text_only_model_refuses_the_image_and_goes_on(here: Path) -> None:
    result = ok(slm_cmd("chat", "smollm2", *SHORT, stdin="/image pic.png\nHi\n", cwd=here))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: /image pic.png: smollm2 does not take images (a text-only model)"], show(result)
    assert result.stdout.strip(), show(result)


# --- slm show ------------------------------------------------------------------------------------


def test_show_says_whether_the_model_takes_images(vlm: str) -> None:
    projector = Path(vlm).with_name(f"mmproj-{Path(vlm).stem}.gguf")
    assert re.search(rf"images\s+yes \({re.escape(projector.name)}\)", ok(slm_cmd("show", vlm)).stdout)
    data = as_json(slm_cmd("show", vlm, "--json"))
    assert data["images"] is True and data["projector"] == str(projector)
    assert re.search(r"images\s+no\b", ok(slm_cmd("show", "smollm2")).stdout)
    data = as_json(slm_cmd("show", "smollm2", "--json"))
    assert data["images"] is False and data["projector"] is None
