"""Conversion between model formats, with the engines' own tooling, into slm's model store.

    to_hf(resolve("smollm2"))   # GGUF -> a Hugging Face folder (safetensors, config, tokenizer)

The result is written next to its final place under a ``.part`` name and renamed only when complete,
so an interrupted conversion leaves nothing that looks like a model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from slm.catalog import ResolvedModel, store_dir
from slm.errors import EngineUnavailable, InvalidParameter

FORMATS = ("hf",)


def default_output(model: ResolvedModel, to: str) -> Path:
    return store_dir() / f"{model.name.replace(':', '-')}-{to}"


def convert(model: ResolvedModel, to: str, output: Path | None = None, force: bool = False) -> Path:
    """Write ``model`` in format ``to``; the folder it went to."""
    if to not in FORMATS:
        raise InvalidParameter("to", f"cannot convert to {to!r} (choose from {', '.join(FORMATS)})")
    if model.format == to:
        raise InvalidParameter("to", f"{model.name} is already {to}")
    target = output or default_output(model, to)
    if target.exists() and not force:
        raise InvalidParameter("output", f"{target} already exists (--force replaces it)")
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _to_hf(model, partial)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _to_hf(model: ResolvedModel, out: Path) -> None:
    """GGUF -> safetensors with transformers, which dequantizes the weights to float32."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise EngineUnavailable(f"converting needs transformers and torch ({e}); "
                                "pip install torch==2.13.0 && pip install 'slm[torch]'") from None
    folder, name = str(model.path.parent), model.path.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The loaded model remembers it came from GGUF and refuses to save; a fresh one of the same
    # config takes its (dequantized) weights.
    config = loaded.config
    for attribute in ("quantization_config",):
        if hasattr(config, attribute):
            delattr(config, attribute)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
