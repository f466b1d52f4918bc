"""Images in a conversation: found in its messages, decoded, and replaced by the engine's marker.

A message's content may be a list of parts, as the OpenAI API and transformers' processors take it:
``{"type": "text", "text": ...}``, ``{"type": "image", "image": PATH | bytes | PIL.Image}`` and
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``; or a string with Ollama's
``images`` beside it (base64 or bytes; they come before the text, as Ollama puts them). Each image is
decoded and checked here, and the error names its place: ``messages[1].content[2]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slm.engines import media
from slm.errors import InvalidParameter

IMAGE_PARTS = ("image", "image_url")


def image_places(messages: Sequence[Any]) -> list[str]:
    """Where the conversation holds images (``messages[i].content[j]``, ``messages[i].images[j]``)."""
    places = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, list):
            places += [f"messages[{i}].content[{j}]" for j, part in enumerate(content)
                       if isinstance(part, Mapping) and part.get("type") in IMAGE_PARTS]
        places += [f"messages[{i}].images[{j}]" for j in range(len(message.get("images") or ()))]
    return places


def split_images(messages: Sequence[Any], marker: str) -> tuple[list[dict[str, Any]], list[media.Image]]:
    """The conversation with text content only, each image replaced by ``marker``; and the images, in
    the order of their markers."""
    flat: list[dict[str, Any]] = []
    images: list[media.Image] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not (isinstance(message.get("content"), list)
                                                    or message.get("images")):
            flat.append(message)  # as it is (validate_messages names what is wrong with it)
            continue
        text = ""
        for j, source in enumerate(message.get("images") or ()):
            images.append(media.load(source, f"messages[{i}].images[{j}]"))
            text += marker
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                text += _part(part, f"messages[{i}].content[{j}]", marker, images)
        elif content is not None:
            text += content if isinstance(content, str) else _not_text(f"messages[{i}].content")
        flat.append({k: v for k, v in message.items() if k not in ("content", "images")} | {"content": text})
    return flat, images


def _part(part: Any, where: str, marker: str, images: list[media.Image]) -> str:
    if not isinstance(part, Mapping):
        raise InvalidParameter(where, "must be an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        return text if isinstance(text, str) else _not_text(f"{where}.text")
    if kind == "image":
        source = part.get("image")
        images.append(media.load(Path(source) if isinstance(source, str) and not _is_data(source) else source,
                                 where))
        return marker
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str):
            raise InvalidParameter(f"{where}.image_url", "must be {\"url\": \"data:image/...;base64,...\"}")
        images.append(media.load(url, where))
        return marker
    raise InvalidParameter(f"{where}.type", f"must be text, image or image_url, got {kind!r}")


def _is_data(text: str) -> bool:
    return text.startswith(("data:", "http://", "https://"))


def _not_text(where: str) -> str:
    raise InvalidParameter(where, "must be a string")
