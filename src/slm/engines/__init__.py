"""Engines: token ids -> logits. ``open_engine`` picks the adapter for a model file's format."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from slm.catalog import ResolvedModel
from slm.engines.base import Engine, ModelInfo, SavedSequence, SpecialTokens
from slm.errors import EngineUnavailable

__all__ = ["Engine", "ModelInfo", "SavedSequence", "SpecialTokens", "memory_needed", "open_engine"]


def open_engine(model: ResolvedModel, **options: Any) -> Engine:
    """Load ``model`` in the engine that runs its format."""
    return _adapter(model).LlamaCppEngine(model.path, **options)


def memory_needed(model: ResolvedModel, **options: Any) -> int:
    """Bytes that ``open_engine(model, **options)`` would take, found without loading the weights."""
    return int(_adapter(model).memory_needed(model.path, **options))


def _adapter(model: ResolvedModel) -> ModuleType:
    if model.format == "gguf":
        try:
            from slm.engines import llamacpp
        except ImportError as e:
            raise EngineUnavailable(
                f"GGUF models need llama-cpp-python, which is not importable ({e}); pip install llama-cpp-python"
            ) from None
        return llamacpp
    raise EngineUnavailable(f"{model.name} is {model.format}; slm has no engine for {model.format} files yet")
