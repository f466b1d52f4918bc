"""llama.cpp's two KV layouts under slm's engine: one pool for all sequences, or a stream per sequence.

``LlamaCppEngine`` keeps one KV pool that every sequence draws on (llama.cpp's ``kv_unified``); llama-server's
default gives each sequence a stream of its own. This script measures which is faster, with the engine as it
is and the same engine loaded with ``kv_unified`` off (patched here, for the measurement only): SmolLM2-135M
Q4_1, 1, 4, 8 and 16 sequences of
``--prompt-tokens`` each (every prompt behind its own number, so none shares a prefix), read in one
``evaluate``, then ``--tokens`` greedy steps of one token per sequence. Both engines hold 16 sequences of
``--n-ctx`` positions; the pooled one has ``--n-ctx`` cells for all of them (``slm serve``'s default), the
other ``16 * --n-ctx``. Every repetition runs each configuration once, the order alternating between
repetitions; figures are medians, ratios the median of the per-repetition ratios. Tokens/s count decode steps
only, and separately the prompts' evaluate.

    .venv/bin/python benchmarks/kv_layout.py          # writes benchmarks/results/kv_layout.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import slm.engines.llamacpp
from harness import (
    PROMPT_TEXT,
    Quiet,
    add_run_options,
    fill,
    load_average,
    machine,
    markdown_table,
    model_file,
    output_directory,
    package_versions,
    paired_ratios,
    report_head,
    templates,
    write_results,
)
from slm.engines.base import default_threads
from slm.engines.llamacpp import LlamaCppEngine
from slm.store.catalog import resolve

SEQUENCES = (1, 4, 8, 16)
LAYOUTS = ("pool", "streams")
VERSIONS = ("slm", "llama-cpp-python", "numpy")
REPORT = templates("kv_layout")


def in_streams(path: Path, n_ctx: int, sequences: int, threads: int) -> LlamaCppEngine:
    """The engine with a KV stream of ``n_ctx`` cells per sequence: ``kv_unified`` turned off as it loads."""
    lc = slm.engines.llamacpp.lc
    load = lc.llama_init_from_model

    def unshared(model: Any, params: Any) -> Any:
        params.kv_unified = False
        return load(model, params)

    lc.llama_init_from_model = unshared
    try:
        return LlamaCppEngine(path, n_ctx=n_ctx, kv_cells=sequences * n_ctx, threads=threads,
                              max_sequences=sequences, flash_attention=True)
    finally:
        lc.llama_init_from_model = load


def decode(engine: LlamaCppEngine, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Prompt tokens/s of one evaluate reading ``prompts`` together, then decode tokens/s of ``tokens`` greedy
    steps of every sequence."""
    seqs = [engine.new_sequence() for _ in prompts]
    try:
        start = time.perf_counter()
        last = engine.evaluate(list(zip(seqs, prompts, strict=True))).argmax(axis=1)  # (B,)
        read = time.perf_counter()
        for _ in range(tokens):
            last = engine.evaluate([(seq, [int(t)]) for seq, t in zip(seqs, last, strict=True)]).argmax(axis=1)
        end = time.perf_counter()
    finally:
        for seq in seqs:
            engine.free(seq)
    return sum(map(len, prompts)) / (read - start), len(seqs) * tokens / (end - read)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="decode steps (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=108, help="prompt tokens (default 108)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="one sequence's context (default 4096)")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads (default: all cores)")
    add_run_options(parser, unit="measurement", retries=1, quick="1 repetition of 16 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repetitions = 16, 1
    started = time.perf_counter()
    path = resolve("smollm2").path
    most = max(SEQUENCES)
    engines = {"pool": LlamaCppEngine(path, n_ctx=args.n_ctx, threads=args.threads, max_sequences=most,
                                      flash_attention=True),
               "streams": in_streams(path, args.n_ctx, most, args.threads)}
    text = engines["pool"].tokenize(PROMPT_TEXT, add_special=False)
    prompts = [(engines["pool"].tokenize(f"Chapter {i}.", add_special=False) + text)[: args.prompt_tokens]
               for i in range(most)]
    configs = [(layout, n) for n in SEQUENCES for layout in LAYOUTS]
    quiet = Quiet(args.max_contention, args.retries, args.max_wait)
    figures: dict[str, dict[int, tuple[float, float]]] = {f"{layout} x{n}": {} for layout, n in configs}
    others: list[float] = []
    try:
        for rep in range(args.repetitions):
            for layout, n in configs if rep % 2 == 0 else configs[::-1]:
                measured = quiet.run(f"{layout} x{n} {rep}",
                                     lambda e=engines[layout], n=n: decode(e, prompts[:n], args.tokens))
                figures[f"{layout} x{n}"][rep] = measured.result
                others.append(measured.others)
            print(f"rep {rep}: " + ", ".join(f"{k} {v[rep][1]:.0f}" for k, v in figures.items()), file=sys.stderr)
    finally:
        for engine in engines.values():
            engine.close()
    results = {}
    for n in SEQUENCES:
        pool, streams = figures[f"pool x{n}"], figures[f"streams x{n}"]
        results[n] = {
            layout: {"decode_tokens_per_second": round(statistics.median(v[1] for v in f.values()), 1),
                     "prompt_tokens_per_second": round(statistics.median(v[0] for v in f.values()), 1),
                     "decode_runs": [round(v[1], 1) for v in f.values()]}
            for layout, f in (("pool", pool), ("streams", streams))
        } | {"streams / pool": round(statistics.median(paired_ratios(
            {r: v[1] for r, v in streams.items()}, {r: v[1] for r, v in pool.items()})), 3)}
    report = {
        **report_head("kv_layout", started), "machine": machine(), "versions": package_versions(VERSIONS),
        "model": model_file(path),
        "settings": {"tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "n_ctx": args.n_ctx,
                     "max_sequences": most, "pool_cells": args.n_ctx, "stream_cells": most * args.n_ctx,
                     "repetitions": args.repetitions, "threads": args.threads, "flash_attention": True,
                     "max_contention": args.max_contention},
        "results": {str(n): r for n, r in results.items()},
        "others_cpu_share_max": round(max(others), 3), "rejected_for_contention": quiet.rejected,
    }
    rows = [(str(n), f"{r['pool']['decode_tokens_per_second']:.1f}", f"{r['streams']['decode_tokens_per_second']:.1f}",
             f"{r['streams / pool']:.2f}x", f"{r['pool']['prompt_tokens_per_second']:.0f}",
             f"{r['streams']['prompt_tokens_per_second']:.0f}") for n, r in results.items()]
    table = markdown_table(("sequences", "pool decode tok/s", "streams decode tok/s", "streams / pool",
                            "pool prompt tok/s", "streams prompt tok/s"), rows, "rrrrrr")
    print(table)
    output = output_directory(args)
    if output is not None:
        m = report["machine"]
        markdown = fill(REPORT["report"], **report, table=table, minutes=report["wall_seconds"] / 60,
                        load=load_average(m["load_average_at_start"]), redone=len(quiet.rejected)) + "\n"
        for written in write_results(output, "kv_layout", report, markdown):
            print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
