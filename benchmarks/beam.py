"""Beam search benchmark: slm's beam search on each engine, next to that engine's own beam search, on SmolLM2.

One run, one prompt, 4 beams, ``--tokens`` new tokens (every side is held to exactly that many with
``min_new_tokens``, so that no beam ends early and every side does the same work), the same threads:

- transformers: slm's ``BeamSearch`` on the transformers engine against transformers' own
  ``generate(num_beams=4, do_sample=False)``, on the float32 Hugging Face folder (`slm convert --to hf`);
- ONNX Runtime GenAI: slm's ``BeamSearch`` on the ONNX engine against onnxruntime-genai's own beam search
  (``set_search_options(num_beams=4)``), on the int4 build (`slm convert --to onnx`);
- llama.cpp: llama.cpp has no beam search of its own any more (and llama-cpp-python none), so slm's beam
  search on the Q4_1 GGUF is shown beside slm's greedy decoding on it.

Figures are tokens/s of the search: new tokens over wall time, prompt included. Runs alternate between the two
sides; each figure is the median of ``--repetitions``, and each ratio the median of the paired ratios. The
machine has 2 cores that other processes share: each repetition waits for a quiet second first
(``harness.Quiet``) and records what the others took.

    .venv/bin/python benchmarks/beam.py          # writes benchmarks/results/beam.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import slm
from harness import (
    Quiet,
    add_run_options,
    fill,
    machine,
    markdown_table,
    output_directory,
    package_versions,
    paired_ratios,
    report_head,
    templates,
    write_results,
)
from slm.engines.base import default_threads
from slm.generation.beam import BeamSearch
from slm.generation.params import GenerationParams
from slm.store.catalog import resolve, store_dir
from slm.tools.convert import convert, default_output

BEAMS = 4
TARGET = 5.0
"""slm on the transformers engine over transformers' ``generate(num_beams=4)`` (from the issue)."""
VERSIONS = ("llama-cpp-python", "onnxruntime-genai", "torch", "transformers")
REPORT = templates("beam")
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def _folder(kind: str, precision: str = "fp32") -> Path:
    """SmolLM2 as a Hugging Face folder or an ONNX build in the store, converted the first time."""
    hf = store_dir() / "smollm2-hf"
    if not hf.exists():
        convert(resolve("smollm2"), "hf")
    if kind == "hf":
        return hf
    onnx = default_output(resolve(str(hf)), "onnx", precision)
    if not onnx.exists():
        convert(resolve(str(hf)), "onnx", precision=precision)
    return onnx


def _timed(fn: Callable[[], int]) -> float:
    """Tokens/s of ``fn``, which returns how many new tokens it made."""
    start = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - start)


def _slm_beams(model: slm.Model, prompt: list[int], tokens: int) -> Callable[[], int]:
    params = GenerationParams.of(num_beams=BEAMS, max_tokens=tokens, min_new_tokens=tokens)

    def run() -> int:
        beams = BeamSearch(model.engine, prompt, params).run()
        assert len(beams[0].tokens) == tokens
        return tokens

    return run


def _slm_greedy(model: slm.Model, prompt: list[int], tokens: int) -> Callable[[], int]:
    def run() -> int:
        banned = dict.fromkeys(model.info.special.end_of_generation, -100.0)
        completion = model.generate(prompt, temperature=0, max_tokens=tokens, logit_bias=banned)
        return len(completion.tokens)

    return run


def _hf_beams(path: Path, prompt: list[int], tokens: int, threads: int) -> Callable[[], int]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run() -> int:
        with torch.inference_mode():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=BEAMS,
                                     max_new_tokens=tokens, min_new_tokens=tokens, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=0)
        assert out.shape[1] - len(prompt) == tokens
        return tokens

    return run


def _og_beams(path: Path, prompt: list[int], tokens: int, threads: int) -> Callable[[], int]:
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run() -> int:
        params = og.GeneratorParams(model)
        params.set_search_options(num_beams=BEAMS, do_sample=False, max_length=len(prompt) + tokens,
                                  min_length=len(prompt) + tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        made = len(generator.get_sequence(0)) - len(prompt)
        del generator
        return made

    return run


def _pair(quiet: Quiet, label: str, ours: Callable[[], int], theirs: Callable[[], int] | None,
          repetitions: int) -> dict[str, Any]:
    """Alternating repetitions of both sides (ours first, then theirs, then ours...); their medians and the
    median of the paired ratios."""
    ours(), theirs() if theirs is not None else None  # warm-up: caches, allocations, threads
    mine: dict[int, float] = {}
    peer: dict[int, float] = {}
    others = []
    for rep in range(repetitions):
        sides = [("slm", ours, mine), *([("peer", theirs, peer)] if theirs is not None else [])]
        for name, fn, into in (sides if rep % 2 == 0 else sides[::-1]):
            measured = quiet.run(f"{label} {name} {rep}", lambda fn=fn: _timed(fn))
            into[rep] = measured.result
            others.append(measured.others)
    row: dict[str, Any] = {"slm_tokens_per_second": round(statistics.median(mine.values()), 2),
                           "slm_runs": [round(v, 2) for v in mine.values()],
                           "others_cpu_share_max": round(max(others), 3)}
    if peer:
        row["peer_tokens_per_second"] = round(statistics.median(peer.values()), 2)
        row["peer_runs"] = [round(v, 2) for v in peer.values()]
        row["ratio"] = round(statistics.median(paired_ratios(mine, peer)), 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per search (default 32)")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions per side (default 5)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads of every engine (default: all cores; 1 is far steadier on a busy machine)")
    add_run_options(parser, unit="repetition", retries=2, quick="2 repetitions of 8 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repetitions = 8, 2
    started = time.perf_counter()
    quiet = Quiet(args.max_contention, args.retries, args.max_wait)
    rows: dict[str, dict[str, Any]] = {}

    hf_path = _folder("hf")
    with slm.load(str(hf_path), engine="transformers", max_sequences=BEAMS, threads=args.threads) as model:
        assert isinstance(model, slm.Model)
        prompt = model.chat_tokens(PROMPT)
        rows["transformers"] = {
            "peer": "transformers generate(num_beams=4)", "model": "float32 Hugging Face folder",
            **_pair(quiet, "transformers", _slm_beams(model, prompt, args.tokens),
                    _hf_beams(hf_path, prompt, args.tokens, args.threads), args.repetitions)}
    onnx_path = _folder("onnx", "int4")
    with slm.load(str(onnx_path), engine="onnx", max_sequences=BEAMS, threads=args.threads) as model:
        assert isinstance(model, slm.Model)
        rows["onnxruntime-genai"] = {
            "peer": "onnxruntime-genai beam search (num_beams=4)", "model": "int4 ONNX build",
            **_pair(quiet, "onnx", _slm_beams(model, prompt, args.tokens),
                    _og_beams(onnx_path, prompt, args.tokens, args.threads), args.repetitions)}
    with slm.load("smollm2", max_sequences=BEAMS, threads=args.threads) as model:
        assert isinstance(model, slm.Model)
        rows["llama.cpp"] = {
            "peer": "none (llama.cpp has no beam search); slm greedy on it", "model": "Q4_1 GGUF",
            **_pair(quiet, "llama.cpp", _slm_beams(model, prompt, args.tokens), _slm_greedy(model, prompt, args.tokens),
                    args.repetitions)}

    report = {**report_head("beam", started), "machine": machine(), "versions": package_versions(VERSIONS),
              "settings": {"beams": BEAMS, "tokens": args.tokens, "prompt_tokens": len(prompt),
                           "repetitions": args.repetitions, "threads": args.threads,
                           "max_contention": args.max_contention},
              "target": TARGET, "results": rows, "rejected_for_contention": quiet.rejected}
    markdown = render(report)
    print(markdown)
    directory = output_directory(args)
    if directory is not None:
        write_results(directory, "beam", report, markdown + "\n")
    return 0


def render(report: dict[str, Any]) -> str:
    rows = []
    for engine, r in report["results"].items():
        peer = f"{r['peer_tokens_per_second']:.2f}" if "peer_tokens_per_second" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        rows.append([engine, r["model"], f"{r['slm_tokens_per_second']:.2f}", peer, ratio, r["peer"]])
    table = markdown_table(["engine", "model", "slm beams tok/s", "peer tok/s", "slm / peer", "peer"], rows, "llrrrl")
    return fill(REPORT["report"], **report, table=table, date=report["created"][:10],
                others=max(r["others_cpu_share_max"] for r in report["results"].values()))


if __name__ == "__main__":
    sys.exit(main())
