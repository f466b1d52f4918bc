"""Embedding throughput: sentences/s of all-MiniLM-L6-v2 on slm's transformers engine and on llama.cpp (the GGUF
of ``slm convert minilm --to gguf``, made if the store lacks it) against sentence-transformers' own ``encode``,
at batch 1, 8 and 32.

One process, the same model folder (``slm pull minilm``) and its GGUF, the same threads (torch's and llama.cpp's).
Every repetition runs each side once per batch size, back to back, in an order that rotates between
repetitions; each figure is the median of its repetitions, each ratio the median of the per-repetition ratios.
All sides tokenize inside the clock; all sort by length before batching (sentence-transformers does so itself).

    .venv/bin/python benchmarks/embeddings.py          # writes benchmarks/results/embeddings.{json,md}
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

import slm
from harness import (
    PROMPT_TEXT,
    Quiet,
    add_run_options,
    fill,
    load_average,
    machine,
    markdown_table,
    output_directory,
    package_versions,
    paired_ratios,
    report_head,
    templates,
    write_results,
)
from slm.model.embedding import EmbeddingModel
from slm.store import catalog, parts
from slm.tools.convert import convert, default_output

SIDES = ("slm-transformers", "slm-llama.cpp", "sentence-transformers")
PEER = "sentence-transformers"

BATCHES = (1, 8, 32)
VERSIONS = ("torch", "transformers", "sentence-transformers", "llama-cpp-python", "numpy")
REPORT = templates("embeddings")


def sentences(count: int) -> list[str]:
    """``count`` sentences of varied length cut from the harness's text, each behind its own number."""
    pieces = [p.strip() for p in re.split(r"(?<=[.,;])\s+", PROMPT_TEXT) if len(p.strip()) > 3]
    return [f"{i}. {pieces[i % len(pieces)]}" for i in range(count)]


def ours(model: EmbeddingModel, texts: list[str], batch: int) -> float:
    """Sentences/s through ``EmbeddingModel.embed``, ``batch`` sentences a call (sorted by length, as theirs)."""
    order = sorted(texts, key=len, reverse=True)
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        model.embed(order[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def theirs(st: Any, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    st.encode(texts, batch_size=batch, show_progress_bar=False)
    return len(texts) / (time.perf_counter() - start)


def gguf_of_minilm() -> str:
    """The store name of minilm's GGUF (default precision), converted now if the store has none."""
    folder = catalog.resolve("minilm")
    target = default_output(folder, "gguf")
    if not target.is_file():
        convert(folder, "gguf")
    return target.stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    add_run_options(parser, unit="measurement", retries=2, quick="2 repetitions of 16 sentences")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.sentences = 2, 16
    started = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    entry = catalog.CATALOG["minilm"]
    folder = entry.local_path() or parts.pull(entry)
    gguf = gguf_of_minilm()
    models = {"slm-transformers": slm.load("minilm", threads=args.threads),
              "slm-llama.cpp": slm.load(gguf, threads=args.threads)}
    torch.set_num_threads(args.threads)
    st = SentenceTransformer(str(folder), device="cpu")
    texts = sentences(args.sentences)
    reference = st.encode(texts)
    agree = {side: float(np.min(np.sum(m.embed(texts).vectors * reference, axis=1))) for side, m in models.items()}
    quiet = Quiet(args.max_contention, args.retries, args.max_wait)
    runs: dict[tuple[str, int], dict[int, float]] = {}
    others: list[float] = []
    loads = []
    for rep in range(args.repetitions):
        order = SIDES[rep % len(SIDES):] + SIDES[: rep % len(SIDES)]
        for side in order:
            run, target = (theirs, st) if side == PEER else (ours, models[side])
            for batch in BATCHES:
                measured = quiet.run(f"{side} batch {batch}", lambda: run(target, texts, batch))  # noqa: B023
                runs.setdefault((side, batch), {})[rep] = measured.result
                others.append(measured.others)
        loads.append(__import__("os").getloadavg())
        print(f"repetition {rep + 1}/{args.repetitions} done", file=sys.stderr)
    rows, figures = [], {}
    for batch in BATCHES:
        peer = runs[(PEER, batch)]
        figures[batch] = {side.replace("-", "_").replace(".", ""): statistics.median(runs[(side, batch)].values())
                          for side in SIDES}
        figures[batch]["runs"] = {side: list(runs[(side, batch)].values()) for side in SIDES}
        ratios = {side: statistics.median(paired_ratios(runs[(side, batch)], peer)) for side in SIDES if side != PEER}
        figures[batch]["ratios"] = {side: round(r, 3) for side, r in ratios.items()}
        rows.append([str(batch), *(f"{statistics.median(runs[(side, batch)].values()):.1f}" for side in SIDES),
                     *(f"{ratios[side]:.2f}x" for side in SIDES if side != PEER)])
    table = markdown_table(["batch", *(f"{side} (sentences/s)" for side in SIDES),
                            *(f"{side} / {PEER}" for side in SIDES if side != PEER)], rows, "r" * 6)
    report = {**report_head("embeddings", started), "machine": machine(), "versions": package_versions(VERSIONS),
              "settings": {"threads": args.threads, "sentences": args.sentences, "repetitions": args.repetitions,
                           "gguf": gguf},
              "min_cosine": {side: round(value, 6) for side, value in agree.items()}, "figures": figures,
              "others_cpu_share": others, "rejected": quiet.rejected}
    markdown = fill(REPORT["report"], date=report["created"], git=report["git"], wall_seconds=report["wall_seconds"],
                    machine=report["machine"], versions=report["versions"], settings=report["settings"],
                    others_median=statistics.median(others), others_max=max(others),
                    load_first=load_average(loads[0]), load_last=load_average(loads[-1]), table=table,
                    cosine_transformers=agree["slm-transformers"], cosine_llamacpp=agree["slm-llama.cpp"]) + "\n"
    print(markdown)
    directory = output_directory(args)
    if directory is not None:
        write_results(directory, "embeddings", report, markdown, inline_number_lists=True)
    for model in models.values():
        model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
