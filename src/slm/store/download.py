"""Fetching a model file into slm's store: resumable, atomic, with progress, errors naming the URL.

Only an explicit ``slm pull`` downloads. The file is written to ``NAME.part`` and renamed when complete,
so an interrupted download never looks like a model; the next pull resumes it with an HTTP Range
request. ``HF_ENDPOINT`` (as in huggingface_hub) points at a mirror, ``HF_TOKEN`` authorizes gated repos.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from slm.errors import DownloadError, SlmError
from slm.store.catalog import CatalogEntry, check_gguf, store_dir

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) as the download advances."""

BLOCK = 1 << 20


def huggingface_url(repo: str, filename: str, revision: str = "main") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/{revision}/{filename}"


def entry_url(entry: CatalogEntry, filename: str | None = None) -> str:
    """The URL of the entry's model file (or of another of its files, ``filename``)."""
    kind, _, repo = entry.source.partition(":")
    if kind != "hf":
        raise DownloadError(f"{entry.alias} is not downloaded from a URL ({entry.source})")
    return huggingface_url(repo, filename or entry.filename)


def download(url: str, target: Path, progress: Progress | None = None, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``target``, resuming a previous partial download."""
    partial = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "slm"})
    if token := os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {token}")
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            partial.replace(target)
            return target
        hint = " (gated or private: set HF_TOKEN)" if e.code in (401, 403) else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: {reason}") from None
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        try:
            with partial.open("ab" if have else "wb") as out:
                done = have
                while block := response.read(BLOCK):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"{url}: interrupted after {done} bytes ({e}); run the pull again to resume") from None
    if total is not None and done < total:
        raise DownloadError(f"{url}: interrupted after {done} of {total} bytes; run the pull again to resume")
    partial.replace(target)
    return target


def pull(entry: CatalogEntry, progress: Progress | None = None) -> Path:
    """Download a catalog entry's GGUF file (and a vision model's projector, beside it) into the store and
    check them."""
    files = [(entry.filename, store_dir() / entry.filename)]
    projector = entry.projector_path()
    if entry.projector and projector is not None:
        files.append((entry.projector, projector))
    for name, target in files:
        path = download(entry_url(entry, name), target, progress)
        try:
            check_gguf(path)
        except SlmError:
            path.unlink()
            raise
    return files[0][1]
