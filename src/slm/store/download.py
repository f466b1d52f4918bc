"""Fetching a model into slm's store: resumable, atomic, with progress, errors naming the URL.

Only an explicit ``slm pull`` downloads. A file is written to ``NAME.part`` and renamed when complete,
so an interrupted download never looks like a model; the next pull resumes it with an HTTP Range
request. A model published as a folder (a checkpoint, an ONNX folder) is listed with the Hub's tree API,
each file downloaded the same way into ``FOLDER.part/`` and checked against the size and sha256 the
listing gives, and the folder renamed when every file is there. ``HF_ENDPOINT`` (as in huggingface_hub)
points at a mirror, ``HF_TOKEN`` authorizes gated repos.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from slm.errors import DownloadError, InvalidModelFile, SlmError
from slm.store.catalog import CatalogEntry, check_gguf, store_dir

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) as the download advances."""

BLOCK = 1 << 20


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def huggingface_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{_endpoint()}/{repo}/resolve/{revision}/{urllib.parse.quote(filename)}"


def _request(url: str) -> urllib.request.Request:
    request = urllib.request.Request(url, headers={"User-Agent": "slm"})
    if token := os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {token}")
    return request


def _http_error(url: str, e: urllib.error.HTTPError) -> DownloadError:
    hint = " (gated or private: set HF_TOKEN)" if e.code in (401, 403) else ""
    return DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}")


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
    request = _request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            partial.replace(target)
            return target
        raise _http_error(url, e) from None
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


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository folder, as the Hub's tree API lists it."""

    path: str
    """Its path in the repository."""
    size: int
    sha256: str | None
    """The content's sha256 for a file kept in LFS (every weight file); None for a small text file."""


def list_folder(repo: str, folder: str, revision: str = "main", timeout: float = 30.0) -> list[RemoteFile]:
    """Every file under ``folder`` of a Hub model repository (``""``: all of it), following the listing's
    pages."""
    where = f"/{urllib.parse.quote(folder.strip('/'))}" if folder.strip("/") else ""
    page: str | None = f"{_endpoint()}/api/models/{repo}/tree/{revision}{where}?recursive=true"
    files: list[RemoteFile] = []
    while page is not None:
        url = page
        try:
            with urllib.request.urlopen(_request(url), timeout=timeout) as response:
                items = json.loads(response.read())
                page = _next_page(response.headers.get("Link"))
        except urllib.error.HTTPError as e:
            raise _http_error(url, e) from None
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None
        except ValueError:
            raise DownloadError(f"{url}: the listing is not JSON") from None
        files += [_remote_file(item, url) for item in items if isinstance(item, dict)
                  and item.get("type") == "file"]
    return files


def _remote_file(item: dict[str, Any], url: str) -> RemoteFile:
    path, size = item.get("path"), item.get("size")
    if not isinstance(path, str) or not isinstance(size, int):
        raise DownloadError(f"{url}: a listed file has no path or size: {item}")
    lfs = item.get("lfs")
    digest = lfs.get("oid") if isinstance(lfs, dict) else None
    return RemoteFile(path, size, digest if isinstance(digest, str) and len(digest) == 64 else None)


def _next_page(link: str | None) -> str | None:
    """The ``rel="next"`` URL of a Link header, where the listing goes on."""
    found = re.search(r'<([^>]+)>\s*;\s*rel="next"', link or "")
    return found.group(1) if found else None


def pull_folder(entry: CatalogEntry, progress: Progress | None = None) -> Path:
    """Download every file of a catalog entry's folder into the store folder ``entry.filename``, each one
    checked against its listed size and sha256; the folder gets its name only when all are there. A pull
    that stops part-way keeps what it finished (``FOLDER.part/``) and the next one goes on from there."""
    assert entry.folder is not None
    repo = entry.source.partition(":")[2]
    files = [f for f in list_folder(repo, entry.folder) if not PurePosixPath(f.path).name.startswith(".")]
    if not files:
        raise DownloadError(f"{entry.url}: no files under {entry.folder or 'the repository root'}")
    target = store_dir() / entry.filename
    partial = target.with_name(target.name + ".part")
    total, done = sum(f.size for f in files), 0
    for remote in files:
        relative = PurePosixPath(remote.path).relative_to(entry.folder) if entry.folder else PurePosixPath(remote.path)
        if ".." in relative.parts:
            raise DownloadError(f"{entry.url}: a listed file lies outside its folder: {remote.path}")
        local = partial.joinpath(*relative.parts)
        if not (local.is_file() and local.stat().st_size == remote.size):  # a file a stopped pull finished
            download(huggingface_url(repo, remote.path), local, _offset(progress, done, total))
            _check(local, remote)
        done += remote.size
        if progress:
            progress(done, total)
    partial.replace(target)
    return target


def _offset(progress: Progress | None, base: int, total: int) -> Progress | None:
    """One file's progress as the whole folder's: ``base`` bytes already there, ``total`` in all."""
    if progress is None:
        return None
    report = progress
    return lambda done, _size: report(base + done, total)


def _check(local: Path, remote: RemoteFile) -> None:
    """A downloaded file is the listed one (size, and sha256 where listed); otherwise it is deleted."""
    size = local.stat().st_size
    problem = f"is {size} bytes, the listing says {remote.size}" if size != remote.size else None
    if problem is None and remote.sha256 is not None:
        digest = hashlib.sha256()
        with local.open("rb") as f:
            while block := f.read(BLOCK):
                digest.update(block)
        if digest.hexdigest() != remote.sha256:
            problem = f"has sha256 {digest.hexdigest()}, the listing says {remote.sha256}"
    if problem is not None:
        local.unlink()
        raise InvalidModelFile(f"{remote.path} {problem}; it was deleted (run the pull again)")
