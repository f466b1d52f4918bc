"""Images as the loop carries them: decoding and its errors, placeholder ids, and where chunks may end."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image as PILImage

from slm.engines import media
from slm.errors import InvalidParameter
from slm.model.images import image_places, split_images


def encoded(fmt: str = "PNG", size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 10, 30),
            **save: object) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, color).save(out, format=fmt, **save)
    return out.getvalue()


def noisy() -> bytes:
    out = io.BytesIO()
    PILImage.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_format_slm_takes_decodes_to_rgb_pixels(fmt: str) -> None:
    image = media.decode(encoded(fmt), "img")
    assert (image.width, image.height) == (8, 6) and len(image.rgb) == 8 * 6 * 3
    red, green, blue = image.rgb[:3]
    assert red > 150 and green < 60 and blue < 80  # lossy formats shift the colour a little


def test_the_same_pixels_are_the_same_image_whatever_the_encoding() -> None:
    png, again = media.decode(encoded("PNG")), media.load(encoded("PNG", optimize=True))
    assert png.digest == again.digest
    assert media.decode(encoded("PNG", color=(0, 0, 0))).digest != png.digest
    assert media.load(PILImage.new("RGB", (8, 6), (200, 10, 30))).digest == png.digest


def test_data_uris_base64_and_paths_load(tmp_path) -> None:
    data = encoded()
    b64 = base64.b64encode(data).decode()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    digests = {media.load(f"data:image/png;base64,{b64}").digest, media.load(b64).digest,
               media.load(path).digest, media.load(data).digest}
    assert len(digests) == 1


@pytest.mark.parametrize(("source", "says"), [
    (b"", "is empty"),
    (b"this is not an image at all", "is not an image"),
    (noisy()[:2000], "truncated or corrupt"),
    ("data:text/plain;base64,aGVsbG8=", "not of an image"),
    ("data:image/png,rawbytes", "must be base64"),
    ("!!!not base64!!!", "not valid base64"),
    ("https://example.com/cat.png", "URLs are not fetched"),
    (12, "must be image bytes"),
])
def test_what_is_not_a_whole_image_is_refused_by_place(source: object, says: str) -> None:
    with pytest.raises(InvalidParameter, match=says) as caught:
        media.load(source, "messages[1].content[2]")
    assert caught.value.field == "messages[1].content[2]"


def test_an_unsupported_format_and_a_missing_file_are_named(tmp_path) -> None:
    with pytest.raises(InvalidParameter, match="is a BMP image; PNG, JPEG, WEBP, GIF are taken"):
        media.decode(encoded("BMP"))
    with pytest.raises(InvalidParameter, match="cannot read"):
        media.load(tmp_path / "missing.png")


def test_an_image_beyond_the_pixel_limit_is_refused_before_it_is_decoded(monkeypatch) -> None:
    monkeypatch.setattr(media, "MAX_PIXELS", 40)
    with pytest.raises(InvalidParameter, match="8x6 pixels, beyond the limit of 40"):
        media.decode(encoded())


def test_placeholders_name_their_image_and_position() -> None:
    ids = media.placeholders(3, 5)
    assert all(t < 0 for t in ids) and len(set(ids)) == 5
    assert [media.placeholder(t) for t in ids] == [(3, i) for i in range(5)]
    assert not set(ids) & set(media.placeholders(4, 5))


def test_runs_split_text_and_each_image() -> None:
    a, b = media.placeholders(0, 3), media.placeholders(1, 2)
    tokens = [5, 6, *a, *b, 7, *a, 8]
    assert media.runs(tokens) == [(0, 2, None), (2, 5, 0), (5, 7, 1), (7, 8, None), (8, 11, 0), (11, 12, None)]


def test_chunks_never_split_an_image_nor_end_right_after_one() -> None:
    image = media.placeholders(0, 4)
    tokens = [1, 2, *image, 3, 4, 5]
    assert media.chunk_end(tokens, 2) == 2  # just before the image
    assert media.chunk_end(tokens, 3) == 7  # inside it: the whole image and the text token after it
    assert media.chunk_end(tokens, 6) == 7  # right after it: the text token after it too
    assert media.chunk_end(tokens, 7) == 7
    assert media.chunk_end(tokens, 100) == len(tokens)
    two = [1, *image, *media.placeholders(1, 2), 9]
    assert media.chunk_end(two, 2) == len(two)
    assert media.whole_images_before(tokens, 4) == 2 and media.whole_images_before(tokens, 6) == 6
    assert media.whole_images_before(tokens, 2) == 2


def test_a_conversation_s_images_become_markers_in_order_and_errors_name_the_part() -> None:
    png = encoded()
    uri = "data:image/png;base64," + base64.b64encode(encoded(color=(1, 2, 3))).decode()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                     {"type": "image", "image": png},
                                     {"type": "text", "text": " and "},
                                     {"type": "image_url", "image_url": {"url": uri}}]},
        {"role": "user", "content": "and this", "images": [base64.b64encode(png).decode()]},
    ]
    assert image_places(messages) == ["messages[1].content[1]", "messages[1].content[3]", "messages[2].images[0]"]
    flat, images = split_images(messages, "<M>")
    assert [m["content"] for m in flat] == ["Be brief.", "Compare <M> and <M>", "<M>and this"]
    assert [i.digest for i in images] == [images[0].digest, media.load(uri).digest, images[0].digest]
    assert "images" not in flat[2]
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    bad = [{"role": "user", "content": [{"type": "text", "text": "x"}, broken]}]
    with pytest.raises(InvalidParameter) as caught:
        split_images(bad, "<M>")
    assert caught.value.field == "messages[0].content[1]"
    with pytest.raises(InvalidParameter, match="must be text, image or image_url") as caught:
        split_images([{"role": "user", "content": [{"type": "audio"}]}], "<M>")
    assert caught.value.field == "messages[0].content[0].type"
