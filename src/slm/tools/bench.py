"""Measurements: what a model costs and gives on this machine, and what the machine allows.

``measure`` runs in a process of its own per model and engine (``python -m slm.tools.bench``), so its peak
resident memory is its own and a model that fails to load cannot take the others down. It reports, after
a warm-up, for each repetition: prompt processing (``pp``: tokens/s reading a ``-p``-token prompt), text
generation (``tg``: tokens/s of ``-n`` greedy tokens after it, the end of text banned so every run
generates them all) and time to first token; with concurrency levels, the aggregate decode
throughput of that many requests decoding together through the batching scheduler.

``memory_bandwidth`` is a short copy benchmark (numpy): bytes read and written per second. Decode
efficiency = generated tokens/s x bytes read per token (the weights, and the KV cache so far) / that
bandwidth: how close an engine gets to what the memory allows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from slm.api import Model, load
from slm.engines import REGISTRY, choose
from slm.errors import InvalidParameter, SlmError
from slm.generation import GenerationParams
from slm.generation.generator import Generator
from slm.remote import is_remote
from slm.serving.scheduler import Scheduler
from slm.store.catalog import resolve

PROMPT_TEXT = (
    "The history of computing is a story of people who wanted to calculate faster. From the abacus to "
    "mechanical calculators, from punched cards to vacuum tubes, each generation of machines made new "
    "kinds of work possible. Today small language models run on laptops and phones, and they answer "
    "questions, translate text and summarize documents without a network connection. "
)
ENGINE_PACKAGES = ("llama-cpp-python", "onnxruntime-genai", "torch", "transformers")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python, and the versions of slm and the engines installed."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    memory = None
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        memory = round(next(int(line.split()[1]) for line in f if line.startswith("MemTotal")) / 1024**2, 1)
    versions = {"slm": _version("slm")}
    for package in ENGINE_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "os": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def memory_bandwidth(megabytes: int = 256, repetitions: int = 5) -> float:
    """Bytes per second a plain copy moves (read + write), best of ``repetitions``."""
    source = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch every page first
    best = 0.0
    for _ in range(repetitions):
        start = time.perf_counter()
        np.copyto(target, source)
        best = max(best, 2 * source.nbytes / (time.perf_counter() - start))
    return best


def model_hash(path: Path) -> str:
    """sha256 of the model file, or of a folder's files in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def no_end_bias(info: Any) -> dict[int, float]:
    """A logit bias that bans every end-of-generation token, so a timed run generates all it is asked."""
    return {t: -100.0 for t in info.special.end_of_generation}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def measure(name: str, engine: str | None, prompt_tokens: int, generate_tokens: int, threads: int | None,
            repetitions: int, concurrency: list[int], n_ctx: int | None) -> dict[str, Any]:
    """Load ``name`` and measure it (see the module's docstring); a JSON-ready dict."""
    if is_remote(name):
        raise InvalidParameter("MODEL", f"{name} is remote: slm bench measures local models "
                                        "(slm compare shows remote ones beside them)")
    # As llama-bench: a context that holds the prompt and the answer (and the clients' few-token prefixes),
    # unless one is given.
    n_ctx = n_ctx or prompt_tokens + generate_tokens + 8
    options: dict[str, Any] = {"threads": threads, "n_ctx": n_ctx, "max_sequences": max(concurrency or [1])}
    if engine and engine != "auto":
        options["engine"] = engine
    if concurrency and "kv_cells" in REGISTRY[choose(resolve(name), engine)].takes:  # one cache for every client
        options["kv_cells"] = n_ctx * max(concurrency)
    started = time.perf_counter()
    model = load(name, **{k: v for k, v in options.items() if v is not None})
    assert isinstance(model, Model)
    load_seconds = time.perf_counter() - started
    resolved = resolve(name)
    info = model.info
    if prompt_tokens + generate_tokens > info.context_length:
        raise InvalidParameter("-p", f"{prompt_tokens} prompt + {generate_tokens} generated tokens exceed "
                                         f"{model.name}'s context of {info.context_length}")
    prompt = _prompt(model, prompt_tokens)
    params = GenerationParams(temperature=0, max_tokens=generate_tokens, logit_bias=no_end_bias(info))

    def once(p: list[int], n: int) -> tuple[float, float, float]:
        """(pp, tg, ttft): the first token's call reads the whole prompt (its sampling is well under a
        millisecond), the others decode."""
        with Generator(model.engine, params.replace(max_tokens=n)) as gen:
            gen.append_tokens(p)
            start = time.perf_counter()
            gen.generate_next_token()
            first = time.perf_counter()
            for _ in range(n - 1):
                gen.generate_next_token()
            end = time.perf_counter()
        return len(p) / (first - start), (n - 1) / (end - first) if n > 1 else 0.0, first - start

    once(prompt[: min(16, len(prompt))], min(4, generate_tokens))  # warm-up
    runs = [once(prompt, generate_tokens) for _ in range(repetitions)]
    result: dict[str, Any] = {
        "model": model.name, "engine": model.engine.name, "architecture": info.architecture,
        "parameters": info.parameters, "size_bytes": model_size(resolved.path), "sha256": model_hash(resolved.path),
        "load_seconds": load_seconds, "pp": _stats([r[0] for r in runs]), "tg": _stats([r[1] for r in runs]),
        "ttft": _stats([r[2] for r in runs]), "runs": [{"pp": r[0], "tg": r[1], "ttft": r[2]} for r in runs],
        "context": info.context_length, "kv_bytes_per_token": info.kv_bytes_per_token,
    }
    if concurrency:
        result["concurrency"] = {str(c): _throughput(model, prompt, params, c) for c in concurrency}
    model.close()
    result["peak_rss_bytes"] = peak_rss()
    return result


def peak_rss() -> int:
    """This process's peak resident memory. Linux's VmHWM starts again at exec, where getrusage's maxrss
    keeps the parent's peak from before the fork."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _prompt(model: Any, tokens: int) -> list[int]:
    ids = model.tokenize(PROMPT_TEXT, add_special=False)
    prompt = (ids * (tokens // max(1, len(ids)) + 1))[:tokens]
    return prompt


def _throughput(model: Any, prompt: list[int], params: Any, clients: int) -> float | None:
    """Generated tokens/s in all while ``clients`` requests decode together through the scheduler."""
    return batched_decode(model, prompt, params, clients)


def batched_decode(model: Any, prompt: list[int], params: Any, clients: int) -> float | None:
    """Aggregate decode tokens/s of ``clients`` requests in one batch through the scheduler (``batched_rates``)."""
    rates = batched_rates(model, prompt, params, clients)
    return rates[1] if rates else None


def batched_rates(model: Any, prompt: list[int], params: Any, clients: int) -> tuple[float, float] | None:
    """Aggregate prompt and decode tokens/s of ``clients`` requests in one batch through the scheduler.
    Prompts: every prompt token over the time until the last request's first token (the first ones may
    decode meanwhile, as a server does). Decode: from the step after the last prompt is read to the first
    request's end (prompts differ at their start, so no prefix is shared). None when they never all decoded
    together (the first ended before the last had read its prompt)."""
    scheduler = Scheduler(model.engine, model.name, max_running=clients, prefix_cache_bytes=0)
    started: set[int] = set()
    finished: list[int] = []
    failures: list[Exception] = []

    def on_chunk(i: int, chunk: Any) -> None:
        started.add(i)
        if chunk.finish_reason:
            finished.append(i)

    read = 0
    for i in range(clients):
        listener: Callable[[Any], None] = functools.partial(on_chunk, i)
        ids = model.tokenize(f"{i}.", add_special=False) + prompt
        read += len(ids)
        scheduler.submit(ids, params, listener, failures.append)
    reading = time.perf_counter()
    while len(started) < clients and not finished and not failures and scheduler.step():
        pass
    prefill = read / (time.perf_counter() - reading)
    overlap = not finished  # all of them decoding at once before the first one ends
    before, start = scheduler.counters["generated_tokens"], time.perf_counter()
    while not finished and not failures and scheduler.step():
        pass
    elapsed = time.perf_counter() - start
    generated = scheduler.counters["generated_tokens"] - before
    while scheduler.step():  # the others to their end: their sequences go back to the engine
        pass
    scheduler.stop()
    if failures:
        raise failures[0]
    if not overlap or generated == 0 or elapsed <= 0:
        return None  # the first finished before the last had read its prompt: raise -n
    return prefill, generated / elapsed


def efficiency(result: dict[str, Any], bandwidth: float) -> float | None:
    """Generated tokens/s x bytes read per token / bandwidth: the weights once, and the KV cache of the
    average position of the generated tokens."""
    if not bandwidth or not result.get("tg"):
        return None
    weights = result["size_bytes"] if result["engine"] != "transformers" else result["parameters"] * 4
    position = result["prompt_tokens"] + result["generate_tokens"] / 2
    per_token = weights + result.get("kv_bytes_per_token", 0) * position
    return float(result["tg"]["mean"] * per_token / bandwidth)


def main(argv: list[str]) -> int:
    """``python -m slm.tools.bench '<json arguments>'``: one measurement, one JSON line on stdout, in a process of
    its own; a failure is ``{"error": "..."}``."""
    arguments = json.loads(argv[0])
    try:
        result = measure(**arguments)
    except Exception as e:  # reported in the table as failed, with the reason; the others still run

        reason = str(e) if isinstance(e, SlmError) else f"{type(e).__name__}: {e}"
        print(json.dumps({"error": reason.splitlines()[0] if reason else type(e).__name__}))
        return 0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
