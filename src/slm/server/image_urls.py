"""Images a request names by http(s) URL, fetched by the server when ``--allow-image-urls`` says so.

Off by default: a server that fetches what a request names can be made to reach hosts its clients cannot
(the server-side request forgery every hosted API guards against). When on, each fetch has a byte cap
(``media.MAX_BYTES``), a timeout, and follows redirects only on the same host; a failure is a 400 naming
the part, before the request is queued. The fetched bytes replace the URL in the conversation, so the
model layer decodes them like any other image.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from slm.engines import media
from slm.errors import InvalidParameter

TIMEOUT = 10.0
"""Seconds one image fetch may take, connection and body."""
REDIRECTS = 3


async def fetch_image_urls(messages: Sequence[dict[str, Any]], allowed: bool) -> list[dict[str, Any]]:
    """``messages`` with each http(s) ``image_url`` part replaced by an ``image`` part of the fetched bytes.
    Without ``allowed``, the messages as they are (the model layer refuses the URLs by place)."""
    wanted = [(i, j, part["image_url"]["url"]) for i, m in enumerate(messages)
              if isinstance(m.get("content"), list)
              for j, part in enumerate(m["content"])
              if part.get("type") == "image_url" and _is_web(part["image_url"].get("url", ""))]
    if not wanted or not allowed:
        return list(messages)
    async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False) as client:
        fetched = await asyncio.gather(*(_fetch(client, url, f"messages[{i}].content[{j}]") for i, j, url in wanted))
    out = [dict(m) for m in messages]
    for (i, j, _), data in zip(wanted, fetched, strict=True):
        content = list(out[i]["content"])
        content[j] = {"type": "image", "image": data}
        out[i]["content"] = content
    return out


def _is_web(url: str) -> bool:
    return url.startswith(("http://", "https://"))


async def _fetch(client: httpx.AsyncClient, url: str, where: str) -> bytes:
    host = urlsplit(url).hostname
    for _ in range(REDIRECTS + 1):
        try:
            async with client.stream("GET", url) as response:
                if response.is_redirect:
                    target = urljoin(url, response.headers.get("location", ""))
                    if urlsplit(target).hostname != host or not _is_web(target):
                        raise InvalidParameter(where, f"{url} redirects to another host ({target}); not followed")
                    url = target
                    continue
                if response.status_code != 200:
                    raise InvalidParameter(where, f"fetching {url} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > media.MAX_BYTES:
                    raise InvalidParameter(where, f"{url} is {declared} bytes, beyond the limit of {media.MAX_BYTES}")
                body = bytearray()
                async for block in response.aiter_bytes():
                    body += block
                    if len(body) > media.MAX_BYTES:
                        raise InvalidParameter(where, f"{url} is beyond the limit of {media.MAX_BYTES} bytes")
                return bytes(body)
        except httpx.TimeoutException:
            raise InvalidParameter(where, f"fetching {url} took more than {TIMEOUT:g} s") from None
        except httpx.HTTPError as e:
            raise InvalidParameter(where, f"fetching {url} failed: {e}") from None
    raise InvalidParameter(where, f"{url} redirects more than {REDIRECTS} times")
