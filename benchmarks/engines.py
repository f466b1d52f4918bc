"""Engine benchmark: slm's generation loop on each engine, next to that engine's own native loop, on SmolLM2.

One run, one model (SmolLM2-135M: the GGUF for llama.cpp, the same weights as a float32 Hugging Face folder
for transformers, as ONNX Runtime GenAI int4 and as OpenVINO int4, both built by `slm convert`), the same
threads. For each engine:

- prefill: tokens/s reading a prompt of ``--prompt-tokens`` tokens (time of the first evaluation);
- decode: tokens/s of ``--tokens`` greedy tokens after it, through slm's ``Generator`` and through the
  engine's native loop: llama-cpp-python's ``Llama.generate``, onnxruntime-genai's
  ``Generator.generate_next_token``, transformers' ``generate()``, openvino_genai's ``LLMPipeline.generate``
  (its own time-per-output-token metric; the same plugin settings as slm's engine);
- slm's scheduler with 8 and 16 sequences in one batch on every engine (``--batch``): aggregate prompt
  tokens/s (every prompt token over the time until the last one's first token) and decode tokens/s (from
  the step after the last prompt is read to the first one's end); transformers' is compared with
  ``generate()`` (the issue's target), and OpenVINO runs both ways slm can drive it: sequences merged into
  shared infer requests, and one infer request per sequence (``engine.batching = False``). The KV budget
  holds every sequence (``kv_cells`` = 1024 per sequence), so all of them run at once.

The fastest engine for each figure (one sequence and a batch, prompt and decode) is reported.

Runs alternate between slm and the native loop; medians of ``--repetitions``.

    .venv/bin/python benchmarks/engines.py          # writes benchmarks/results/engines.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import slm
from harness import (
    PROMPT_TEXT,
    RESULTS,
    fill,
    git_revision,
    machine,
    markdown_table,
    now,
    package_versions,
    paired_ratios,
    templates,
    write_results,
)
from slm.engines import REGISTRY
from slm.engines.base import default_threads
from slm.generation import GenerationParams
from slm.store.catalog import resolve, store_dir
from slm.tools.bench import batched_rates, no_end_bias
from slm.tools.convert import convert, default_output

TARGETS = {"llama.cpp": 0.97, "onnxruntime-genai": 0.97, "openvino": 0.95}
"""slm's loop over the native loop, decode (from the issue)."""
TRANSFORMERS_BATCHED_TARGET = 5.0
VERSIONS = ("llama-cpp-python", "onnxruntime-genai", "openvino", "openvino-genai", "torch", "transformers")
REPORT = templates("engines")
"""The prose of engines.md: benchmarks/templates/engines.md."""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def slm_loop(model: slm.Model, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) through slm's Generator, greedy, no early stop."""
    gen = model.generator(GenerationParams(temperature=0, max_tokens=tokens + 1, logit_bias=no_end_bias(model.info)))
    gen.append_tokens(prompt)
    first, _ = timed(gen.generate_next_token)
    decode, _ = timed(lambda: [gen.generate_next_token() for _ in range(tokens)])
    gen.close()
    return len(prompt) / first, tokens / decode


def llama_native(path: Path, prompt: list[int], tokens: int, threads: int) -> tuple[float, float]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False,
                          flash_attn=True, logits_all=False)
    try:
        first, _ = timed(lambda: llm.eval(prompt))
        llm.reset()
        stream = llm.generate(prompt, temp=0.0, repeat_penalty=1.0, top_k=1)
        next(stream)  # the prompt, and the first token
        decode, _ = timed(lambda: [next(stream) for _ in range(tokens)])
        with contextlib.suppress(Exception):
            stream.close()
    finally:
        llm.close()
    return len(prompt) / first, tokens / decode


def onnx_native(path: Path, prompt: list[int], tokens: int, threads: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens + 8, do_sample=False)
    generator = og.Generator(model, params)
    first, _ = timed(lambda: generator.append_tokens(np.asarray(prompt, dtype=np.int32)))
    generator.generate_next_token()

    def decode_all() -> None:
        for _ in range(tokens):
            generator.generate_next_token()

    decode, _ = timed(decode_all)
    return len(prompt) / first, tokens / decode


def openvino_native(path: Path, prompt: list[int], tokens: int, threads: int) -> tuple[float, float]:
    """openvino_genai's ``LLMPipeline`` on the same folder, with the plugin settings slm's engine compiles
    with (float32 compute and KV cache, the stateful SDPA path rather than paged attention), greedy; its own
    metrics: prompt / time to first token, and one over the mean time per output token."""
    import openvino as ov
    import openvino_genai as ov_genai

    from slm.engines.openvino import CPU_CONFIG

    pipe = ov_genai.LLMPipeline(str(path), "CPU", ATTENTION_BACKEND="SDPA", INFERENCE_NUM_THREADS=threads,
                                **CPU_CONFIG)
    config = ov_genai.GenerationConfig(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)
    ids = ov.Tensor(np.array([prompt], dtype=np.int64))
    inputs = ov_genai.TokenizedInputs(ids, ov.Tensor(np.ones((1, len(prompt)), dtype=np.int64)))
    metrics = pipe.generate(inputs, config).perf_metrics
    return len(prompt) / (metrics.get_ttft().mean / 1000), 1000 / metrics.get_tpot().mean


def transformers_native(model: slm.Model, prompt: list[int], tokens: int) -> tuple[float, float]:
    import torch

    hf = model.engine.model  # type: ignore[attr-defined]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        first, _ = timed(lambda: hf(ids))
    total, _ = timed(lambda: hf.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False,
                                         pad_token_id=model.info.special.eos_id))
    return len(prompt) / first, tokens / max(total - first, 1e-9)


def slm_batched(model: slm.Model, prompt: list[int], tokens: int, sequences: int) -> tuple[float, float]:
    """Aggregate (prompt, decode) tokens/s of ``sequences`` requests in one batch through the scheduler
    (``slm bench --concurrency``'s measurement, ``slm.tools.bench.batched_rates``)."""
    params = GenerationParams(temperature=0, max_tokens=tokens, logit_bias=no_end_bias(model.info))
    measured = batched_rates(model, prompt, params, sequences)
    if measured is None:
        raise SystemExit(f"the {sequences} sequences never decoded together: raise --tokens")
    return measured


def ensure_models() -> dict[str, Path]:
    gguf = resolve("smollm2")
    hf = default_output(gguf, "hf")
    if not hf.exists():
        convert(gguf, "hf")
    onnx = default_output(resolve(str(hf)), "onnx", "int4")
    if not onnx.exists():
        convert(resolve(str(hf)), "onnx", output=onnx, precision="int4")
    openvino = default_output(resolve(str(hf)), "openvino", "int4")
    if not openvino.exists():
        convert(resolve(str(hf)), "openvino", output=openvino, precision="int4")
    return {"llama.cpp": gguf.path, "transformers": hf, "onnxruntime-genai": onnx, "openvino": openvino}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16],
                        help="sequences in slm's batched runs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = ensure_models()
    rows: list[dict[str, Any]] = []
    for engine, path in paths.items():
        most = max(args.batch)
        # One KV cache shared by every sequence where the engine has one (ONNX: one per sequence already).
        shared = "kv_cells" in next(s for s in REGISTRY.values() if s.display_name == engine).takes
        cells = {"kv_cells": 1024 * most} if shared else {}
        model = slm.load(str(path), threads=args.threads, max_sequences=most, n_ctx=1024, **cells)
        prompt = model.tokenize(PROMPT_TEXT)[: args.prompt_tokens]
        runs: dict[str, list[tuple[float, float]]] = {"slm": [], "native": []}
        ways = {"batched": True, "per_request": False} if engine == "openvino" else {"batched": None}
        batched: dict[str, dict[int, list[tuple[float, float]]]] = {w: {b: [] for b in args.batch} for w in ways}
        for rep in range(args.repetitions):
            order = ("slm", "native") if rep % 2 == 0 else ("native", "slm")
            for side in order:
                if side == "slm":
                    runs["slm"].append(slm_loop(model, prompt, args.tokens))
                elif engine == "llama.cpp":
                    runs["native"].append(llama_native(path, prompt, args.tokens, args.threads))
                elif engine == "onnxruntime-genai":
                    runs["native"].append(onnx_native(path, prompt, args.tokens, args.threads))
                elif engine == "openvino":
                    runs["native"].append(openvino_native(path, prompt, args.tokens, args.threads))
                else:
                    runs["native"].append(transformers_native(model, prompt, args.tokens))
            line = f"{engine} rep {rep}: slm {runs['slm'][-1][1]:.1f} tok/s, native {runs['native'][-1][1]:.1f} tok/s"
            for way, merging in ways.items():
                if merging is not None:
                    model.engine.batching = merging  # type: ignore[attr-defined]
                for b, figures in batched[way].items():
                    figures.append(slm_batched(model, prompt, args.tokens, b))
                    line += f", {way} x{b} {figures[-1][1]:.1f} tok/s"
            print(line, file=sys.stderr)
        model.close()
        row = {"engine": engine, "model": str(path.name)}
        for side in ("slm", "native"):
            row[f"{side}_prefill"] = statistics.median(r[0] for r in runs[side])
            row[f"{side}_decode"] = statistics.median(r[1] for r in runs[side])
        decode = {side: dict(enumerate(r[1] for r in runs[side])) for side in ("slm", "native")}
        row["decode_ratio"] = statistics.median(paired_ratios(decode["slm"], decode["native"]))
        for way, sizes in batched.items():
            row[way] = {b: {"prefill": statistics.median(f[0] for f in figures),
                            "decode": statistics.median(f[1] for f in figures)} for b, figures in sizes.items()}
        if engine == "transformers":
            row["batched_ratio"] = {b: f["decode"] / row["native_decode"] for b, f in row["batched"].items()}
        rows.append(row)
    report = {
        "benchmark": "engines", "date": now(),
        "git": git_revision(), "machine": machine() | {"versions": package_versions(VERSIONS)},
        "settings": vars(args) | {"output": str(args.output), "store": str(store_dir())},
        "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_results(args.output, "engines", report, render(report), indent=1)
    print(render(report))
    return 0


ENGINE_HEADER = ("engine", "prefill tok/s slm / native", "decode tok/s slm / native", "slm / native (decode)",
                 "target")
BATCHED_HEADER = ("sequences", "decode tok/s in all", "x `generate()`", "target")


def figures(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each figure slm reaches (prompt and decode tok/s, one sequence and each batch) by engine (OpenVINO's
    batch figures in the faster of its two ways, named)."""
    out: dict[str, dict[str, float]] = {}
    for r in report["rows"]:
        out.setdefault("prefill x1", {})[r["engine"]] = r["slm_prefill"]
        out.setdefault("decode x1", {})[r["engine"]] = r["slm_decode"]
        for way in ("batched", "per_request"):
            for b, f in r.get(way, {}).items():
                name = r["engine"] if way == "batched" else f"{r['engine']} (one request per sequence)"
                for figure in ("prefill", "decode"):
                    out.setdefault(f"{figure} x{b}", {})[name] = f[figure]
    return out


def render(report: dict[str, Any]) -> str:
    """engines.md: the template's sections filled from the report."""
    rows = []
    for r in report["rows"]:
        target = TARGETS.get(r["engine"])
        verdict = f">= {target}x: {'met' if r['decode_ratio'] >= target else '**not met**'}" if target else "-"
        rows.append((r["engine"], f"{r['slm_prefill']:.0f} / {r['native_prefill']:.0f}",
                     f"{r['slm_decode']:.1f} / {r['native_decode']:.1f}", f"{r['decode_ratio']:.2f}x", verdict))
    batched = []
    for r in report["rows"]:
        if "batched_ratio" in r:
            table = [(str(b), f"{r['batched'][b]['decode']:.1f}", f"{ratio:.1f}x",
                      "met" if ratio >= TRANSFORMERS_BATCHED_TARGET else "**not met**")
                     for b, ratio in r["batched_ratio"].items()]
            batched.append(fill(REPORT["batched"], native_decode=r["native_decode"],
                                target=TRANSFORMERS_BATCHED_TARGET,
                                table=markdown_table(BATCHED_HEADER, table, "rrrl")))
    measured = figures(report)
    engines = list(dict.fromkeys(name for by_engine in measured.values() for name in by_engine))
    grid = [(name, *(f"{by_engine[name]:.0f}" if name in by_engine else "-" for by_engine in measured.values()))
            for name in engines]
    fastest = [(figure, max(by_engine, key=by_engine.__getitem__), f"{max(by_engine.values()):.0f}")
               for figure, by_engine in measured.items()]
    compared = fill(REPORT["compared"], table=markdown_table(("engine (slm's loop)", *measured), grid,
                                                             "l" + "r" * len(measured)),
                    fastest=markdown_table(("figure", "fastest engine", "tok/s"), fastest, "llr"))
    return fill(REPORT["report"], **report, table=markdown_table(ENGINE_HEADER, rows, "lrrrl"),
                batched="\n\n".join(batched), compared=compared) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
