"""The engine registry (slm.engines.registry) and the bookkeeping the engines share (slm.engines.base.Sequences),
on SmolLM2 in each engine: the GGUF in llama.cpp, the Hugging Face folder `slm convert` writes in transformers,
its int4 ONNX build in ONNX Runtime GenAI, its float32 OpenVINO export in OpenVINO."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import slm
from slm.engines import ENGINES, REGISTRY, Engine, choose_why, engines_for, memory_needed, open_engine
from slm.engines.registry import MEASURED, for_engine
from slm.errors import EngineError, InvalidParameter
from slm.store import catalog

NOT_ONNX = {"kv_cells": 4096, "flash_attention": True, "n_batch": 256}
"""Options ONNX Runtime GenAI has no use for: its Generators each allocate their own cache, in one call."""
NOT_TRANSFORMERS = {"flash_attention": False, "n_batch": 64}


@pytest.fixture(scope="module")
def paths(request: pytest.FixtureRequest, smollm2_path: Path) -> dict[str, Path]:
    """A SmolLM2 for each engine, by the engine's name."""
    return {"llamacpp": smollm2_path, "transformers": request.getfixturevalue("smollm2_hf_path"),
            "onnx": request.getfixturevalue("smollm2_onnx_int4_path"),
            "openvino": request.getfixturevalue("smollm2_openvino_fp32_path")}


def test_the_registry_names_each_engine_as_its_class_does() -> None:
    assert ENGINES == {"llamacpp": "llama.cpp", "transformers": "transformers", "onnx": "onnxruntime-genai",
                       "openvino": "openvino"}
    for name, spec in REGISTRY.items():
        assert spec.name == name
        cls = getattr(importlib.import_module(spec.module), spec.class_name)
        assert cls.name == spec.display_name == ENGINES[name]
        assert importlib.util.find_spec(spec.package) is not None


def test_each_engine_class_takes_exactly_its_specs_load_options_with_the_same_defaults() -> None:
    """``open_engine`` passes the typed options to the constructor as keywords: they must be the same set."""
    for spec in REGISTRY.values():
        cls = getattr(importlib.import_module(spec.module), spec.class_name)
        parameters = dict(inspect.signature(cls).parameters)
        del parameters["path"]
        assert {f.name: f.default for f in fields(spec.options)} == {p.name: p.default for p in parameters.values()}
        assert all(f.default is not MISSING for f in fields(spec.options))
    assert REGISTRY["llamacpp"].takes == {"n_ctx", "threads", "max_sequences", "kv_cells", "n_batch",
                                          "flash_attention", "mmproj", "adapters"}
    assert REGISTRY["transformers"].takes == {"n_ctx", "threads", "max_sequences", "kv_cells", "adapters"}
    assert REGISTRY["onnx"].takes == REGISTRY["openvino"].takes == {"n_ctx", "threads", "max_sequences"}


def test_auto_follows_the_committed_engine_benchmark() -> None:
    """The figures ``auto`` goes by are those benchmarks/engines.py last measured (results/engines.json), and
    among the engines that run one format, auto's order is by measured speed (llama.cpp before transformers
    for a GGUF)."""
    report = json.loads((Path(__file__).parent.parent / "benchmarks" / "results" / "engines.json").read_text())
    by_display = {spec.display_name: name for name, spec in REGISTRY.items()}
    measured = {by_display[row["engine"]]: {"one sequence": round(row["slm_decode"], 1),
                                            "8 sequences at once": round(row["batched"]["8"]["decode"], 1)}
                for row in report["rows"]}
    assert measured == MEASURED
    for fmt in {f for spec in REGISTRY.values() for f in spec.formats}:
        order = [name for name, spec in REGISTRY.items() if fmt in spec.formats]
        assert order == sorted(order, key=lambda name: -MEASURED[name]["one sequence"]), fmt


def test_show_points_at_a_faster_build_in_the_store(monkeypatch: pytest.MonkeyPatch, converted_home: Path,
                                                    smollm2_openvino_int4_path: Path) -> None:
    """With SmolLM2's OpenVINO int4 build in the store, `slm show smollm2` (the GGUF, on llama.cpp) names it
    where the benchmark measured OpenVINO at least a fifth faster; without builds, no hint."""
    monkeypatch.setenv("SLM_HOME", str(converted_home))
    engine, why = choose_why(catalog.resolve("smollm2"))
    assert engine == "llamacpp"
    gains = {figure: MEASURED["openvino"][figure] / MEASURED["llamacpp"][figure] for figure in MEASURED["openvino"]}
    best = max(gains, key=gains.__getitem__)
    if gains[best] >= 1.2:
        assert f"its openvino build {smollm2_openvino_int4_path.name} in the store decoded {gains[best]:.1f}x" in why
        assert f"({best}, slm's engine benchmark on a CPU; --engine openvino runs it)" in why
    else:
        assert "openvino" not in why
    monkeypatch.setenv("SLM_HOME", str(converted_home / "empty"))
    assert choose_why(catalog.resolve("smollm2")) == ("llamacpp", "a GGUF file: llama.cpp runs its quantized "
                                                                  "weights as they are")


def test_auto_chooses_as_before(paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLM_HOME", str(tmp_path))  # a store without builds: no hint at a faster one
    gguf, hf, onnx, openvino = (catalog.resolve(str(paths[name]))
                                for name in ("llamacpp", "transformers", "onnx", "openvino"))
    assert engines_for(gguf) == ["llamacpp", "transformers"]
    assert engines_for(hf) == ["transformers"]
    assert engines_for(onnx) == ["onnx"]
    assert engines_for(openvino) == ["openvino"]
    assert choose_why(gguf) == ("llamacpp", "a GGUF file: llama.cpp runs its quantized weights as they are")
    assert choose_why(onnx) == ("onnx", "an ONNX Runtime GenAI folder")
    assert choose_why(openvino) == ("openvino", "an OpenVINO folder")
    with pytest.raises(InvalidParameter, match="openvino cannot run .* engines that can: llamacpp, transformers"):
        choose_why(gguf, "openvino")
    assert choose_why(hf)[0] == "transformers"
    assert choose_why(gguf, "transformers") == ("transformers", "asked for with --engine transformers")
    with pytest.raises(InvalidParameter, match="onnx cannot run .* engines that can: llamacpp, transformers"):
        choose_why(gguf, "onnx")
    with pytest.raises(InvalidParameter, match="unknown engine 'vllm'") as refused:
        choose_why(gguf, "vllm")
    assert refused.value.field == "engine"


@pytest.mark.parametrize("option", sorted(NOT_ONNX))
@pytest.mark.parametrize(("engine", "shown"), [("onnx", "onnxruntime-genai"), ("openvino", "openvino")])
def test_onnx_and_openvino_refuse_an_option_they_do_not_support_by_name(paths: dict[str, Path], option: str,
                                                                         engine: str, shown: str) -> None:
    with pytest.raises(InvalidParameter, match=f"{shown} does not support {option}") as refused:
        slm.load(str(paths[engine]), max_sequences=1, **{option: NOT_ONNX[option]})
    assert refused.value.field == option
    with pytest.raises(InvalidParameter, match=f"does not support {option}") as refused:
        slm.estimate_memory(str(paths[engine]), **{option: NOT_ONNX[option]})
    assert refused.value.field == option


def test_an_option_given_as_none_is_not_given(paths: dict[str, Path]) -> None:
    """What the CLI passes for a flag left out."""
    onnx = str(paths["onnx"])
    unset = dict.fromkeys(NOT_ONNX)
    assert slm.estimate_memory(onnx, max_sequences=2, **unset) == slm.estimate_memory(onnx, max_sequences=2)
    with slm.load(onnx, n_ctx=128, max_sequences=None, **unset) as model:
        assert model.engine.max_sequences == 4 and model.info.context_length == 128


def test_an_unsupported_option_is_refused_before_any_weights_load(paths: dict[str, Path], tmp_path: Path) -> None:
    """Folders with the engines' settings and no usable weights: loading them fails, so only a refusal made
    first can be an InvalidParameter."""
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    shutil.copy(paths["onnx"] / "genai_config.json", onnx)
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(paths["transformers"] / "config.json", hf)
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(slm.InvalidModelFile):
        slm.load(str(onnx))
    with pytest.raises(InvalidParameter, match="does not support kv_cells"):
        slm.load(str(onnx), kv_cells=4096)
    with pytest.raises(slm.InvalidModelFile):
        slm.load(str(hf))
    for option, value in NOT_TRANSFORMERS.items():
        with pytest.raises(InvalidParameter, match=f"transformers does not support {option}") as refused:
            slm.load(str(hf), **{option: value})
        assert refused.value.field == option


@pytest.mark.parametrize("engine", sorted(REGISTRY))
def test_an_unknown_option_is_refused_by_name(paths: dict[str, Path], engine: str) -> None:
    model = catalog.resolve(str(paths[engine]))
    for call in (open_engine, memory_needed):
        for value in (512, None):  # a misspelt name is a mistake whatever its value
            with pytest.raises(InvalidParameter, match="not a load option .*n_ctx") as refused:
                call(model, n_ctxx=value)
            assert refused.value.field == "n_ctxx"


def test_llama_cpp_takes_every_option_and_transformers_the_kv_cache_size(paths: dict[str, Path]) -> None:
    with slm.load(str(paths["llamacpp"]), n_ctx=256, kv_cells=512, n_batch=64, flash_attention=False, threads=1,
                  max_sequences=2) as model:
        assert (model.engine.n_batch, model.info.kv_cells, model.engine.max_sequences) == (64, 512, 2)  # type: ignore[attr-defined]
    with slm.load(str(paths["transformers"]), n_ctx=128, kv_cells=256, max_sequences=2) as model:
        assert (model.info.context_length, model.info.kv_cells) == (128, 256)
    gguf = str(paths["llamacpp"])
    assert slm.estimate_memory(gguf, n_ctx=256, kv_cells=4096) > slm.estimate_memory(gguf, n_ctx=256)
    with pytest.raises(InvalidParameter, match="must be an integer >= 1") as refused:
        slm.estimate_memory(gguf, n_batch=0)
    assert refused.value.field == "n_batch"
    with pytest.raises(InvalidParameter, match="must be true, false or None") as refused:
        slm.load(gguf, flash_attention="on")
    assert refused.value.field == "flash_attention"


CONTEXT = 64


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def engine(request: pytest.FixtureRequest, paths: dict[str, Path]) -> Iterator[Engine]:
    made = open_engine(catalog.resolve(str(paths[request.param])), n_ctx=CONTEXT, max_sequences=2)
    yield made
    made.close()


def test_every_engine_hands_out_and_checks_its_sequences_the_same_way(engine: Engine) -> None:
    holder = "context" if engine.name == "llama.cpp" else "engine"
    a, b = engine.new_sequence(), engine.new_sequence()
    assert (a, b) == (0, 1)  # the lowest free handle first
    with pytest.raises(EngineError, match=f"all 2 sequences of this {holder} are in use"):
        engine.new_sequence()
    try:
        engine.evaluate([(a, [1, 2, 3])])
        for work, message in (([(5, [1])], "sequence 5 is not open"),
                              ([(a, [4]), (b, [])], f"nothing to evaluate for sequence {b}"),
                              ([(a, [4] * (CONTEXT - 2))], f"sequence {a} would exceed the context of {CONTEXT}")):
            with pytest.raises(EngineError, match=message):
                engine.evaluate(work)
            assert (engine.sequence_length(a), engine.sequence_length(b)) == (3, 0)  # left as they were
        engine.evaluate([(a, [4] * (CONTEXT - 3))])  # up to the context exactly
        for length in (-1, CONTEXT + 1):
            with pytest.raises(InvalidParameter, match=rf"must be in \[0, {CONTEXT}\], got {length}") as refused:
                engine.rewind(a, length)
            assert refused.value.field == "length"
        engine.rewind(a, 2)
        assert engine.sequence_length(a) == 2
        with pytest.raises(EngineError, match="are in use"):  # forking needs a free slot too
            engine.fork(a)
        engine.free(b)
        engine.free(b)  # freeing twice is harmless
        forked = engine.fork(a)
        assert forked == b and engine.sequence_length(forked) == 2
        engine.free(forked)
        restored = engine.restore(engine.save(a))
        assert restored == b and engine.sequence_length(restored) == 2
    finally:
        engine.free(a)
        engine.free(b)
    assert engine.new_sequence() == b  # the last freed first
    engine.free(b)


def test_an_engine_asked_for_runs_the_build_convert_left_for_it_or_names_the_command(
        paths: dict[str, Path], converted_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`slm run smollm2 --engine onnx`: the catalog's GGUF is not ONNX, so the engine runs the build `slm convert`
    wrote into the store (int4 first); in a store without one, the error says the command that makes it."""
    monkeypatch.setenv("SLM_HOME", str(converted_home))
    smollm2 = catalog.resolve("smollm2")
    assert for_engine(smollm2, None) is smollm2 and for_engine(smollm2, "transformers") is smollm2
    assert for_engine(smollm2, "onnx").path == paths["onnx"]  # smollm2-hf-onnx-int4, through the HF folder
    assert for_engine(smollm2, "openvino").path.name.startswith("smollm2-hf-openvino-")
    with slm.load("smollm2", engine="openvino", max_sequences=1, n_ctx=64) as model:
        assert model.engine.name == "openvino"
    assert slm.estimate_memory("smollm2", engine="onnx") != slm.estimate_memory("smollm2")
    monkeypatch.setenv("SLM_HOME", str(tmp_path))  # a store with no builds
    with pytest.raises(InvalidParameter, match=r"`slm convert smollm2 --to openvino` makes a build it runs"):
        slm.load("smollm2", engine="openvino")
    with pytest.raises(InvalidParameter,
                       match=r"`slm convert smollm2 --to hf && slm convert smollm2-hf --to onnx` makes a build"):
        slm.load("smollm2", engine="onnx")


# Python as on a machine without OpenVINO: `import openvino` fails and find_spec finds nothing, as when the
# package is not installed; then the code after it runs (the CLI, with the arguments that follow).
WITHOUT_OPENVINO = "import sys; sys.modules['openvino'] = None\n"
CLI = WITHOUT_OPENVINO + "from slm.cli import main; main(sys.argv[1:])"
LOAD = WITHOUT_OPENVINO + """import slm
try:
    slm.load(sys.argv[1], engine=sys.argv[2])
except slm.EngineUnavailable as e:
    print(e)
"""


def without_openvino(code: str, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLM_HOME": str(home)})


@pytest.mark.parametrize("args", [["run", "{build}", "Hi"], ["run", "smollm2", "--engine", "openvino", "Hi"],
                                  ["serve", "{build}", "--port", "0"]])
def test_without_openvino_an_openvino_build_is_one_line_naming_the_install_command(
        args: list[str], converted_home: Path, smollm2_openvino_int4_path: Path) -> None:
    """The model is named directly (auto finds no engine installed for its format), through --engine (the
    adapter's import fails), or served (the server loads its models at start): one line, exit code 2."""
    build = smollm2_openvino_int4_path.name
    result = without_openvino(CLI, *(a.format(build=build) for a in args), home=converted_home)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "openvino" in lines[-1], result.stderr
    assert lines[-1].endswith("pip install 'slm[openvino]'")
    assert all(not line.startswith("error:") for line in lines[:-1])  # serve says what it loads first


@pytest.mark.parametrize("engine", ["auto", "openvino"])
def test_without_openvino_load_raises_engine_unavailable(engine: str, converted_home: Path,
                                                         smollm2_openvino_int4_path: Path) -> None:
    result = without_openvino(LOAD, smollm2_openvino_int4_path.name, engine, home=converted_home)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip().endswith("pip install 'slm[openvino]'"), result.stdout
