"""Batching on ONNX Runtime GenAI: decode tokens/s of SmolLM2-135M's int4 ONNX build, one sequence against eight.

One process, one model, the same threads. Every repetition runs each configuration once, back to back, in an
order that alternates between repetitions; each figure is the median of its repetitions, each ratio the median
of the per-repetition ratios. Greedy decoding with the end of text banned, so every sequence decodes all
``--tokens``; prompts of ``--prompt-tokens`` tokens of the same text, each behind its own number so that none
shares a prefix. Tokens/s count decode steps only (the prompts are read before the clock starts).

- engine x1: slm's ``OnnxGenAIEngine`` reads one prompt, then one token a step (``evaluate``, argmax);
- engine x8 batched: eight prompts read in one ``evaluate`` (one batched Generator), then eight tokens a step;
- engine x8 one after the other: each prompt read in a call of its own, so that each sequence keeps a
  Generator of its own and a step runs them in turn: what the engine did at every step before it batched;
- scheduler x1 / x8: slm's ``Scheduler`` as the server runs it (``max_batch_tokens`` 512, so eight prompts of
  128 tokens are read over three steps), from the step after the last prompt is read to the first request's
  end (``slm bench``'s ``batched_decode``); and x8 with a budget of 2048 tokens, which reads all eight at once;
- onnxruntime-genai's own ``og.Engine``, x1 / x8: the library's batching alone (it samples by itself: no
  logits reach slm); decode = its ``run`` calls that gave no request its first token.

    .venv/bin/python benchmarks/onnx_batch.py          # writes benchmarks/results/onnx_batch.{json,md}
"""

from __future__ import annotations

import argparse
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
from slm.engines.onnx import OnnxGenAIEngine
from slm.generation import GenerationParams
from slm.serving.scheduler import Scheduler
from slm.store.catalog import resolve, store_dir
from slm.tools.bench import no_end_bias
from slm.tools.convert import convert, default_output

TARGET = 1.6
"""Engine x8 over engine x1, decode (from issue 15)."""
SEQUENCES = 8
VERSIONS = ("onnxruntime-genai", "numpy")
REPORT = templates("onnx_batch")
CONFIGS = ("engine x1", "engine x8 batched", "engine x8 one after the other", "scheduler x1", "scheduler x8",
           "scheduler x8, budget 2048", "og.Engine x1", "og.Engine x8")


def int4_build() -> Path:
    """SmolLM2's int4 ONNX build in the store, converted (GGUF -> Hugging Face -> ONNX) the first time."""
    hf = store_dir() / "smollm2-hf"
    if not hf.exists():
        convert(resolve("smollm2"), "hf")
    onnx = default_output(resolve(str(hf)), "onnx", "int4")
    if not onnx.exists():
        convert(resolve(str(hf)), "onnx", precision="int4")
    return onnx


def prompts(engine: OnnxGenAIEngine, count: int, length: int) -> list[list[int]]:
    text = engine.tokenize(PROMPT_TEXT, add_special=False)
    return [engine.tokenize(f"{i}.", add_special=False) + text[:length] for i in range(count)]


def layout(engine: OnnxGenAIEngine) -> str:
    """How the engine holds its sequences now: the live rows of each batched Generator, and those alone
    (white box, to read the figures by; an engine from before batching has a Generator for each)."""
    if not hasattr(engine, "_groups"):
        return "a Generator each"
    groups = sorted((len(g.live()) for g in engine._groups), reverse=True)
    return " + ".join([*(f"{n} batched" for n in groups), *([f"{engine._alone} alone"] if engine._alone else [])])


def engine_decode(engine: OnnxGenAIEngine, starts: list[list[int]], tokens: int, together: bool) -> tuple[float, str]:
    """Decode tokens/s of ``starts`` read in one call (``together``) or each in its own, then stepped together."""
    banned = sorted(engine.info.special.end_of_generation)
    seqs = [engine.new_sequence() for _ in starts]
    try:
        if together:
            logits = engine.evaluate(list(zip(seqs, starts, strict=True)))
        else:
            logits = np.concatenate([engine.evaluate([(s, p)]) for s, p in zip(seqs, starts, strict=True)])
        start = time.perf_counter()
        for step in range(tokens):
            logits[:, banned] = -np.inf
            logits = engine.evaluate([(s, [int(t)]) for s, t in zip(seqs, logits.argmax(axis=1), strict=True)])
            if step == 0:
                held = layout(engine)
        return len(seqs) * tokens / (time.perf_counter() - start), held
    finally:
        for seq in seqs:
            engine.free(seq)


def scheduler_decode(model: slm.Model, starts: list[list[int]], tokens: int, budget: int) -> tuple[float, str]:
    """``slm.tools.bench.batched_decode``'s figure with a token budget of ``budget`` a step: aggregate decode
    tokens/s from the step after the last prompt is read to the first request's end."""
    engine = model.engine
    assert isinstance(engine, OnnxGenAIEngine)
    params = GenerationParams(temperature=0, max_tokens=tokens, logit_bias=no_end_bias(model.info))
    scheduler = Scheduler(engine, model.name, max_running=len(starts), prefix_cache_bytes=0,
                          max_batch_tokens=budget)
    started: set[int] = set()
    finished: list[int] = []
    failures: list[Exception] = []

    def listener(i: int) -> Callable[[Any], None]:
        def on_chunk(chunk: Any) -> None:
            started.add(i)
            if chunk.finish_reason:
                finished.append(i)
        return on_chunk

    for i, start in enumerate(starts):
        scheduler.submit(start, params, listener(i), failures.append)
    while len(started) < len(starts) and not failures and scheduler.step():
        pass
    held = layout(engine)
    before, clock = scheduler.counters["generated_tokens"], time.perf_counter()
    while not finished and not failures and scheduler.step():
        pass
    elapsed = time.perf_counter() - clock
    generated = scheduler.counters["generated_tokens"] - before
    while scheduler.step():
        pass
    scheduler.stop()
    if failures:
        raise failures[0]
    return generated / elapsed, held


def og_engine(path: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    return model, og.Engine(model)


def og_engine_decode(engine: Any, starts: list[list[int]], tokens: int) -> tuple[float, str]:
    """Decode tokens/s of ONNX Runtime GenAI's own Engine on ``starts``, greedy: the time and tokens of its ``run``
    calls that gave no request its first token."""
    import onnxruntime_genai as og

    requests = []
    for start in starts:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_do_sample(False)
        options.set_max_generated_tokens(tokens)
        options.set_min_generated_tokens(tokens)  # the end of text banned, as on slm's side
        request.begin_turn(np.asarray(start, dtype=np.int32), options)
        requests.append(request)
    events = engine.create_event_buffer(64)
    seen: set[int] = set()
    decode_seconds, decoded, widest = 0.0, 0, 0
    try:
        while engine.has_pending_requests():
            clock = time.perf_counter()
            engine.run(events)
            elapsed = time.perf_counter() - clock
            got = [events[k] for k in range(len(events)) if int(events[k].flags) & int(og.EngineEventFlags.TOKEN)]
            firsts = {id(e.request) for e in got} - seen
            seen |= firsts
            widest = max(widest, len(got))
            if not firsts:
                decode_seconds += elapsed
                decoded += len(got)
    finally:
        for request in requests:
            request.close()
    return decoded / decode_seconds, f"up to {widest} a run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads (default: all cores)")
    parser.add_argument("--model", type=Path, default=None,
                        help="the int4 ONNX folder (default: SmolLM2's in the store, converted the first time)")
    add_run_options(parser, unit="measurement", retries=1, quick="2 repetitions of 16 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repetitions = 16, 2
    started = time.perf_counter()
    path = args.model or int4_build()
    quiet = Quiet(args.max_contention, args.retries, args.max_wait)
    model = slm.load(str(path), engine="onnx", threads=args.threads, max_sequences=SEQUENCES, n_ctx=1024)
    engine = model.engine
    assert isinstance(engine, OnnxGenAIEngine)
    starts = prompts(engine, SEQUENCES, args.prompt_tokens)
    _og_model, native = og_engine(path, args.threads)  # the Engine needs its Model alive
    runs: dict[str, Callable[[], tuple[float, str]]] = {
        "engine x1": lambda: engine_decode(engine, starts[:1], args.tokens, together=True),
        "engine x8 batched": lambda: engine_decode(engine, starts, args.tokens, together=True),
        "engine x8 one after the other": lambda: engine_decode(engine, starts, args.tokens, together=False),
        "scheduler x1": lambda: scheduler_decode(model, starts[:1], args.tokens, 512),
        "scheduler x8": lambda: scheduler_decode(model, starts, args.tokens, 512),
        "scheduler x8, budget 2048": lambda: scheduler_decode(model, starts, args.tokens, 2048),
        "og.Engine x1": lambda: og_engine_decode(native, starts[:1], args.tokens),
        "og.Engine x8": lambda: og_engine_decode(native, starts, args.tokens),
    }
    figures: dict[str, dict[int, float]] = {name: {} for name in CONFIGS}
    layouts: dict[str, str] = {}
    loads: list[dict[str, Any]] = []
    for rep in range(args.repetitions):
        order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
        for name in order:
            measured = quiet.run(f"{name} {rep}", runs[name])
            figures[name][rep], layouts[name] = measured.result
            loads.append({"what": f"{name} {rep}", "others_cpu_share": round(measured.others, 3),
                          "load_average": load_average(os.getloadavg())})
        print(f"rep {rep}: " + ", ".join(f"{n} {figures[n][rep]:.0f}" for n in CONFIGS), f"(load {loads[-1]})",
              file=sys.stderr)
    model.close()
    report = {
        **report_head("onnx_batch", started), "machine": machine(), "versions": package_versions(VERSIONS),
        "model": model_file(path) | {"path": str(path)},
        "settings": {"tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "sequences": SEQUENCES,
                     "repetitions": args.repetitions, "threads": args.threads,
                     "max_contention": args.max_contention, "max_wait": args.max_wait},
        "target": TARGET,
        "results": {name: {"tokens_per_second": round(statistics.median(figures[name].values()), 1),
                           "runs": [round(v, 1) for v in figures[name].values()], "layout": layouts[name]}
                    for name in CONFIGS},
        "ratios": {
            "engine x8 batched / engine x1": ratio(figures, "engine x8 batched", "engine x1"),
            "engine x8 batched / engine x8 one after the other":
                ratio(figures, "engine x8 batched", "engine x8 one after the other"),
            "scheduler x8 / scheduler x1": ratio(figures, "scheduler x8", "scheduler x1"),
            "scheduler x8, budget 2048 / scheduler x1": ratio(figures, "scheduler x8, budget 2048", "scheduler x1"),
            "og.Engine x8 / og.Engine x1": ratio(figures, "og.Engine x8", "og.Engine x1"),
        },
        "load": loads, "rejected_for_contention": quiet.rejected,
    }
    markdown = render(report)
    print(markdown)
    directory = output_directory(args)
    if directory is not None:
        write_results(directory, "onnx_batch", report, markdown + "\n")
    return 0


def ratio(figures: dict[str, dict[int, float]], ours: str, theirs: str) -> float:
    return round(statistics.median(paired_ratios(figures[ours], figures[theirs])), 2)


def render(report: dict[str, Any]) -> str:
    results = report["results"]
    rows = [[name, f"{r['tokens_per_second']:.1f}", " ".join(f"{v:.0f}" for v in r["runs"]), r["layout"]]
            for name, r in results.items()]
    table = markdown_table(["configuration", "decode tok/s (median)", "runs", "sequences held as"], rows, "lrrl")
    pairs = markdown_table(["ratio", "median of paired ratios"],
                            [[name, f"{value:.2f}x"] for name, value in report["ratios"].items()], "lr")
    shares = [entry["others_cpu_share"] for entry in report["load"]]
    met = report["ratios"]["engine x8 batched / engine x1"] >= report["target"]
    return fill(REPORT["report"], **report, date=report["created"][:10], table=table, pairs=pairs,
                verdict="met" if met else "**not met**", others_median=statistics.median(shares),
                others_max=max(shares), load_first=report["load"][0]["load_average"],
                load_last=report["load"][-1]["load_average"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
