"""Engines: token ids -> logits. ``open_engine`` picks the adapter for a model file's format."""

from __future__ import annotations

from typing import Any

from slm.catalog import ResolvedModel
from slm.engines.base import Engine, ModelInfo, SpecialTokens
from slm.errors import EngineUnavailable

__all__ = ["Engine", "ModelInfo", "SpecialTokens", "open_engine"]


def open_engine(model: ResolvedModel, **options: Any) -> Engine:
    """Load ``model`` in the engine that runs its format."""
    if model.format == "gguf":
        try:
            from slm.engines.llamacpp import LlamaCppEngine
        except ImportError as e:
            raise EngineUnavailable(
                f"GGUF models need llama-cpp-python, which is not importable ({e}); pip install llama-cpp-python"
            ) from None
        return LlamaCppEngine(model.path, **options)
    raise EngineUnavailable(f"{model.name} is {model.format}; slm has no engine for {model.format} files yet")
