"""Engines: token ids -> logits. ``open_engine`` picks the adapter for a model's format, or the one asked for.

    llama.cpp     GGUF files                              (engines/llamacpp.py, llama-cpp-python)
    transformers  Hugging Face folders, and GGUF files    (engines/pytorch.py, PyTorch; GGUF is dequantized)
    onnx          ONNX Runtime GenAI folders              (engines/onnx.py, onnxruntime-genai)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from slm.catalog import ResolvedModel
from slm.engines.base import Engine, ModelInfo, SavedSequence, SpecialTokens
from slm.errors import EngineUnavailable, InvalidParameter

__all__ = ["ENGINES", "Engine", "ModelInfo", "SavedSequence", "SpecialTokens", "choose", "engines_for", "memory_needed",
           "open_engine"]

ENGINES = {"llamacpp": "llama.cpp", "transformers": "transformers", "onnx": "onnxruntime-genai"}
"""Engine names as the CLI takes them -> as the engines call themselves."""

_FORMATS = {"llamacpp": {"gguf"}, "transformers": {"hf", "gguf"}, "onnx": {"onnx"}}
_DEFAULT = {"gguf": "llamacpp", "hf": "transformers", "onnx": "onnx"}
_CLASSES = {"llamacpp": "LlamaCppEngine", "transformers": "TransformersEngine", "onnx": "OnnxGenAIEngine"}
_MODULES = {"llamacpp": "slm.engines.llamacpp", "transformers": "slm.engines.pytorch", "onnx": "slm.engines.onnx"}
_INSTALL = {
    "llamacpp": "pip install llama-cpp-python",
    "transformers": "pip install torch==2.13.0 && pip install 'slm[torch]'",
    "onnx": "pip install 'slm[onnx]'",
}


def choose(model: ResolvedModel, engine: str | None = None) -> str:
    """The engine that runs ``model``: the one asked for (checked), else the format's own."""
    if engine in (None, "auto"):
        if model.format not in _DEFAULT:
            raise EngineUnavailable(f"{model.name} is {model.format}; slm has no engine for {model.format} yet")
        return _DEFAULT[model.format]
    if engine not in ENGINES:
        raise InvalidParameter("engine", f"unknown engine {engine!r} (choose from {', '.join(ENGINES)}, auto)")
    if model.format not in _FORMATS[engine]:
        can = ", ".join(engines_for(model)) or "none"
        raise InvalidParameter("engine", f"{engine} cannot run {model.name} ({model.format}); engines that can: {can}")
    return engine


def engines_for(model: ResolvedModel) -> list[str]:
    """Every engine that can run ``model``'s format."""
    return [name for name, formats in _FORMATS.items() if model.format in formats]


def open_engine(model: ResolvedModel, engine: str | None = None, **options: Any) -> Engine:
    """Load ``model`` in ``engine`` (default: the one for its format)."""
    name = choose(model, engine)
    adapter = _adapter(name)
    cls = getattr(adapter, _CLASSES[name])
    loaded: Engine = cls(model.path, **options)
    return loaded


def memory_needed(model: ResolvedModel, engine: str | None = None, **options: Any) -> int:
    """Bytes that ``open_engine(model, engine, **options)`` would take, found without loading the weights."""
    return int(_adapter(choose(model, engine)).memory_needed(model.path, **options))


def _adapter(name: str) -> ModuleType:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise EngineUnavailable(f"the {name} engine is not installed ({e}); {_INSTALL[name]}") from None
