"""Engines: token ids -> logits. ``open_engine`` picks the adapter for a model's format, or the one asked for.

    llama.cpp     GGUF files                              (engines/llamacpp.py, llama-cpp-python)
    transformers  Hugging Face folders, and GGUF files    (engines/transformers.py, PyTorch; GGUF is dequantized)
    onnx          ONNX Runtime GenAI folders              (engines/onnx.py, onnxruntime-genai)
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from slm.store.catalog import ResolvedModel
from slm.engines.base import Engine, ModelInfo, SavedSequence, SpecialTokens
from slm.errors import EngineUnavailable, InvalidParameter

__all__ = ["ENGINES", "Engine", "ModelInfo", "SavedSequence", "SpecialTokens", "choose", "choose_why", "engines_for",
           "installed_engine", "memory_needed", "open_engine"]

ENGINES = {"llamacpp": "llama.cpp", "transformers": "transformers", "onnx": "onnxruntime-genai"}
"""Engine names as the CLI takes them -> as the engines call themselves."""

_FORMATS = {"llamacpp": {"gguf"}, "transformers": {"hf", "gguf"}, "onnx": {"onnx"}}
_DEFAULT = {"gguf": "llamacpp", "hf": "transformers", "onnx": "onnx"}
_CLASSES = {"llamacpp": "LlamaCppEngine", "transformers": "TransformersEngine", "onnx": "OnnxGenAIEngine"}
_MODULES = {"llamacpp": "slm.engines.llamacpp", "transformers": "slm.engines.transformers", "onnx": "slm.engines.onnx"}
_INSTALL = {
    "llamacpp": "pip install llama-cpp-python",
    "transformers": "pip install torch==2.13.0 && pip install 'slm[torch]'",
    "onnx": "pip install 'slm[onnx]'",
}


def choose(model: ResolvedModel, engine: str | None = None) -> str:
    """The engine that runs ``model``: the one asked for (checked), else ``auto``'s pick."""
    return choose_why(model, engine)[0]


def choose_why(model: ResolvedModel, engine: str | None = None) -> tuple[str, str]:
    """(engine, why): the one asked for (checked), else by the model's files, the engines installed and the
    hardware. A GGUF runs on llama.cpp (its quantized kernels), on transformers only when llama.cpp is
    missing; a Hugging Face folder on transformers (on the GPU when there is one); an ONNX folder on ONNX
    Runtime GenAI."""
    if engine not in (None, "auto"):
        if engine not in ENGINES:
            raise InvalidParameter("engine", f"unknown engine {engine!r} (choose from {', '.join(ENGINES)}, auto)")
        if model.format not in _FORMATS[engine]:
            can = ", ".join(engines_for(model)) or "none"
            raise InvalidParameter("engine",
                                   f"{engine} cannot run {model.name} ({model.format}); engines that can: {can}")
        return engine, f"asked for with --engine {engine}"
    candidates = engines_for(model)
    if not candidates:
        raise EngineUnavailable(f"{model.name} is {model.format}; slm has no engine for {model.format} yet")
    installed = [name for name in candidates if installed_engine(name)]
    if not installed:
        first = candidates[0]
        raise EngineUnavailable(f"no engine that runs {model.format} is installed; {_INSTALL[first]}")
    chosen = installed[0]
    if model.format == "gguf" and chosen == "llamacpp":
        return chosen, "a GGUF file: llama.cpp runs its quantized weights as they are"
    if model.format == "gguf":
        return chosen, "a GGUF file, and llama.cpp is not installed: transformers dequantizes it to float32"
    if model.format == "onnx":
        return chosen, "an ONNX Runtime GenAI folder"
    device = "the GPU (CUDA)" if _cuda() else "the CPU, in float32"
    why = f"a Hugging Face folder: transformers runs it on {device}"
    faster = [p.name for p in sorted(model.path.parent.glob(f"{model.path.name}-onnx-*"))
              if p.is_dir() and not p.name.endswith(".part")]
    if faster and not _cuda():
        why += f"; the ONNX build {faster[0]} decodes several times faster on a CPU"
    return chosen, why


def installed_engine(name: str) -> bool:
    """Whether ``name``'s library is importable (found without importing it)."""
    package = {"llamacpp": "llama_cpp", "transformers": "torch", "onnx": "onnxruntime_genai"}[name]
    return importlib.util.find_spec(package) is not None


def _cuda() -> bool:
    """A CUDA device torch can use (torch imported only when it is installed)."""
    if not installed_engine("transformers"):
        return False
    import torch

    return bool(torch.cuda.is_available())


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
