"""What compressing SmolLM2-135M costs: ``slm eval`` over the same text for the fp16 GGUF that ``slm convert``
writes from its Hugging Face folder and the files ``slm quantize`` makes from it (q8_0, q5_k_m, q4_k_m,
q4_1), beside the Q4_1 file the package ships. Size, bits per weight, perplexity (llama.cpp's method, windows
of ``--ctx`` over the Apache License 2.0 text in tests/data) and one-sequence decode tokens/s, on llama.cpp.

The HF folder is the shipped Q4_1 file dequantized, so the fp16 file holds Q4_1's weights exactly: every
other type quantizes them again (the shipped Q4_1 and a q4_1 of the fp16 file should agree).

    .venv/bin/python benchmarks/quantization.py      # writes benchmarks/results/quantization.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    RESULTS,
    ROOT,
    fill,
    git_revision,
    machine,
    markdown_table,
    now,
    package_versions,
    templates,
    write_results,
)
from slm.store.catalog import resolve, store_dir
from slm.tools.convert import convert, default_output
from slm.tools.evaluate import evaluate
from slm.tools.quantize import default_output as quantized_name
from slm.tools.quantize import quantize

TYPES = ("q8_0", "q5_k_m", "q4_k_m", "q4_1")
TEXT = ROOT / "tests" / "data" / "apache-2.0.txt"
REPORT = templates("quantization")


def models() -> list[str]:
    """The store names to evaluate, made first where missing: the fp16 GGUF, its quantized files, the shipped one."""
    hf = default_output(resolve("smollm2"), "hf")
    if not hf.exists():
        convert(resolve("smollm2"), "hf")
    fp16 = default_output(resolve(str(hf)), "gguf", "fp16")
    if not fp16.exists():
        convert(resolve(str(hf)), "gguf", precision="fp16")
    names = [fp16.stem]
    for kind in TYPES:
        target = quantized_name(resolve(fp16.stem), kind)
        if not target.exists():
            quantize(resolve(fp16.stem), kind, target)
        names.append(target.stem)
    return [*names, "smollm2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--repetitions", type=int, default=3, help="decode speed: median of this many evaluations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    text = TEXT.read_text(encoding="utf-8")
    names = models()
    runs: dict[str, list[Any]] = {name: [] for name in names}
    for rep in range(args.repetitions):
        for name in names if rep % 2 == 0 else reversed(names):
            runs[name].append(evaluate(name, text, args.ctx, threads=args.threads))
            print(f"rep {rep} {name}: {runs[name][-1].perplexity:.4f}, {runs[name][-1].decode_tps:.1f} tok/s",
                  file=sys.stderr)
    rows = []
    for name in names:
        first = runs[name][0].as_dict()
        assert all(r.perplexity == runs[name][0].perplexity for r in runs[name])  # deterministic
        rows.append(first | {"decode_tps": statistics.median(r.decode_tps for r in runs[name]),
                             "label": "shipped" if name == "smollm2" else "slm quantize" if name != names[0]
                             else "slm convert --precision fp16"})
    report = {"benchmark": "quantization", "date": now(), "git": git_revision(),
              "machine": machine() | {"versions": package_versions(("llama-cpp-python",))},
              "settings": vars(args) | {"output": str(args.output), "store": str(store_dir()), "text": str(TEXT)},
              "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1)}
    write_results(args.output, "quantization", report, render(report), indent=1)
    print(render(report))
    return 0


HEADER = ("file", "made by", "type", "size", "bits/weight", "perplexity", "vs fp16", "decode tok/s")


def render(report: dict[str, Any]) -> str:
    base = report["rows"][0]["perplexity"]
    table = [(r["model"], r["label"], r["precision"] or "-", f"{r['size_bytes'] / 2**20:.1f} MiB",
              f"{r['bits_per_weight']:.2f}", f"{r['perplexity']:.4f} +/- {r['error']:.4f}",
              f"{r['perplexity'] / base - 1:+.2%}", f"{r['decode_tps']:.1f}") for r in report["rows"]]
    return fill(REPORT["report"], **report, scored=report["rows"][0]["scored"],
                table=markdown_table(HEADER, table, "lllrrrrr")) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
