"""The engines slm has, one spec each, and how a model is matched to one and loaded in it.

A spec says everything the layers above need before the engine's library is imported (so ``slm`` starts
without torch): its names, the file formats it runs, where its adapter is, how to find and install its
library, and the load options it takes. The order of ``REGISTRY`` is ``auto``'s preference.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from types import ModuleType
from typing import Any

from slm.engines.base import Engine, LlamaCppOptions, LoadOptions, SharedCacheOptions
from slm.errors import EngineUnavailable, InvalidParameter, SlmError
from slm.store import catalog
from slm.store.catalog import ResolvedModel

VISION_LOADERS: dict[str, str] = {
    "gemma3": "slm.engines.vision_native:load_gemma3",
    "llava": "slm.engines.vision_native:load_llava",
    "idefics3": "slm.engines.vision_native:load_idefics3",
    "smolvlm": "slm.engines.vision_native:load_smolvlm",
    "qwen2_5_vl": "slm.engines.vision_native:load_qwen2_5_vl",
    "phi3_v": "slm.engines.phi3v:load",
}
"""The vision-language models the transformers engine reads images of: config.json's model_type ->
``module:function`` that loads such a folder (``function(folder) -> vision.Loaded``), imported only then."""
ONNX_IMAGE_TYPES = ("phi3v",)
"""The genai_config.json model types whose images the ONNX Runtime GenAI engine reads."""


@dataclass(frozen=True)
class EngineSpec:
    """One engine, as the registry knows it."""

    name: str
    """As ``--engine`` takes it: ``llamacpp``."""
    display_name: str
    """As the engine calls itself (``Engine.name``): ``llama.cpp``."""
    formats: frozenset[str]
    """The model formats it runs (``ResolvedModel.format``)."""
    module: str
    """The adapter module, imported only to load a model."""
    class_name: str
    package: str
    """The library to look for (``importlib.util.find_spec``) to know it is installed."""
    install: str
    """What to run to install it."""
    options: type[LoadOptions]
    """Its load options: the fields of this class, and no others."""
    image_types: frozenset[str] | None = None
    """The model types whose images it reads (``catalog.declared_type``); None: whatever its files bring (on
    llama.cpp, a projector libmtmd loads)."""

    @property
    def takes(self) -> frozenset[str]:
        """The names of the load options it takes."""
        return frozenset(f.name for f in fields(self.options))


REGISTRY: dict[str, EngineSpec] = {spec.name: spec for spec in (
    EngineSpec(name="llamacpp", display_name="llama.cpp", formats=frozenset({"gguf"}),
               module="slm.engines.llamacpp", class_name="LlamaCppEngine", package="llama_cpp",
               install="pip install llama-cpp-python", options=LlamaCppOptions),
    EngineSpec(name="transformers", display_name="transformers", formats=frozenset({"hf", "gguf"}),
               module="slm.engines.transformers", class_name="TransformersEngine", package="torch",
               install="pip install torch==2.13.0 && pip install 'slm[torch]'", options=SharedCacheOptions,
               image_types=frozenset(VISION_LOADERS)),
    EngineSpec(name="onnx", display_name="onnxruntime-genai", formats=frozenset({"onnx"}),
               module="slm.engines.onnx", class_name="OnnxGenAIEngine", package="onnxruntime_genai",
               install="pip install 'slm[onnx]'", options=LoadOptions,
               image_types=frozenset(ONNX_IMAGE_TYPES)),
    EngineSpec(name="openvino", display_name="openvino", formats=frozenset({"openvino"}),
               module="slm.engines.openvino", class_name="OpenVINOEngine", package="openvino",
               install="pip install 'slm[openvino]'", options=LoadOptions, image_types=frozenset()),
)}
"""Every engine by its name, in ``auto``'s order of preference."""

MEASURED: dict[str, dict[str, float]] = {
    "llamacpp": {"one sequence": 129.7, "8 sequences at once": 185.6},
    "transformers": {"one sequence": 15.8, "8 sequences at once": 82.6},
    "onnx": {"one sequence": 109.3, "8 sequences at once": 172.6},
    "openvino": {"one sequence": 81.3, "8 sequences at once": 294.1},
}
"""Decode tokens/s of SmolLM2 under slm's loop on each engine (llama.cpp Q4_1, transformers float32, ONNX
Runtime GenAI and OpenVINO int4), one sequence and 8 at once, as ``benchmarks/engines.py`` measured them on a
2-core x86 CPU (``benchmarks/results/engines.json``; a test keeps the two equal). ``auto``'s order among the
engines that run one format follows them (llama.cpp before transformers for a GGUF), and ``choose_why``
points at a build in the store that ran faster."""

ENGINES = {spec.name: spec.display_name for spec in REGISTRY.values()}
"""Engine names as the CLI takes them -> as the engines call themselves."""

LOAD_OPTIONS = frozenset().union(*(spec.takes for spec in REGISTRY.values()))
"""Every load option some engine takes."""


def choose(model: ResolvedModel, engine: str | None = None) -> str:
    """The engine that runs ``model``: the one asked for (checked), else ``auto``'s pick."""
    return choose_why(model, engine)[0]


def choose_why(model: ResolvedModel, engine: str | None = None) -> tuple[str, str]:
    """(engine, why): the one asked for (checked), else by the model's files, the engines installed and the
    hardware. A GGUF runs on llama.cpp (its quantized kernels), on transformers only when llama.cpp is
    missing; a Hugging Face folder on transformers (on the GPU when there is one); an ONNX folder on ONNX
    Runtime GenAI."""
    if engine not in (None, "auto"):
        if engine not in REGISTRY:
            raise InvalidParameter("engine", f"unknown engine {engine!r} (choose from {', '.join(REGISTRY)}, auto)")
        if model.format not in REGISTRY[engine].formats:
            raise _cannot_run(model, engine)
        return engine, f"asked for with --engine {engine}"
    candidates = engines_for(model)
    if not candidates:
        raise EngineUnavailable(f"{model.name} is {model.format}; slm has no engine for {model.format} yet")
    installed = [name for name in candidates if installed_engine(name)]
    if not installed:
        first = candidates[0]
        raise EngineUnavailable(f"no engine that runs {model.format} is installed; {REGISTRY[first].install}")
    chosen = installed[0]
    if model.format == "gguf" and chosen == "llamacpp":
        why = "a GGUF file: llama.cpp runs its quantized weights as they are"
    elif model.format == "gguf":
        why = "a GGUF file, and llama.cpp is not installed: transformers dequantizes it to float32"
    elif model.format == "onnx":
        why = "an ONNX Runtime GenAI folder"
    elif model.format == "openvino":
        why = "an OpenVINO folder"
    elif _cuda():
        return chosen, "a Hugging Face folder: transformers runs it on the GPU (CUDA)"
    else:
        why = "a Hugging Face folder: transformers runs it on the CPU, in float32"
    return chosen, why + _faster_build(model, chosen)


def _faster_build(model: ResolvedModel, chosen: str) -> str:
    """A clause naming the build of ``model`` in the store (``slm convert``'s) that runs on the engine
    measured fastest against ``chosen`` (``MEASURED``, one sequence or a batch), when one beats it by a
    fifth; else empty."""
    best: tuple[float, str, str, str] | None = None
    for name, spec in REGISTRY.items():
        builds = [build for fmt in sorted(spec.formats - {model.format}) for build in catalog.converted(model, fmt)]
        for figure in MEASURED[name] if builds and name != chosen else ():
            gain = MEASURED[name][figure] / MEASURED[chosen][figure]
            if gain >= 1.2 and (best is None or gain > best[0]):
                best = (gain, name, builds[0].name, figure)
    if best is None:
        return ""
    gain, name, build, figure = best
    return (f"; its {REGISTRY[name].display_name} build {build} in the store decoded {gain:.1f}x as fast "
            f"({figure}, slm's engine benchmark on a CPU; --engine {name} runs it)")


CONVERSIONS = {"hf": {"gguf": "hf"}, "gguf": {"hf": "gguf"}, "onnx": {"hf": "onnx", "gguf": "hf,onnx"},
               "openvino": {"hf": "openvino", "gguf": "openvino"}}
"""Per format an engine runs, per format a model comes in: the ``slm convert --to`` steps between them."""


def _cannot_run(model: ResolvedModel, engine: str) -> InvalidParameter:
    """``engine`` cannot run ``model``'s format: the engines that can, and the ``slm convert`` command that
    makes a build it runs, when there is one."""
    can = ", ".join(engines_for(model)) or "none"
    message = f"{engine} cannot run {model.name} ({model.format}); engines that can: {can}"
    for fmt in sorted(REGISTRY[engine].formats):
        steps = CONVERSIONS.get(fmt, {}).get(model.format)
        if steps is not None:
            name, commands = model.name, []
            for to in steps.split(","):
                commands.append(f"slm convert {name} --to {to}")
                name = catalog.build_name(name, to)
            return InvalidParameter("engine", f"{message}; `{' && '.join(commands)}` makes a build it runs")
    return InvalidParameter("engine", message)


def for_engine(model: ResolvedModel, engine: str | None) -> ResolvedModel:
    """``model`` itself, or, when ``engine`` is asked for and cannot run its format, the build of it that
    ``slm convert`` left in the store for that engine (``slm run smollm2 --engine openvino`` runs
    ``smollm2-openvino-int4``); without one, the error names the command that makes it."""
    if engine in (None, "auto") or engine not in REGISTRY or model.format in REGISTRY[engine].formats:
        return model
    for fmt in sorted(REGISTRY[engine].formats):
        builds = catalog.converted(model, fmt)
        if builds:
            return catalog.resolve(str(builds[0]))
    raise _cannot_run(model, engine)


def image_side(model: ResolvedModel, engine: str | None = None) -> str | None:
    """What reads images for ``model`` on ``engine`` (``auto``'s choice when None), as its files say; None when
    it reads none there: a text model, or a vision model of a type that engine does not drive."""
    side = catalog.image_side(model)
    if side is None:
        return None
    try:
        driven = REGISTRY[choose(model, engine)].image_types
    except SlmError:
        return None  # no engine here runs it, so nothing reads its images
    return side if driven is None or catalog.declared_type(model) in driven else None


def installed_engine(name: str) -> bool:
    """Whether ``name``'s library is importable (found without importing it)."""
    return importlib.util.find_spec(REGISTRY[name].package) is not None


def _cuda() -> bool:
    """A CUDA device torch can use (torch imported only when it is installed)."""
    if not installed_engine("transformers"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def engines_for(model: ResolvedModel) -> list[str]:
    """Every engine that can run ``model``'s format, in ``auto``'s order."""
    return [spec.name for spec in REGISTRY.values() if model.format in spec.formats]


def load_options(engine: str, given: Mapping[str, Any]) -> LoadOptions:
    """``given`` as ``engine``'s typed load options, checked. ``None`` is not given; a name no engine takes,
    or one this engine does not take, is refused by name (before anything is loaded)."""
    spec = REGISTRY[engine]
    for option, value in given.items():
        if option not in LOAD_OPTIONS:
            raise InvalidParameter(option, f"not a load option (the options are {', '.join(sorted(LOAD_OPTIONS))})")
        if value is not None and option not in spec.takes:
            raise InvalidParameter(option, f"{spec.display_name} does not support {option} "
                                           f"(it takes {', '.join(f.name for f in fields(spec.options))})")
    return spec.options(**{option: value for option, value in given.items() if value is not None})


def open_engine(model: ResolvedModel, engine: str | None = None, **options: Any) -> Engine:
    """Load ``model`` (or its build for ``engine``: ``for_engine``) in ``engine`` (default: the one for its
    format) with these load options."""
    model = for_engine(model, engine)
    name = choose(model, engine)
    if model.projector is not None and "mmproj" in REGISTRY[name].takes and options.get("mmproj") is None:
        options = {**options, "mmproj": model.projector}
    checked = load_options(name, options)
    cls = getattr(_adapter(name), REGISTRY[name].class_name)
    loaded: Engine = cls(model.path, **asdict(checked))
    return loaded


def memory_needed(model: ResolvedModel, engine: str | None = None, **options: Any) -> int:
    """Bytes that ``open_engine(model, engine, **options)`` would take, found without loading the weights."""
    model = for_engine(model, engine)
    name = choose(model, engine)
    checked = load_options(name, options)
    return int(_adapter(name).memory_needed(model.path, checked))


def _adapter(name: str) -> ModuleType:
    spec = REGISTRY[name]
    try:
        return importlib.import_module(spec.module)
    except ImportError as e:
        raise EngineUnavailable(f"the {name} engine is not installed ({e}); {spec.install}") from None
