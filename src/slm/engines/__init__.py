"""Engines: token ids -> logits. ``open_engine`` picks the adapter for a model's format, or the one asked for.

    llama.cpp     GGUF files                              (engines/llamacpp.py, llama-cpp-python)
    transformers  Hugging Face folders, and GGUF files    (engines/transformers.py, PyTorch; GGUF is dequantized)
    onnx          ONNX Runtime GenAI folders              (engines/onnx.py, onnxruntime-genai)
    openvino      OpenVINO stateful LLM folders           (engines/openvino.py, openvino)

Each has one spec in ``engines/registry.py`` (its names, formats, library and load options); the protocol
they all follow, and the bookkeeping they share, are in ``engines/base.py``.
"""

from __future__ import annotations

from slm.engines.base import (
    Engine,
    LlamaCppOptions,
    LoadOptions,
    ModelInfo,
    SavedSequence,
    SharedCacheOptions,
    SpecialTokens,
    TakesImages,
)
from slm.engines.registry import (
    ENGINES,
    LOAD_OPTIONS,
    REGISTRY,
    EngineSpec,
    choose,
    choose_why,
    engines_for,
    installed_engine,
    load_options,
    memory_needed,
    open_engine,
)

__all__ = ["ENGINES", "LOAD_OPTIONS", "REGISTRY", "Engine", "EngineSpec", "LlamaCppOptions", "LoadOptions",
           "ModelInfo", "SavedSequence", "SharedCacheOptions", "SpecialTokens", "TakesImages", "choose", "choose_why",
           "engines_for", "installed_engine", "load_options", "memory_needed", "open_engine"]
