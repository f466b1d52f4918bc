"""Engine benchmark: slm's generation loop on each engine, next to that engine's own native loop, on SmolLM2.

One run, one model (SmolLM2-135M: the GGUF for llama.cpp, the same weights as a float32 Hugging Face folder
for transformers, and as ONNX Runtime GenAI int4 built by `slm convert`), the same threads. For each engine:

- prefill: tokens/s reading a prompt of ``--prompt-tokens`` tokens (time of the first evaluation);
- decode: tokens/s of ``--tokens`` greedy tokens after it, through slm's ``Generator`` and through the
  engine's native loop: llama-cpp-python's ``Llama.generate``, onnxruntime-genai's
  ``Generator.generate_next_token``, transformers' ``generate()``;
- for transformers also slm's scheduler with 8 and 16 sequences in one batch (aggregate decode tokens/s
  while all of them decode: from the step after the last prompt is read to the first one's end), since
  the issue's target compares slm's transformers engine with ``generate()``. The KV budget holds every
  sequence (``kv_cells`` = 1024 per sequence), so all of them run at once.

Runs alternate between slm and the native loop; medians of ``--repetitions``.

    .venv/bin/python benchmarks/engines.py          # writes benchmarks/results/engines.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import slm
from bench_decode import PROMPT_TEXT, RESULTS, _git_revision, machine
from slm.engines import REGISTRY
from slm.engines.base import default_threads
from slm.generation import GenerationParams
from slm.store.catalog import resolve, store_dir
from slm.tools.bench import batched_decode, no_end_bias
from slm.tools.convert import convert, default_output

TARGETS = {"llama.cpp": 0.97, "onnxruntime-genai": 0.97}
"""slm's loop over the native loop, decode (from the issue)."""
TRANSFORMERS_BATCHED_TARGET = 5.0


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


def transformers_native(model: slm.Model, prompt: list[int], tokens: int) -> tuple[float, float]:
    import torch

    hf = model.engine.model  # type: ignore[attr-defined]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        first, _ = timed(lambda: hf(ids))
    total, _ = timed(lambda: hf.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False,
                                         pad_token_id=model.info.special.eos_id))
    return len(prompt) / first, tokens / max(total - first, 1e-9)


def slm_batched(model: slm.Model, prompt: list[int], tokens: int, sequences: int) -> float:
    """Aggregate decode tokens/s while all ``sequences`` decode together (``slm bench --concurrency``'s
    measurement): from the step after the last prompt is read to the first one's end."""
    params = GenerationParams(temperature=0, max_tokens=tokens, logit_bias=no_end_bias(model.info))
    measured = batched_decode(model, prompt, params, sequences)
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
    return {"llama.cpp": gguf.path, "transformers": hf, "onnxruntime-genai": onnx}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16],
                        help="sequences in slm's batched transformers runs")
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
        batched: dict[int, list[float]] = {b: [] for b in args.batch}
        for rep in range(args.repetitions):
            order = ("slm", "native") if rep % 2 == 0 else ("native", "slm")
            for side in order:
                if side == "slm":
                    runs["slm"].append(slm_loop(model, prompt, args.tokens))
                elif engine == "llama.cpp":
                    runs["native"].append(llama_native(path, prompt, args.tokens, args.threads))
                elif engine == "onnxruntime-genai":
                    runs["native"].append(onnx_native(path, prompt, args.tokens, args.threads))
                else:
                    runs["native"].append(transformers_native(model, prompt, args.tokens))
            line = f"{engine} rep {rep}: slm {runs['slm'][-1][1]:.1f} tok/s, native {runs['native'][-1][1]:.1f} tok/s"
            if engine == "transformers":
                for b, figures in batched.items():
                    figures.append(slm_batched(model, prompt, args.tokens, b))
                    line += f", slm batched x{b} {figures[-1]:.1f} tok/s"
            print(line, file=sys.stderr)
        model.close()
        row = {"engine": engine, "model": str(path.name)}
        for side in ("slm", "native"):
            row[f"{side}_prefill"] = statistics.median(r[0] for r in runs[side])
            row[f"{side}_decode"] = statistics.median(r[1] for r in runs[side])
        row["decode_ratio"] = statistics.median(s[1] / n[1] for s, n in zip(runs["slm"], runs["native"], strict=True))
        if engine == "transformers":
            row["slm_batched_decode"] = {b: statistics.median(f) for b, f in batched.items()}
            row["batched_ratio"] = {b: d / row["native_decode"] for b, d in row["slm_batched_decode"].items()}
        rows.append(row)
    versions = {p: metadata.version(p) for p in ("llama-cpp-python", "onnxruntime-genai", "torch", "transformers")}
    report = {
        "benchmark": "engines", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": _git_revision(), "machine": machine() | {"versions": versions},
        "settings": vars(args) | {"output": str(args.output), "store": str(store_dir())},
        "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "engines.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "engines.md").write_text(render(report))
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    v = m["versions"]
    lines = [
        "# Engines: slm's loop against each engine's native loop (SmolLM2-135M)", "",
        f"Generated by `benchmarks/engines.py` on {report['date']} (git {report['git']}), {report['wall_seconds']} s.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}",
        f"- llama-cpp-python {v['llama-cpp-python']}, onnxruntime-genai {v['onnxruntime-genai']}, "
        f"torch {v['torch']}, transformers {v['transformers']}",
        f"- {s['threads']} threads; prompt {s['prompt_tokens']} tokens, then {s['tokens']} greedy tokens "
        f"(end of text banned); medians of {s['repetitions']} alternating repetitions",
        "- Models: llama.cpp on the Q4_1 GGUF; transformers on the same weights dequantized to float32 "
        "(`slm convert --to hf`); ONNX Runtime GenAI on those built to int4 (`slm convert --to onnx`)",
        "- Native loops: llama-cpp-python `Llama.generate` (flash attention on, as slm's AUTO picks here), "
        "onnxruntime-genai `Generator.generate_next_token`, transformers `generate()`",
        "",
        "| engine | prefill tok/s slm / native | decode tok/s slm / native | slm / native (decode) | target |",
        "|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        target = TARGETS.get(r["engine"])
        verdict = f">= {target}x: {'met' if r['decode_ratio'] >= target else '**not met**'}" if target else "-"
        lines.append(f"| {r['engine']} | {r['slm_prefill']:.0f} / {r['native_prefill']:.0f} | "
                     f"{r['slm_decode']:.1f} / {r['native_decode']:.1f} | {r['decode_ratio']:.2f}x | {verdict} |")
    for r in report["rows"]:
        if "slm_batched_decode" in r:
            lines += ["", f"transformers, sequences batched by slm's scheduler, against `generate()`'s "
                      f"{r['native_decode']:.1f} tok/s for one (target >= {TRANSFORMERS_BATCHED_TARGET}x):", "",
                      "| sequences | decode tok/s in all | x `generate()` | target |", "|---:|---:|---:|---|"]
            for b, tps in r["slm_batched_decode"].items():
                ratio = r["batched_ratio"][b]
                met = "met" if ratio >= TRANSFORMERS_BATCHED_TARGET else "**not met**"
                lines.append(f"| {b} | {tps:.1f} | {ratio:.1f}x | {met} |")
            lines += ["", "One sequence through slm runs at the same speed as `generate()`: the float32 forward "
                      "pass is the whole cost on CPU; batching reads the weights once for every sequence."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
