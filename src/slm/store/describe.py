"""What a model's own files say about it, read without loading it: architecture, trained context, parameter
count and the precision of its weights, for ``slm show``, ``slm list`` and the server's model listings.

A folder declares these in its configuration (config.json, genai_config.json) and, for OpenVINO, in the
runtime info NNCF writes into openvino_model.xml; a catalog GGUF has its entry. What the files do not say is
None (shown as unknown), never a guess from the file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slm.store.catalog import ResolvedModel, declared, declared_type

OPENVINO_MODEL = "openvino_model.xml"
_NNCF_MODE = re.compile(rb'<weight_compression>.*?<mode value="([a-z0-9_]+)"', re.DOTALL)
_RT_INFO_BYTES = 64 << 10
"""NNCF's runtime info sits at the end of openvino_model.xml, after the graph: the tail read for it."""


@dataclass(frozen=True)
class Description:
    """What a model's files declare; None where they do not say."""

    architecture: str | None
    """config.json's ``model_type`` (genai_config.json's ``model.type``)."""
    context_length: int | None
    """The context it was trained for."""
    parameters: int | None
    precision: str | None
    """Of the weights: a GGUF's quantization (``Q4_1``), a Hugging Face folder's dtype (``float32``), an
    OpenVINO folder's as ``slm convert --precision`` names it (``int4``, ``int8``, ``fp16``, ``fp32``)."""


def describe(model: ResolvedModel) -> Description:
    """``model`` as its files (or its catalog entry) describe it, without loading it."""
    if model.format == "gguf":
        quantization = model.entry.quantization if model.entry is not None else None
        return Description(architecture=None, context_length=None, parameters=None, precision=quantization)
    _, config = declared(model)
    if model.format == "onnx":
        settings = config.get("model")
        context = settings.get("context_length") if isinstance(settings, dict) else None
        return Description(architecture=declared_type(model), context_length=_int(context), parameters=None,
                           precision=None)
    text = config.get("text_config", config)
    text = text if isinstance(text, dict) else {}
    precision = _openvino_precision(model) if model.format == "openvino" else text.get("dtype") or config.get(
        "torch_dtype")
    return Description(architecture=declared_type(model), context_length=_int(text.get("max_position_embeddings")),
                       parameters=decoder_parameters(text), precision=str(precision) if precision else None)


def human_count(parameters: int) -> str:
    """A parameter count as model cards write it: ``135M``, ``0.5B``, ``3.8B``."""
    if parameters >= 10**9:
        return f"{parameters / 1e9:.1f}B"
    return f"{parameters / 1e6:.0f}M"


# Per model type: (RMS norms per layer, biases on q/k/v whatever the config says, a norm on q and k per head)
_DECODERS = {
    "llama": (2, False, False),
    "mistral": (2, False, False),
    "phi3": (2, False, False),
    "qwen2": (2, True, False),
    "gemma3_text": (4, False, True),
}


def decoder_parameters(config: dict[str, Any]) -> int | None:
    """The weights of a dense decoder-only transformer of a type in ``_DECODERS``, counted from its config:
    token embeddings (an output matrix too unless tied), per layer the q/k/v/o projections (and their
    biases), a gated MLP and its norms, and the final norm. None for any other type (experts, vision towers,
    layouts not written down here) or a config that lacks a size."""
    kind = _DECODERS.get(str(config.get("model_type")))
    try:
        hidden, layers, heads = (int(config[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
        inner, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError):
        return None
    if kind is None or "tie_word_embeddings" not in config:
        return None
    norms, qkv_bias, qk_norm = kind
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if qkv_bias or config.get("attention_bias"):
        attention += q + 2 * kv + (0 if qkv_bias else hidden)  # Qwen2: q, k, v; attention_bias: o too
    mlp = 3 * hidden * inner + (2 * inner + hidden if config.get("mlp_bias") else 0)
    layer = attention + mlp + norms * hidden + (2 * head_dim if qk_norm else 0)
    embeddings = vocab * hidden * (1 if config["tie_word_embeddings"] else 2)
    return embeddings + layers * layer + hidden


def _openvino_precision(model: ResolvedModel) -> str | None:
    """NNCF's compression mode (``int4_asym`` -> ``int4``) from the runtime info it writes; else float16 or
    float32 by the constants' element type."""
    xml = model.path / OPENVINO_MODEL
    try:
        with xml.open("rb") as f:
            f.seek(max(0, xml.stat().st_size - _RT_INFO_BYTES))
            mode = _NNCF_MODE.search(f.read())
            if mode is not None:
                return mode.group(1).decode().split("_")[0]
            f.seek(0)
            return "fp16" if b'element_type="f16"' in f.read() else "fp32"
    except OSError:
        return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
