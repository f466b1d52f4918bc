"""GGUF quantization with llama.cpp's own quantizer (``llama_model_quantize``, as ``llama-quantize`` runs it).

    quantize(resolve("smollm2-hf-fp16"), "q4_k_m", Path("smollm2-q4_k_m.gguf"))

From a float (f32, f16, bf16) or 8-bit (q8_0) GGUF to any type llama.cpp writes; a file already below 8 bits
is requantized only when asked (``allow_requantize``): its weights have lost what a new type would keep. The
result is written under a ``.part`` name and renamed when complete.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping
from pathlib import Path

import llama_cpp as lc
import numpy as np

from slm.engines.llamacpp import clear_log, file_metadata, logged_failure
from slm.errors import InvalidParameter, WriteFailed
from slm.store.catalog import ResolvedModel, store_dir
from slm.tools.imatrix import as_quantize_parameter

PREFIX = "LLAMA_FTYPE_MOSTLY_"
TYPES: dict[str, int] = {"f32": lc.LLAMA_FTYPE_ALL_F32} | {
    name.removeprefix(PREFIX).lower(): int(value) for name, value in vars(lc).items() if name.startswith(PREFIX)
}
"""What ``--type`` takes (llama-quantize's names, lower case): q4_k_m, q5_k_m, q6_k, q8_0, f16, ..."""
KEEPS = ("f32", "f16", "bf16", "q8_0")
"""Source types quantized without ``allow_requantize``: float weights, or 8-bit blocks (llama-quantize's own
advice for when no float file is at hand)."""
NAMES = {value: name for name, value in TYPES.items()}


def source_type(path: Path) -> str:
    """The type of a GGUF file's weights (``general.file_type``, as a ``TYPES`` name), or "unknown"."""
    value = file_metadata(path, "general.file_type")["general.file_type"]
    return NAMES.get(int(value), f"type {value}") if value is not None and value.isdigit() else "unknown"


def check(model: ResolvedModel, kind: str, allow_requantize: bool = False, imatrix: bool = False) -> str:
    """The source's type, once ``model`` is a GGUF that may be quantized to ``kind`` (with an importance matrix
    or not)."""
    if kind not in TYPES:
        raise InvalidParameter("type", f"unknown quantization type {kind!r} (choose from {', '.join(sorted(TYPES))})")
    if kind in NEEDS_IMATRIX and not imatrix:
        raise InvalidParameter("type", f"{kind} needs an importance matrix: --imatrix TEXT computes one from a "
                                       "text like the ones the model will read")
    if model.format != "gguf":
        raise InvalidParameter("model", f"{model.name} is {model.format}; slm quantize reads a GGUF file "
                                        "(slm convert MODEL --to gguf --precision fp16 writes one)")
    source = source_type(model.path)
    if source not in KEEPS and not allow_requantize:
        raise InvalidParameter("model", f"{model.name} is already {source}: quantizing it again loses more than "
                                        "quantizing its float weights would (--allow-requantize does it anyway)")
    return source


def default_output(model: ResolvedModel, kind: str) -> Path:
    """Where the quantized file goes without ``--out``: the store, as the source's name with ``kind`` in place
    of its float or 8-bit type (``smollm2-hf-fp16`` -> ``smollm2-hf-q4_k_m.gguf``)."""
    stem = re.sub(r"-(fp32|fp16|f32|f16|bf16|q8_0)$", "", model.name.removesuffix(".gguf"), flags=re.IGNORECASE)
    return store_dir() / f"{stem}-{kind}.gguf"


def output_for(name: str) -> Path:
    """``--out NAME``: a path when it looks like one (a folder in it, or ``.gguf``), else the store's ``NAME.gguf``."""
    path = Path(name).expanduser()
    if name.endswith(".gguf") or len(path.parts) > 1:
        return path if name.endswith(".gguf") else path.with_name(path.name + ".gguf")
    return store_dir() / f"{name}.gguf"


NEEDS_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "q2_k_s"})
"""Types llama.cpp makes only with an importance matrix (its ``tensor_requires_imatrix``)."""


def quantize(model: ResolvedModel, kind: str, output: Path, allow_requantize: bool = False,
             threads: int | None = None, imatrix: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``model`` quantized to ``kind`` into ``output`` (a ``.gguf`` file, which must not exist), with the
    importance matrix ``imatrix`` (``slm.tools.imatrix.importance``) if one is given."""
    check(model, kind, allow_requantize, imatrix is not None)
    partial = output.with_name(output.name + ".part")
    partial.unlink(missing_ok=True)
    params = lc.llama_model_quantize_default_params()
    params.ftype = TYPES[kind]
    params.nthread = threads or 0
    params.allow_requantize = True  # checked above: a q8_0 source has quantized tensors too
    if imatrix is not None:
        entries, _kept = as_quantize_parameter(imatrix)  # alive until the quantizer is done
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lc.llama_model_imatrix_data))
    clear_log()
    try:
        status = lc.llama_model_quantize(str(model.path).encode(), str(partial).encode(), params)
        if status != 0 or not partial.exists():
            reason = logged_failure(f"status {status}")
            raise WriteFailed(f"llama.cpp could not quantize {model.name} to {kind} into {output}: {reason}")
        partial.rename(output)
    finally:
        partial.unlink(missing_ok=True)
    return output
