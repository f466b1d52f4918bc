"""slm pull over real HTTP: a Hugging Face-style file server of the suite's own on a loopback port."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from slm.errors import InvalidModelFile, ModelNotFound
from slm.store import catalog, download

ENTRY = catalog.CATALOG["phi3-mini"]
REPO = ENTRY.source.partition(":")[2]
PATH = f"/{REPO}/resolve/main/{ENTRY.filename}"


class FileServer(ThreadingHTTPServer):
    body: bytes = b""
    cut_after: int | None = None  # close the connection after this many bytes, once
    cut_only: str = ""  # ... of a file whose path ends so
    requests: list[dict[str, str]]
    others: dict[str, bytes]  # more files, by path
    listings: dict[str, tuple[list[dict[str, object]], str | None]]  # tree API answers by path: (items, next page)


class Handler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(dict(self.headers) | {"path": self.path})
        if self.path in self.server.listings:
            items, next_page = self.server.listings[self.path]
            listing = json.dumps(items).encode()
            self.send_response(200)
            if next_page:
                self.send_header("Link", f'<{os.environ["HF_ENDPOINT"]}{next_page}>; rel="next"')
            self.send_header("Content-Length", str(len(listing)))
            self.end_headers()
            self.wfile.write(listing)
            return
        if self.path != PATH and self.path not in self.server.others:
            self.send_error(404, "Entry not found")
            return
        body, start = self.server.others.get(self.path, self.server.body), 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.server.cut_after is not None and self.path.endswith(self.server.cut_only):
            payload, self.server.cut_after = payload[: self.server.cut_after], None
            self.wfile.write(payload)
            self.wfile.flush()
            self.connection.shutdown(2)  # the network fails mid-file
            return
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smollm2_path: Path) -> Iterator[FileServer]:
    srv = FileServer(("127.0.0.1", 0), Handler)
    srv.body = smollm2_path.read_bytes()[: 4 << 20]  # a GGUF-headed file of 4 MB stands in for the model
    srv.requests = []
    srv.others = {}
    srv.listings = {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setenv("SLM_HOME", str(tmp_path))
    yield srv
    srv.shutdown()


def test_pull_downloads_into_the_store(server: FileServer) -> None:
    seen: list[tuple[int, int | None]] = []
    path = download.pull(ENTRY, lambda done, total: seen.append((done, total)))
    assert path == catalog.store_dir() / ENTRY.filename
    assert path.read_bytes() == server.body
    assert seen[-1] == (len(server.body), len(server.body))
    assert ENTRY.local_path() == path
    assert not path.with_name(path.name + ".part").exists()


def test_a_vision_model_is_pulled_with_its_projector_and_resolves_with_it(server: FileServer) -> None:
    entry = catalog.CATALOG["gemma3:4b"]
    repo = entry.source.partition(":")[2]
    assert entry.projector is not None
    model, projector = server.body, server.body[: 1 << 20]
    server.others = {f"/{repo}/resolve/main/{entry.filename}": model,
                     f"/{repo}/resolve/main/{entry.projector}": projector}
    path = download.pull(entry)
    assert path.read_bytes() == model and entry.projector_path() == path.with_name(f"mmproj-{path.stem}.gguf")
    assert entry.projector_path().read_bytes() == projector  # type: ignore[union-attr]
    resolved = catalog.resolve("gemma3:4b")
    assert resolved.path == path and resolved.projector == entry.projector_path()
    assert "image projector" in entry.how_to_get()


def test_interrupted_download_leaves_no_model_and_resumes(server: FileServer) -> None:
    server.cut_after = 1_500_000
    with pytest.raises(download.DownloadError, match="resume"):
        download.pull(ENTRY)
    assert ENTRY.local_path() is None  # a partial file never looks like a model
    partial = catalog.store_dir() / (ENTRY.filename + ".part")
    assert partial.stat().st_size == 1_500_000
    path = download.pull(ENTRY)
    assert server.requests[-1]["Range"] == "bytes=1500000-"
    assert path.read_bytes() == server.body


def test_http_error_names_the_url(server: FileServer) -> None:
    with pytest.raises(download.DownloadError) as error:
        download.download(download.huggingface_url(REPO, "missing.gguf"), catalog.store_dir() / "missing.gguf")
    assert "missing.gguf" in str(error.value) and "404" in str(error.value)


def test_a_file_that_is_not_gguf_is_not_kept(server: FileServer) -> None:
    server.body = b"<html>not a model</html>" * 10
    with pytest.raises(InvalidModelFile):
        download.pull(ENTRY)
    assert not (catalog.store_dir() / ENTRY.filename).exists()


def test_unreachable_endpoint_is_one_line_on_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "SLM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "slm", "pull", "phi3-mini"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: http://127.0.0.1:9/") and "Traceback" not in result.stderr


def test_cli_pull_then_list_shows_it(server: FileServer, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": os.environ["HF_ENDPOINT"], "SLM_HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "slm", "pull", "phi3-mini"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "phi3-mini is ready" in result.stdout
    listed = subprocess.run([sys.executable, "-m", "slm", "list", "--json"], capture_output=True, text=True,
                            env=env, timeout=60)
    row = next(r for r in json.loads(listed.stdout) if r["alias"] == "phi3-mini")
    assert row["present"] is True


# --- models published as a folder of files ---------------------------------------------------------

ONNX_ENTRY = catalog.CATALOG["phi3.5-vision:onnx"]
ONNX_REPO = ONNX_ENTRY.source.partition(":")[2]


def publish(server: FileServer, entry: catalog.CatalogEntry, files: dict[str, bytes], per_page: int = 1000,
            wrong_hash: str | None = None) -> None:
    """Put ``files`` (paths inside the entry's folder) on the server, listed by the tree API in pages of
    ``per_page``, weights-like files (.onnx, .data, .safetensors) with an LFS sha256 as the Hub lists them,
    plus a directory entry and a .gitattributes in the folder, as real repositories list them (neither is
    pulled)."""
    repo, folder = entry.source.partition(":")[2], entry.folder or ""
    items: list[dict[str, object]] = [{"type": "directory", "path": folder or "sub", "oid": "0" * 40, "size": 0}]
    for name, body in files.items():
        path = f"{folder}/{name}" if folder else name
        server.others[f"/{repo}/resolve/main/{path}"] = body
        item: dict[str, object] = {"type": "file", "path": path, "size": len(body), "oid": "1" * 40}
        if name.endswith((".onnx", ".data", ".safetensors")):
            digest = hashlib.sha256(body).hexdigest()
            item["lfs"] = {"oid": wrong_hash if wrong_hash and name == next(iter(files)) else digest,
                           "size": len(body), "pointerSize": 134}
        items.append(item)
    items.append({"type": "file", "path": f"{folder}/.gitattributes" if folder else ".gitattributes", "size": 3,
                  "oid": "2" * 40})
    base = f"/api/models/{repo}/tree/main" + (f"/{folder}" if folder else "") + "?recursive=true"
    pages = [items[i : i + per_page] for i in range(0, len(items), per_page)]
    for n, page in enumerate(pages):
        here = base if n == 0 else f"{base}&cursor={n}"
        server.listings[here] = (page, f"{base}&cursor={n + 1}" if n + 1 < len(pages) else None)


def onnx_folder() -> dict[str, bytes]:
    rng = random.Random(0)
    return {
        "phi-3.5-v-instruct-vision.onnx": rng.randbytes(300_000),
        "phi-3.5-v-instruct-vision.onnx.data": rng.randbytes(2_000_000),
        "phi-3.5-v-instruct-text.onnx": rng.randbytes(100_000),
        "genai_config.json": json.dumps({"model": {"type": "phi3v"}}).encode(),
        "processor_config.json": b"{}",
        "tokenizer.json": b"{}",
    }


def test_a_folder_model_is_pulled_file_by_file_and_resolves(server: FileServer) -> None:
    files = onnx_folder()
    publish(server, ONNX_ENTRY, files, per_page=3)  # the listing comes in three pages
    seen: list[tuple[int, int | None]] = []
    path = download.pull_folder(ONNX_ENTRY, lambda done, total: seen.append((done, total)))
    assert path == catalog.store_dir() / ONNX_ENTRY.filename
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files  # and no .gitattributes
    total = sum(len(b) for b in files.values())
    assert seen[-1] == (total, total) and all(done <= total for done, _ in seen)
    assert not path.with_name(path.name + ".part").exists()
    resolved = catalog.resolve("phi3.5-vision:onnx")
    assert (resolved.path, resolved.format, resolved.entry, resolved.name) == (path, "onnx", ONNX_ENTRY,
                                                                             "phi3.5-vision:onnx")


def test_a_checkpoint_at_the_repository_root_keeps_its_subfolders(server: FileServer) -> None:
    entry = catalog.CATALOG["phi3.5-vision"]
    files = {"config.json": b'{"model_type": "phi3_v"}', "model-00001-of-00002.safetensors": b"w" * 5000,
             "model-00002-of-00002.safetensors": b"x" * 3000, "model.safetensors.index.json": b"{}",
             "onnx/notes.txt": b"kept as published"}
    publish(server, entry, files)
    path = download.pull_folder(entry)
    assert (path / "onnx" / "notes.txt").read_bytes() == b"kept as published"
    assert catalog.resolve("phi3.5-vision").format == "hf"


def test_a_stopped_folder_pull_looks_like_no_model_and_goes_on_where_it_stopped(server: FileServer) -> None:
    files = onnx_folder()
    publish(server, ONNX_ENTRY, files)
    server.cut_after, server.cut_only = 1_000_000, ".onnx.data"  # the big file breaks off part-way
    with pytest.raises(download.DownloadError, match="resume"):
        download.pull_folder(ONNX_ENTRY)
    assert ONNX_ENTRY.local_path() is None
    with pytest.raises(ModelNotFound):
        catalog.resolve("phi3.5-vision:onnx")
    before = len(server.requests)
    path = download.pull_folder(ONNX_ENTRY)
    fetched = [r["path"] for r in server.requests[before:] if "/resolve/" in r["path"]]
    assert not any(f.endswith("/phi-3.5-v-instruct-vision.onnx") for f in fetched)  # finished before the break
    resumed = next(r for r in server.requests[before:] if r["path"].endswith(".onnx.data"))
    assert resumed["Range"] == "bytes=1000000-"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files


def test_a_file_that_is_not_the_listed_one_is_refused_and_deleted(server: FileServer) -> None:
    files = onnx_folder()
    publish(server, ONNX_ENTRY, files, wrong_hash="f" * 64)
    with pytest.raises(InvalidModelFile, match="sha256") as error:
        download.pull_folder(ONNX_ENTRY)
    assert next(iter(files)) in str(error.value)
    assert not any((catalog.store_dir() / (ONNX_ENTRY.filename + ".part")).rglob("*.onnx"))
    assert ONNX_ENTRY.local_path() is None


def test_a_listing_that_fails_names_its_url(server: FileServer) -> None:
    with pytest.raises(download.DownloadError) as error:
        download.pull_folder(ONNX_ENTRY)  # nothing published: 404
    assert "/api/models/microsoft/Phi-3.5-vision-instruct-onnx/tree/main/" in str(error.value)
    assert "404" in str(error.value)


def test_cli_pulls_a_folder_model_and_lists_it(server: FileServer, tmp_path: Path) -> None:
    files = onnx_folder()
    publish(server, ONNX_ENTRY, files)
    env = {"HF_ENDPOINT": os.environ["HF_ENDPOINT"], "SLM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "slm", "pull", "phi3.5-vision:onnx"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "phi3.5-vision:onnx is ready" in result.stdout
    listed = subprocess.run([sys.executable, "-m", "slm", "list", "--json"], capture_output=True, text=True,
                            env=env, timeout=60)
    row = next(r for r in json.loads(listed.stdout) if r["alias"] == "phi3.5-vision:onnx")
    assert row["present"] is True and row["size_bytes"] == sum(len(b) for b in files.values())
    assert row["format"] == "onnx"


def test_cli_folder_pull_from_an_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "SLM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "slm", "pull", "phi3-vision"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: http://127.0.0.1:9/api/models/microsoft/Phi-3-vision-128k-instruct/tree/")
    assert "Traceback" not in result.stderr
