"""llama.cpp's own command-line tools (``llama-perplexity``...), the reference some tests compare slm with: built
once from the llama.cpp that the installed llama-cpp-python vendors (its sdist, from PyPI), into
~/.cache/slm/llama-tools/bin, where later runs find them (the first build takes 10-20 minutes on 2 cores)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import llama_cpp

TOOLS = ("llama-perplexity", "llama-quantize")
BIN = Path.home() / ".cache" / "slm" / "llama-tools" / "bin"
CMAKE_OPTIONS = ("-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON")


def llama_tool(name: str) -> Path:
    """The path of llama.cpp's tool ``name``, built first if it is not there yet."""
    path = BIN / name
    if not path.exists():
        _build()
    return path


def _build() -> None:
    with tempfile.TemporaryDirectory(prefix="llama-tools-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={llama_cpp.__version__}", "-d", tmp], check=True, capture_output=True)
        [sdist] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), *CMAKE_OPTIONS], check=True,
                       capture_output=True)
        subprocess.run(["cmake", "--build", str(source / "build"), "--target", *TOOLS, "-j", "2"], check=True,
                       capture_output=True)
        BIN.mkdir(parents=True, exist_ok=True)
        for tool in TOOLS:
            partial = BIN / f"{tool}.part"
            shutil.copy2(source / "build" / "bin" / tool, partial)
            partial.rename(BIN / tool)
