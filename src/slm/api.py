"""The Python surface: ``slm.load(name)`` opens a local model, a remote one or a route; all three have
the same ``chat`` / ``chat_stream`` / ``generate`` / ``stream`` (``slm.model.LanguageModel``).

    model = slm.load("smollm2")
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)
    for chunk in model.stream("Once upon a time", max_tokens=50):
        print(chunk.text, end="")
"""

from __future__ import annotations

from typing import Any

from slm.engines import memory_needed, open_engine
from slm.model import LanguageModel, Model
from slm.remote import RemoteModel, Router, open_remote
from slm.store import catalog

__all__ = ["LanguageModel", "Model", "RemoteModel", "Router", "estimate_memory", "load", "load_local"]


def load(name: str | None = None, **options: Any) -> Model | RemoteModel | Router:
    """Load a model by catalog alias or file path (default: the embedded SmolLM2), or open a remote
    model (``github:Phi-3.5-mini-instruct``, ``ollama:phi3.5``, a name from the configuration file) or a
    route: those have the same ``chat`` / ``chat_stream`` / ``generate`` / ``stream``.

    Options go to the engine: ``n_ctx`` (context to allocate), ``threads``, ``max_sequences``.
    """
    if name is not None and not catalog.looks_local(name):
        remote = open_remote(name, load, **options)
        if remote is not None:
            return remote
    return load_local(name, **options)


def load_local(name: str | None = None, **options: Any) -> Model:
    """A model file of this machine (a catalog alias or a path), loaded in its engine."""
    resolved = catalog.resolve(name)
    instruct = resolved.entry.instruct if resolved.entry else True
    return Model(resolved.name, open_engine(resolved, **options), instruct=instruct)


def estimate_memory(name: str | None = None, **options: Any) -> int:
    """Bytes ``load(name, **options)`` would take (weights, KV cache, buffers), without loading it."""
    return memory_needed(catalog.resolve(name), **options)
