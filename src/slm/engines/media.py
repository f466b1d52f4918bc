"""Images in a prompt: decoded and checked once, then carried through the loop as placeholder ids.

An image in a conversation becomes a run of placeholder ids in the prompt, one per position the model
gives it, so every layer that handles ids (the generator, the scheduler's chunks, the prefix cache)
handles images unchanged: two prompts with the same image at the same place share a prefix, and a
prefix-cache hit skips encoding the image again. A placeholder is a negative id, which no vocabulary
has: ``-(image << 20 | index) - 1``, where ``image`` is the engine's number for the image (never
reused while the engine lives) and ``index`` the position within it. Only an engine that takes images
(``TakesImages``) hands such ids out, and it turns each run back into the image's embeddings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm.errors import InvalidParameter

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
"""Image formats slm decodes (a GIF: its first frame)."""
MAX_BYTES = 20 << 20
"""The largest encoded image taken (bytes)."""
MAX_PIXELS = 40_000_000
"""The most pixels an image may have once decoded (a guard against decompression bombs)."""

_INDEX_BITS = 20
_INDEX_MASK = (1 << _INDEX_BITS) - 1


@dataclass(frozen=True, eq=False)
class Image:
    """One decoded image: 8-bit RGB, row-major, and a digest of its pixels (what makes two images the
    same image)."""

    width: int
    height: int
    rgb: bytes = field(repr=False)
    digest: str

    @classmethod
    def of_pixels(cls, width: int, height: int, rgb: bytes) -> Image:
        if len(rgb) != width * height * 3:
            raise InvalidParameter("image", f"{len(rgb)} bytes are not {width}x{height} RGB pixels")
        digest = hashlib.sha256(f"{width}x{height}:".encode() + rgb).hexdigest()
        return cls(width, height, rgb, digest)


def load(source: Any, where: str = "image") -> Image:
    """An image from a PIL image, encoded bytes, a file path, or a ``data:`` URI / base64 string (as the
    OpenAI and Ollama APIs send them). Anything that is not a whole image in a format slm takes is an
    InvalidParameter naming ``where``."""
    try:
        from PIL import Image as PILImage
    except ImportError:
        raise InvalidParameter(where, "images need Pillow: pip install pillow") from None
    if isinstance(source, PILImage.Image):
        return _of_pil(source, where)
    if isinstance(source, Path):
        data = _read_file(source, where)
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str):
        data = _decode_text(source, where)
    else:
        raise InvalidParameter(where, "must be image bytes, a path, a data: URI or base64, "
                                      f"not {type(source).__name__}")
    return decode(data, where)


def decode(data: bytes, where: str = "image") -> Image:
    """Encoded image bytes -> an Image (first frame), checked: format, size, whole."""
    from PIL import Image as PILImage

    if not data:
        raise InvalidParameter(where, "is empty")
    if len(data) > MAX_BYTES:
        raise InvalidParameter(where, f"is {len(data)} bytes, beyond the limit of {MAX_BYTES}")
    try:
        opened = PILImage.open(io.BytesIO(data))
    except PILImage.DecompressionBombError:
        raise InvalidParameter(where, f"has more than {MAX_PIXELS} pixels") from None
    except (OSError, ValueError):
        raise InvalidParameter(where, f"is not an image ({', '.join(FORMATS)} are taken)") from None
    if opened.format not in FORMATS:
        raise InvalidParameter(where, f"is a {opened.format} image; {', '.join(FORMATS)} are taken")
    return _of_pil(opened, where)


def _of_pil(image: Any, where: str) -> Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidParameter(where, f"is {width}x{height} pixels")
    if width * height > MAX_PIXELS:
        raise InvalidParameter(where, f"is {width}x{height} pixels, beyond the limit of {MAX_PIXELS}")
    try:
        image.seek(0)
        rgb = image.convert("RGB")
        rgb.load()
    except (OSError, ValueError, EOFError):
        raise InvalidParameter(where, "is a truncated or corrupt image") from None
    return Image.of_pixels(width, height, rgb.tobytes())


def _read_file(path: Path, where: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise InvalidParameter(where, f"{path} is {size} bytes, beyond the limit of {MAX_BYTES}")
        return path.read_bytes()
    except OSError as e:
        raise InvalidParameter(where, f"cannot read {path}: {e.strerror or e}") from None


def _decode_text(text: str, where: str) -> bytes:
    """A ``data:`` URI or bare base64 (Ollama's ``images``)."""
    payload = text.strip()
    if payload.startswith("data:"):
        header, comma, payload = payload.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidParameter(where, "a data: URI must be base64: data:image/png;base64,...")
        if not header[5:].startswith("image/"):
            raise InvalidParameter(where, f"is a data: URI of {header[5:-7] or 'no type'}, not of an image")
    elif payload.startswith(("http://", "https://")):
        raise InvalidParameter(where, "image URLs are not fetched here; send the image as a data: URI")
    if len(payload) > MAX_BYTES * 4 // 3 + 4:
        raise InvalidParameter(where, f"is beyond the limit of {MAX_BYTES} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(where, "is not valid base64") from None


# --- placeholder ids ---------------------------------------------------------------------------


def placeholders(image: int, count: int) -> list[int]:
    """The ids of the ``count`` positions of the engine's image number ``image``."""
    base = image << _INDEX_BITS
    return [-(base | i) - 1 for i in range(count)]


def is_placeholder(token: int) -> bool:
    return token < 0


def placeholder(token: int) -> tuple[int, int]:
    """(image number, position within the image) of a placeholder id."""
    value = -token - 1
    return value >> _INDEX_BITS, value & _INDEX_MASK


def runs(tokens: Sequence[int]) -> list[tuple[int, int, int | None]]:
    """``tokens`` split into runs: (start, end, image number), None for a run of text ids."""
    out: list[tuple[int, int, int | None]] = []
    start = 0
    current: int | None = None
    for i, token in enumerate(tokens):
        image = placeholder(token)[0] if token < 0 else None
        if i > start and (image != current or (image is not None and placeholder(token)[1] == 0)):
            out.append((start, i, current))
            start = i
        current = image
    if tokens:
        out.append((start, len(tokens), current))
    return out


def whole_images_before(tokens: Sequence[int], end: int) -> int:
    """``end`` moved back to the start of the image it falls inside (cached or evaluated prefixes must
    not split an image)."""
    while 0 < end < len(tokens) and tokens[end] < 0 and placeholder(tokens[end])[1] > 0:
        end -= 1
    return end


def chunk_end(tokens: Sequence[int], budget: int) -> int:
    """Where a prefill chunk of at most ``budget`` tokens may end: never inside an image, and never right
    after one when text follows (the engine needs the logits of a text position)."""
    end = min(max(budget, 1), len(tokens))
    while end < len(tokens) and (tokens[end - 1] < 0 or (tokens[end] < 0 and placeholder(tokens[end])[1] > 0)):
        end += 1
    return end
