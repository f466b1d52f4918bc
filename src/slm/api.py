"""The Python surface: ``slm.load(name)`` opens a local model, a remote one or a route; all three have
the same ``chat`` / ``chat_stream`` / ``generate`` / ``stream`` (``slm.model.LanguageModel``).

    model = slm.load("smollm2")
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)
    for chunk in model.stream("Once upon a time", max_tokens=50):
        print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slm.engines import memory_needed, open_engine
from slm.engines.embedding import open_embedder
from slm.errors import InvalidParameter
from slm.generation.speculative import check_draft_model
from slm.model import LanguageModel, Model
from slm.model.embedding import EmbeddingModel
from slm.remote import RemoteModel, Router, open_remote
from slm.store import catalog

__all__ = ["EmbeddingModel", "LanguageModel", "Model", "RemoteModel", "Router", "estimate_memory", "load",
           "load_embedding", "load_language", "load_local"]


def load(name: str | None = None, **options: Any) -> Model | RemoteModel | Router | EmbeddingModel:
    """Load a model by catalog alias or file path (default: the embedded SmolLM2), or open a remote
    model (``github:Phi-3.5-mini-instruct``, ``ollama:phi3.5``, a name from the configuration file) or a
    route: those have the same ``chat`` / ``chat_stream`` / ``generate`` / ``stream``.

    Options go to the engine: ``n_ctx`` (context to allocate), ``threads``, ``max_sequences``.
    ``draft``: a smaller local model with the same vocabulary (a name or path, loaded with the same options)
    that drafts tokens for speculative decoding; each request uses it unless ``speculative=False``.
    ``adapters``: LoRA adapters (``slm finetune`` names in the store, or adapter folders) loaded over the model;
    calls go through the first unless they name another (``adapter=``); ``model.with_adapter(None)`` is the
    model alone.
    An embedding model (``minilm``) loads as an ``EmbeddingModel``: ``embed(texts)``, and no text generation.
    """
    if name is not None and catalog.looks_local(name) and catalog.is_embedding(catalog.resolve(name)):
        return load_embedding(name, **options)
    return load_language(name, **options)


def load_language(name: str | None = None, **options: Any) -> Model | RemoteModel | Router:
    """``load`` for a model that generates text: an embedding model is refused, naming it."""
    if name is not None and not catalog.looks_local(name):
        remote = open_remote(name, load_language, **options)
        if remote is not None:
            return remote
    return load_local(name, **options)


def load_embedding(name: str, threads: int | None = None, **options: Any) -> EmbeddingModel:
    """An embedding model of this machine (a catalog alias, a folder or a GGUF file): a folder on the transformers
    engine, a GGUF on llama.cpp; refused, naming it, for a model that generates text. Of the load options only
    ``threads`` and ``engine`` (checked against the files) apply."""
    resolved = catalog.resolve(name)
    if not catalog.is_embedding(resolved):
        raise InvalidParameter("model", f"{resolved.name} generates text; embeddings need an embedding model "
                                        "(such as minilm)")
    unknown = sorted(k for k, v in options.items() if v is not None and k not in ("engine", "max_sequences"))
    if unknown:
        raise InvalidParameter(unknown[0], "is not an option of embedding models (only threads and engine are)")
    return EmbeddingModel(resolved.name, open_embedder(resolved.path, threads, options.get("engine")))


def load_local(name: str | None = None, draft: str | None = None, adapters: Sequence[str] = (),
               **options: Any) -> Model:
    """A model file of this machine (a catalog alias or a path), loaded in its engine with LoRA ``adapters``
    over it (the first is the one calls use); with ``draft``, a smaller one loaded beside it to draft for it
    (refused if it cannot: another vocabulary, not smaller)."""
    resolved = catalog.resolve(name)
    if catalog.is_embedding(resolved):
        raise InvalidParameter("model", f"{resolved.name} is an embedding model: it turns text into vectors "
                                        "(embed) and does not generate text")
    instruct = resolved.entry.instruct if resolved.entry else True
    draft_file = catalog.resolve(draft) if draft is not None else None
    folders = adapter_folders(adapters)
    engine = open_engine(resolved, **with_adapters(options, folders))
    try:
        drafter = open_engine(draft_file, **options) if draft_file is not None else None
        if drafter is not None:
            try:
                check_draft_model(engine, drafter)
            except InvalidParameter:
                drafter.close()
                raise
    except BaseException:
        engine.close()
        raise
    return Model(resolved.name, engine, instruct=instruct, draft=drafter, adapter=next(iter(folders), None))


def adapter_folders(adapters: Sequence[str]) -> dict[str, Path]:
    """LoRA adapters by name (in the store, or folders) -> their folders, in the order given."""
    if isinstance(adapters, str):
        adapters = [adapters]
    folders: dict[str, Path] = {}
    for asked in adapters:
        adapter = catalog.resolve_adapter(asked)
        if adapter.name in folders:
            raise InvalidParameter("adapters", f"{adapter.name!r} is named twice")
        folders[adapter.name] = adapter.path
    return folders


def with_adapters(options: dict[str, Any], folders: dict[str, Path]) -> dict[str, Any]:
    """The engine's load options with the adapters (none: as they were, for an engine that takes none)."""
    return {**options, "adapters": folders} if folders else options


def estimate_memory(name: str | None = None, draft: str | None = None, adapters: Sequence[str] = (),
                    **options: Any) -> int:
    """Bytes ``load(name, **options)`` would take (weights, KV cache, buffers), without loading it."""
    drafted = memory_needed(catalog.resolve(draft), **options) if draft is not None else 0
    return memory_needed(catalog.resolve(name), **with_adapters(options, adapter_folders(adapters))) + drafted
