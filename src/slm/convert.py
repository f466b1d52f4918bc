"""Conversion between model formats, with the engines' own tooling, into slm's model store.

    convert(resolve("smollm2"), "hf")            # GGUF -> a Hugging Face folder (safetensors, config, tokenizer)
    convert(resolve("smollm2"), "onnx", "int4")  # -> an ONNX Runtime GenAI folder, by its model builder

The result is written next to its final place under a ``.part`` name and renamed only when complete,
so an interrupted conversion leaves nothing that looks like a model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from slm.catalog import ResolvedModel, store_dir
from slm.errors import EngineError, EngineUnavailable, InvalidParameter

FORMATS = ("hf", "onnx")
PRECISIONS = ("int4", "fp32")
"""What ONNX Runtime GenAI's model builder writes for the CPU."""


def default_output(model: ResolvedModel, to: str, precision: str = "int4") -> Path:
    suffix = f"onnx-{precision}" if to == "onnx" else to
    return store_dir() / f"{model.name.replace(':', '-')}-{suffix}"


def convert(model: ResolvedModel, to: str, output: Path | None = None, force: bool = False,
            precision: str = "int4") -> Path:
    """Write ``model`` in format ``to`` (ONNX in ``precision``); the folder it went to."""
    if to not in FORMATS:
        raise InvalidParameter("to", f"cannot convert to {to!r} (choose from {', '.join(FORMATS)})")
    if precision not in PRECISIONS:
        raise InvalidParameter("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if model.format == to:
        raise InvalidParameter("to", f"{model.name} is already {to}")
    target = output or default_output(model, to, precision)
    if target.exists() and not force:
        raise InvalidParameter("output", f"{target} already exists (--force replaces it)")
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if to == "hf":
            _to_hf(model, partial)
        else:
            _to_onnx(model, partial, precision)
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
        from transformers import AutoModelForCausalLM

        from slm.engines.pytorch import load_pretrained
    except ImportError as e:
        raise EngineUnavailable(f"converting needs transformers and torch ({e}); "
                                "pip install torch==2.13.0 && pip install 'slm[torch]'") from None
    tokenizer, loaded = load_pretrained(model.path)
    # The loaded model remembers it came from GGUF and refuses to save; a fresh one of the same
    # config takes its (dequantized) weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _to_onnx(model: ResolvedModel, out: Path, precision: str) -> None:
    """Through a Hugging Face folder (made first from a GGUF), with ONNX Runtime GenAI's model builder."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise EngineUnavailable(f"converting to ONNX needs onnxruntime-genai ({e}); pip install 'slm[onnx]'") from None
    with tempfile.TemporaryDirectory(prefix="slm-convert-") as work:
        source = model.path
        if model.format == "gguf":
            source = Path(work) / "hf"
            _to_hf(model, source)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(Path(work) / "cache")]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
            raise EngineError(f"ONNX Runtime GenAI's model builder failed on {model.name}: {reason.strip()}")
