"""LoRA adapters on llama.cpp: a peft adapter folder -> the GGUF adapter file ``llama_adapter_lora_init`` reads.

A peft adapter holds, for each adapted ``nn.Linear`` of the Hugging Face model, ``lora_A`` (r, in) and
``lora_B`` (out, r); the layer computes ``W x + scale * B (A x)``. llama.cpp's adapter file holds the same
two matrices under the GGUF name of the weight they adapt (``blk.0.attn_q.weight.lora_a``/``.lora_b``,
in the same orientation) and computes ``scale = alpha / r`` from its ``adapter.lora.alpha``. Converted
once per adapter and model layout, into a hidden file beside the adapter. What has no place in llama.cpp's
format (DoRA, whole modules saved beside the adapter, embedding LoRA, biases) is refused by name.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from slm.errors import EngineUnavailable, InvalidParameter

ARCHITECTURES = ("llama", "qwen2", "qwen2vl", "phi3", "phimoe", "gemma3")
"""GGUF architectures whose adapters slm converts: those ``slm convert --to gguf`` writes, whose HF -> GGUF
weight layout is known here (only llama's reorders weights: ``interleave_halves``)."""
CONVERTER_VERSION = 1
"""Part of a converted file's key: bump it when the conversion changes, so cached files are remade."""
_PREFIX = "base_model.model."  # peft's prefix on the wrapped model's names
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class BaseModel:
    """What an adapter must fit in a GGUF model: its architecture, the facts its names and layout depend on,
    and the shape of each weight."""

    path: Path
    architecture: str
    blocks: int
    heads: int
    kv_heads: int
    shapes: dict[str, tuple[int, int]]
    """GGUF name -> (out, in) of each matrix in the file."""
    complete: bool
    """False for the first file of a split model: the others' weights are not in ``shapes``."""

    def key(self) -> str:
        return f"{self.architecture}:{self.blocks}:{self.heads}:{self.kv_heads}"


def read_base(path: Path) -> BaseModel:
    """The facts of the GGUF model at ``path`` an adapter is checked and converted against (header only)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))

    def field(key: str, default: Any = None) -> Any:
        found = reader.fields.get(key)
        return found.contents() if found is not None else default

    arch = str(field("general.architecture", "unknown"))
    heads = field(f"{arch}.attention.head_count", 0)
    heads = max(heads) if isinstance(heads, list) else int(heads)
    kv_heads = field(f"{arch}.attention.head_count_kv", heads)
    kv_heads = max(kv_heads) if isinstance(kv_heads, list) else int(kv_heads)
    shapes = {t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}
    return BaseModel(Path(path), arch, int(field(f"{arch}.block_count", 0)), heads, kv_heads, shapes,
                     complete=int(field("split.count", 1)) <= 1)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise EngineUnavailable("LoRA adapters on llama.cpp need the gguf package: pip install gguf") from None
    return gguf


# --- reading the peft folder ---------------------------------------------------------------------

def read_config(name: str, folder: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, once it is a plain LoRA llama.cpp can run (InvalidParameter
    naming the adapter and what it is not)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidParameter("adapters", f"adapter {name!r}: {folder}/adapter_config.json is unreadable: {e}") \
            from None
    refusals = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", f"is {config.get('peft_type')}, not LORA"),
        "use_dora": (bool(config.get("use_dora")), "DoRA has no place in llama.cpp's adapter format"),
        "modules_to_save": (bool(config.get("modules_to_save")),
                            f"saves whole modules ({config.get('modules_to_save')}) llama.cpp cannot load"),
        "lora_bias": (bool(config.get("lora_bias")), "LoRA biases have no place in llama.cpp's adapter format"),
        "trainable_token_indices": (bool(config.get("trainable_token_indices")),
                                    "trained token embeddings have no place in llama.cpp's adapter format"),
        "alora_invocation_tokens": (bool(config.get("alora_invocation_tokens")), "aLoRA is not supported"),
        "target_parameters": (bool(config.get("target_parameters")), "LoRA on bare parameters is not supported"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "transposed (Conv1D) weights are not supported"),
        "layer_replication": (bool(config.get("layer_replication")), "replicated layers are not supported"),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise InvalidParameter("adapters", f"adapter {name!r} cannot run on llama.cpp: its {key} {why}")
    return config


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 (the format: a little-endian u64 header length, a JSON
    header of dtype, shape and byte range, then the data). Without the safetensors package, which a
    llama.cpp-only install lacks."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise InvalidParameter("adapters", f"{path}: tensor {key} is {info['dtype']}, not a float type")
        start, end = info["data_offsets"]
        raw = np.frombuffer(data, dtype=_DTYPES[info["dtype"]], count=-1, offset=8 + size + start)
        raw = raw[: (end - start) // raw.itemsize]
        if info["dtype"] == "BF16":  # bfloat16 is float32's top half
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = raw.astype(np.float32).reshape(info["shape"])
    return tensors


def converted_bytes(folder: Path) -> int:
    """What the adapter at ``folder`` takes in memory once loaded (float32), from its safetensors header."""
    with (Path(folder) / _WEIGHTS).open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(4 * math.prod(info["shape"]) for key, info in header.items() if key != "__metadata__")


def lora_pairs(name: str, tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module name (``model.layers.0.self_attn.q_proj``) -> (A (r, in), B (out, r)); InvalidParameter naming
    the first tensor that is not half of such a pair."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None or tensor.ndim != 2:
            why = "embedding LoRA" if "lora_embedding" in key else "not a LoRA matrix of a linear layer"
            raise InvalidParameter("adapters", f"adapter {name!r} cannot run on llama.cpp: its tensor {key} is "
                                               f"{why}")
        module = match.group(1).replace("model.language_model.", "model.")  # a vision-language model's text part
        halves.setdefault(module, {})[match.group(2)] = tensor
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"} or half["A"].shape[0] != half["B"].shape[1]:
            raise InvalidParameter("adapters", f"adapter {name!r}: the LoRA matrices of {module} do not pair up")
        pairs[module] = (half["A"], half["B"])
    return pairs


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override (``rank_pattern``, ``alpha_pattern``): the value of the first key that
    is the module's name or a regex matching its end."""
    for key, value in patterns.items():
        if key == module or re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def _scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """peft's factor on B A for one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = float(_pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


# --- converting ----------------------------------------------------------------------------------

def interleave_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from (first half, second half) to pairs (x0, x_half, x1, x_half+1, ...), as
    llama.cpp's llama rotates adjacent pairs where transformers rotates the two halves of each head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(name: str, config: Mapping[str, Any], pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 base: BaseModel, alpha: float) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(GGUF weight name, lora_a, lora_b) for each module, in llama.cpp's layout, each checked against the
    model's weight (InvalidParameter naming the adapter, the module and what does not match). llama.cpp
    scales by ``alpha / r``; a module peft scales otherwise (rsLoRA, ``alpha_pattern``) has it in B."""
    gguf = _gguf()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[base.architecture]
    names = gguf.get_tensor_name_map(arch, base.blocks)
    where = f"{base.path.name} ({base.architecture})"
    for module, (a, b) in pairs.items():
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise InvalidParameter("adapters", f"adapter {name!r} does not fit {where}: its module {module} has "
                                               "no weight of that name in GGUF")
        shape = base.shapes.get(target)
        if shape is None and base.complete:
            raise InvalidParameter("adapters", f"adapter {name!r} does not fit {where}: the model has no "
                                               f"{target} for its module {module}")
        if shape is not None and shape != (b.shape[0], a.shape[1]):
            raise InvalidParameter("adapters", f"adapter {name!r} does not fit {where}: its module {module} maps "
                                               f"{a.shape[1]} -> {b.shape[0]} features, the model's {target} "
                                               f"{shape[1]} -> {shape[0]}")
        rank = a.shape[0]
        factor = _scale(config, module, rank) * rank / alpha if alpha else _scale(config, module, rank)
        if base.architecture == "llama" and module.endswith(("q_proj", "k_proj")):
            # B's rows are the weight's output rows: reordered as convert_hf_to_gguf reorders the weight's
            b = interleave_halves(b, base.heads if module.endswith("q_proj") else base.kv_heads)
        yield target, a, (b if math.isclose(factor, 1.0) else b * np.float32(factor))


def write_adapter(path: Path, name: str, folder: Path, base: BaseModel) -> None:
    """Convert the peft adapter ``folder`` for the model ``base`` into a GGUF adapter file at ``path``."""
    gguf = _gguf()
    config = read_config(name, folder)
    if not (folder / _WEIGHTS).is_file():
        raise InvalidParameter("adapters", f"adapter {name!r}: {folder} has no {_WEIGHTS}")
    if base.architecture not in ARCHITECTURES:
        raise InvalidParameter("adapters", f"adapter {name!r}: slm converts LoRA adapters for llama.cpp's "
                                           f"{', '.join(ARCHITECTURES)}, not {base.architecture}")
    pairs = lora_pairs(name, read_safetensors(folder / _WEIGHTS))
    alpha = float(config.get("lora_alpha", 8))
    tensors = list(gguf_tensors(name, config, pairs, base, alpha))  # every check passes before a byte is written
    writer = gguf.GGUFWriter(str(path), base.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    for target, a, b in tensors:  # float32: adapters are small, and peft's reference runs in float32
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_adapter(name: str, folder: Path, base: BaseModel) -> Path:
    """The GGUF file of the peft adapter ``folder`` for the model ``base``, converted on first use and kept
    beside the adapter (or in the temporary directory when its folder is read-only). Keyed on the adapter's
    content and the model's layout, so a retrained adapter or another model is converted anew."""
    folder = Path(folder)
    read_config(name, folder)  # refused by its configuration before anything is read or written
    digest = hashlib.sha256()
    for part in ("adapter_config.json", _WEIGHTS):
        try:
            digest.update((folder / part).read_bytes())
        except OSError as e:
            raise InvalidParameter("adapters", f"adapter {name!r}: cannot read {folder / part}: {e}") from None
    # one file per model layout; a conversion of an older version of the adapter for it is removed
    layout = hashlib.sha256(f"{CONVERTER_VERSION}:{base.key()}".encode()).hexdigest()[:8]
    stem = f".slm-lora-{base.architecture}-{layout}-"
    filename = f"{stem}{digest.hexdigest()[:16]}.gguf"
    # for a read-only folder, a folder of its own in the temporary directory
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    elsewhere = Path(tempfile.gettempdir()) / "slm-lora" / where
    for place in (folder, elsewhere):
        if (place / filename).is_file():
            return place / filename
    for place in (folder, elsewhere):
        try:
            place.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=".slm-lora-", suffix=".tmp", dir=place)
        except OSError:
            continue  # a read-only adapter folder
        os.close(handle)
        try:
            write_adapter(Path(temporary), name, folder, base)
            # renamed when complete: a concurrent load never reads half a file
            os.replace(temporary, place / filename)
        finally:
            Path(temporary).unlink(missing_ok=True)
        for stale in place.glob(f"{stem}*.gguf"):
            if stale.name != filename:
                stale.unlink(missing_ok=True)
        return place / filename
    raise InvalidParameter("adapters", f"adapter {name!r}: nowhere to write its GGUF conversion")


# --- loaded adapters -------------------------------------------------------------------------------

class Adapters:
    """The LoRA adapters loaded beside one llama.cpp model, and which one its context runs through. Loaded
    before the context is made (llama.cpp sizes the context's graph for the model's adapters)."""

    def __init__(self, model: lc.llama_model_p, model_path: Path, folders: Mapping[str, Path],
                 clear_log: Callable[[], None], logged_failure: Callable[[str], str]) -> None:
        self._handles: dict[str, Any] = {}
        self.active: str | None = None
        """The adapter the context runs through now (None: the model alone, as a new context does)."""
        if not folders:
            return
        base = read_base(model_path)
        try:
            for name, folder in folders.items():
                path = gguf_adapter(name, Path(folder), base)
                clear_log()
                handle = lc.llama_adapter_lora_init(model, str(path).encode())
                if not handle:
                    raise InvalidParameter("adapters", f"adapter {name!r} ({folder}) does not fit "
                                           f"{model_path.name}: {logged_failure('llama.cpp could not load it')}")
                self._handles[name] = handle
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._handles)

    def use(self, ctx: lc.llama_context_p, name: str | None) -> None:
        """Make the context run through adapter ``name`` (None: none); nothing when it already does, since a
        change costs llama.cpp a new compute graph."""
        if name == self.active:
            return
        if name is None:
            lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(self._handles[name])
            lc.llama_set_adapters_lora(ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        self.active = name

    def close(self) -> None:
        """Free every adapter (before the model, and after any context that runs through them)."""
        for handle in self._handles.values():
            lc.llama_adapter_lora_free(handle)
        self._handles.clear()
        self.active = None


def by_adapter(adapters: Sequence[str | None], active: str | None) -> list[tuple[str | None, list[int]]]:
    """The rows of a batch grouped by their sequences' adapter: (adapter, rows), in the order they first
    appear, but the adapter the context runs through now first (one switch fewer)."""
    groups: dict[str | None, list[int]] = {}
    if active in adapters:
        groups[active] = []
    for row, adapter in enumerate(adapters):
        groups.setdefault(adapter, []).append(row)
    return list(groups.items())
