"""slm pull over real HTTP: a Hugging Face-style file server of the suite's own on a loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from slm.errors import InvalidModelFile
from slm.store import catalog, download

ENTRY = catalog.CATALOG["phi3-mini"]
REPO = ENTRY.source.partition(":")[2]
PATH = f"/{REPO}/resolve/main/{ENTRY.filename}"


class FileServer(ThreadingHTTPServer):
    body: bytes = b""
    cut_after: int | None = None  # close the connection after this many bytes, once
    requests: list[dict[str, str]]
    others: dict[str, bytes]  # more files, by path


class Handler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(dict(self.headers))
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
        if self.server.cut_after is not None:
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
