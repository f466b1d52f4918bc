"""Conversion between model formats, with the engines' own tooling, into slm's model store.

    convert(resolve("smollm2"), "hf")            # GGUF -> a Hugging Face folder (safetensors, config, tokenizer)
    convert(resolve("smollm2"), "onnx", "int4")  # -> an ONNX Runtime GenAI folder, by its model builder
                                                 # (Phi-3/3.5-vision: a phi3v folder, slm.tools.phi3v_onnx)
    convert(resolve("smollm2"), "openvino", "int4")  # -> an OpenVINO stateful LLM folder (slm.tools.openvino_export)
    convert(resolve("tiny-phi3"), "gguf", "q8_0")  # a Hugging Face folder -> one GGUF file, for llama.cpp
                                                   # (a vision-language model's mmproj-NAME.gguf beside it)
    convert(resolve("minilm"), "gguf")           # a sentence-transformers BERT -> a GGUF llama.cpp embeds with

The result is written next to its final place under a ``.part`` name and renamed only when complete,
so an interrupted conversion leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from slm.errors import EngineError, EngineUnavailable, InvalidParameter
from slm.store.catalog import ResolvedModel, build_name, is_embedding, store_dir

FORMATS = ("hf", "onnx", "openvino", "gguf")
PRECISIONS = {"hf": ("fp32",), "onnx": ("int4", "fp32"), "openvino": ("int4", "int8", "fp16", "fp32"),
              "gguf": ("q8_0", "fp16", "fp32")}
"""Per format, the first is the default: ONNX Runtime GenAI's model builder writes int4 or fp32 for the
CPU; OpenVINO weights are NNCF's int4 (groups) or int8, float16 or float32; a GGUF is written in 8-bit
blocks, float16 or float32."""


def default_output(model: ResolvedModel, to: str, precision: str | None = None) -> Path:
    precision = precision or PRECISIONS[to][0]
    if to == "gguf":
        return store_dir() / f"{model.name.replace(':', '-')}-{precision}.gguf"
    return store_dir() / build_name(model.name, to, precision if to in ("onnx", "openvino") else None)


def convert(model: ResolvedModel, to: str, output: Path | None = None, force: bool = False,
            precision: str | None = None) -> Path:
    """Write ``model`` in format ``to`` (in ``precision``, or the format's default); where it went."""
    if to not in FORMATS:
        raise InvalidParameter("to", f"cannot convert to {to!r} (choose from {', '.join(FORMATS)})")
    precision = precision or PRECISIONS[to][0]
    if precision not in PRECISIONS[to]:
        raise InvalidParameter("precision", f"{precision!r} is not one of {', '.join(PRECISIONS[to])} for {to}")
    if model.format == to:
        raise InvalidParameter("to", f"{model.name} is already {to}")
    if to == "gguf" and model.format != "hf":
        raise InvalidParameter("to", f"{model.name} is {model.format}: GGUF is written from a Hugging Face folder "
                                     "(convert it --to hf first)")
    if to == "openvino" and model.format not in ("hf", "gguf"):
        raise InvalidParameter("to", f"{model.name} is {model.format}: OpenVINO is written from a Hugging Face "
                                     "folder or a GGUF file")
    target = output or default_output(model, to, precision)
    if to == "gguf" and target.is_dir():
        raise InvalidParameter("output", f"{target} is a folder; a GGUF is one file (name the file)")
    if to != "gguf" and target.exists() and not target.is_dir():
        raise InvalidParameter("output", f"{target} is a file; a {to} model is a folder")
    if target.exists() and not force:
        raise InvalidParameter("output", f"{target} already exists (--force replaces it)")
    partial = target.with_name(target.name + ".part")
    # a vision-language model's image projector, where the store looks for a GGUF's
    projector = target.with_name(f"mmproj-{target.stem}.gguf")
    projector_partial = projector.with_name(projector.name + ".part")
    _remove(partial)
    _remove(projector_partial)
    try:
        if to == "hf":
            _to_hf(model, partial)
        elif to == "onnx":
            _to_onnx(model, partial, precision)
        elif to == "openvino":
            _to_openvino(model, partial, precision)
        elif is_embedding(model):  # a sentence-transformers encoder: llama.cpp's BERT, with its pooling
            from slm.tools.gguf_bert import export as export_encoder

            export_encoder(model.path, partial, precision)
        else:
            from slm.tools.gguf_export import export

            export(model.path, partial, precision, projector_partial)
        _remove(target)
        partial.rename(target)
        if to == "gguf":
            _remove(projector)  # never leave a previous model's projector beside this one
            if projector_partial.exists():
                projector_partial.rename(projector)
    finally:
        _remove(partial)
        _remove(projector_partial)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _to_hf(model: ResolvedModel, out: Path) -> None:
    """GGUF -> safetensors with transformers, which dequantizes the weights to float32."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        from slm.engines.transformers import load_pretrained
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
    """Through a Hugging Face folder (made first from a GGUF), with ONNX Runtime GenAI's model builder; a
    Phi-3/3.5-vision checkpoint becomes a phi3v folder (``slm.tools.phi3v_onnx``)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise EngineUnavailable(f"converting to ONNX needs onnxruntime-genai ({e}); pip install 'slm[onnx]'") from None
    with tempfile.TemporaryDirectory(prefix="slm-convert-") as work:
        source = model.path
        if model.format == "gguf":
            source = Path(work) / "hf"
            _to_hf(model, source)

        def build(folder: Path, into: Path, extra: list[str]) -> None:
            _model_builder(model.name, folder, into, precision, Path(work) / "cache", extra)

        config = source / "config.json"
        if config.exists() and _is_phi3v(json.loads(config.read_text())):
            from slm.tools import phi3v_onnx

            phi3v_onnx.build(source, out, precision, build, Path(work))
        else:
            build(source, out, [])


def _to_openvino(model: ResolvedModel, out: Path, precision: str) -> None:
    """Through a Hugging Face folder (made first from a GGUF), with ``slm.tools.openvino_export``."""
    try:
        import openvino  # noqa: F401
        import openvino_tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        if precision in ("int4", "int8"):
            import nncf  # noqa: F401
    except ImportError as e:
        raise EngineUnavailable(f"converting to OpenVINO needs openvino, openvino-tokenizers, nncf (int4/int8) "
                                f"and torch ({e}); pip install torch==2.13.0 && pip install 'slm[torch,openvino]'"
                                ) from None
    from slm.tools import openvino_export

    with tempfile.TemporaryDirectory(prefix="slm-convert-") as work:
        source = model.path
        if model.format == "gguf":
            source = Path(work) / "hf"
            _to_hf(model, source)
        problem = openvino_export.unsupported(source)
        if problem:
            raise InvalidParameter("to", f"{model.name} cannot be converted to OpenVINO: {problem}")
        try:
            openvino_export.export(source, out, precision)
        except (RuntimeError, ValueError, TypeError) as e:  # convert_model and NNCF raise their own kinds
            raise EngineError(f"OpenVINO export of {model.name} failed: {_root_cause(e)}") from e


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error: convert_model wraps the tracer's in paragraphs of advice."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _is_phi3v(config: dict[str, object]) -> bool:
    architectures = config.get("architectures")
    return config.get("model_type") == "phi3_v" or (isinstance(architectures, list)
                                                    and "Phi3VForCausalLM" in architectures)


def _model_builder(name: str, source: Path, out: Path, precision: str, cache: Path, extra: list[str]) -> None:
    """ONNX Runtime GenAI's model builder, in its own process, over the Hugging Face folder ``source``."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(cache)]
    if extra:
        command += ["--extra_options", *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise EngineError(f"ONNX Runtime GenAI's model builder failed on {name}: {reason.strip()}")
