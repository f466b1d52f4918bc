"""LoRA adapters from training to serving, measured: the README's walk-through on SmolLM2-135M.

1. ``slm finetune`` trains an adapter of the Hugging Face folder on the made-up capitals of ``tests/lora.py``
   (30 steps, batch 8, as the tests do); ``slm merge`` folds it into the weights; ``slm convert --to gguf
   --precision fp16`` and ``slm quantize`` (q8_0, q4_k_m) compress the merged model.
2. Every way of running the result, side by side: the shipped Q4_1 GGUF alone and with the adapter (llama.cpp),
   the HF folder with the adapter (transformers, peft's LoRA layers), and the merged model in each format. For
   each: held-out questions answered with the right capital (of 8, greedy), size on disk, perplexity on the
   Apache License text (what the fine-tuning cost the model's general text; llama.cpp's method, windows of 512)
   and one-sequence decode tokens/s (median of ``--repetitions`` alternating runs).
3. The peer: llama-cpp-python's own ``Llama(model_path, lora_path=...)`` running the same GGUF adapter over the
   same file, in the same run: decode tokens/s of one sequence, slm's loop against its loop, paired per run.
4. Batching: 8 sequences decoding at once on one engine, all through one adapter or half through each of two
   (llama.cpp applies one adapter set per decode call, so a mixed step is two calls; transformers routes each
   row through its own adapter in one forward pass).

    .venv/bin/python benchmarks/adapters.py      # writes benchmarks/results/adapters.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    RESULTS,
    ROOT,
    fill,
    machine,
    markdown_table,
    package_versions,
    report_head,
    templates,
    write_results,
)

sys.path.insert(0, str(ROOT / "tests"))
import slm  # noqa: E402
from lora import FACTS, HELD_OUT_QUESTION, chat, random_adapter, train_facts_adapter  # noqa: E402
from slm.tools.evaluate import DECODE_TOKENS, decode_rate  # noqa: E402

TEXT = ROOT / "tests" / "data" / "apache-2.0.txt"
VERSIONS = ("llama-cpp-python", "torch", "transformers", "peft")
REPORT = templates("adapters")


def prepare(store: Path) -> dict[str, float]:
    """The adapters and the merged and compressed models in ``store`` (the current SLM_HOME's); seconds each took."""
    from slm.store.catalog import resolve
    from slm.tools.convert import convert, default_output
    from slm.tools.merge import merge
    from slm.tools.quantize import quantize

    default = Path.home() / ".cache" / "slm" / "models" / "smollm2-hf"
    if not default.exists():
        convert(resolve("smollm2"), "hf", default)
    (store / "smollm2-hf").symlink_to(default)
    took: dict[str, float] = {}
    start = time.perf_counter()
    train_facts_adapter(store / "smollm2-hf", store / "facts")
    took["finetune (30 steps)"] = time.perf_counter() - start
    random_adapter(store / "smollm2-hf", store / "facts", store / "random")
    start = time.perf_counter()
    merge("smollm2-hf", "facts", "facts-merged")
    took["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    convert(resolve("facts-merged"), "gguf", default_output(resolve("facts-merged"), "gguf", "fp16"), precision="fp16")
    took["convert to fp16 GGUF"] = time.perf_counter() - start
    for kind in ("q8_0", "q4_k_m"):
        start = time.perf_counter()
        quantize(resolve("facts-merged-fp16"), kind, store / f"facts-merged-{kind}.gguf")
        took[f"quantize to {kind}"] = time.perf_counter() - start
    return {k: round(v, 1) for k, v in took.items()}


# (label, model, adapters, engine) for every way of running the fine-tuned model, and the base alone first
WAYS = [
    ("SmolLM2 Q4_1 GGUF, alone", "smollm2", (), "llamacpp"),
    ("Q4_1 GGUF + adapter", "smollm2", ("facts",), "llamacpp"),
    ("HF fp32 + adapter", "smollm2-hf", ("facts",), "transformers"),
    ("merged, HF fp32", "facts-merged", (), "transformers"),
    ("merged, GGUF fp16", "facts-merged-fp16", (), "llamacpp"),
    ("merged, GGUF q8_0", "facts-merged-q8_0", (), "llamacpp"),
    ("merged, GGUF q4_k_m", "facts-merged-q4_k_m", (), "llamacpp"),
]


def right_answers(model: slm.Model) -> int:
    return sum(capital in model.chat(chat(HELD_OUT_QUESTION.format(country)), temperature=0, max_tokens=8).text
               for country, capital in FACTS)


def size_of(model: str, adapters: tuple[str, ...], store: Path) -> int:
    from slm.store.catalog import resolve

    path = resolve(model).path
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix == ".safetensors"]
    files += [store / a / "adapter_model.safetensors" for a in adapters]
    return sum(f.stat().st_size for f in files)


def ways(args: argparse.Namespace, store: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    rates: dict[str, list[float]] = {label: [] for label, *_ in WAYS}
    for rep in range(args.repetitions):
        for label, name, adapters, engine in WAYS if rep % 2 == 0 else reversed(WAYS):
            model = slm.load(name, adapters=list(adapters), engine=engine, threads=args.threads, n_ctx=512,
                             max_sequences=1)
            assert isinstance(model, slm.Model)
            with model:
                prompt = model.engine.tokenize(text, add_special=True, parse_special=False)[:256]
                rates[label].append(decode_rate(model, prompt))
                if rep == 0:
                    rows.append({"label": label, "model": name, "adapters": list(adapters), "engine": engine,
                                 "right": right_answers(model), "size_bytes": size_of(name, adapters, store),
                                 "perplexity": round(model.perplexity(text, 512).value, 4)})
            print(f"rep {rep} {label}: {rates[label][-1]:.1f} tok/s", file=sys.stderr)
    for row in rows:
        row["decode_tps"] = round(statistics.median(rates[row["label"]]), 1)
        row["decode_runs"] = [round(r, 1) for r in rates[row["label"]]]
    return sorted(rows, key=lambda r: [w[0] for w in WAYS].index(r["label"]))


def peer(args: argparse.Namespace, store: Path, text: str) -> dict[str, Any]:
    """One sequence's decode tokens/s with the adapter: slm's llama.cpp engine and llama-cpp-python's ``Llama``,
    paired per repetition, on the same GGUF file and the same converted adapter."""
    import llama_cpp

    from slm.engines.llamacpp_lora import gguf_adapter, read_base
    from slm.store.catalog import resolve

    base = resolve("smollm2").path
    adapter_file = gguf_adapter("facts", store / "facts", read_base(base))
    ours, theirs = [], []
    for rep in range(args.repetitions):
        for side in ("slm", "llama-cpp-python") if rep % 2 == 0 else ("llama-cpp-python", "slm"):
            if side == "slm":
                model = slm.load("smollm2", adapters=["facts"], threads=args.threads, n_ctx=512, max_sequences=1)
                assert isinstance(model, slm.Model)
                with model:
                    prompt = model.engine.tokenize(text, add_special=True, parse_special=False)[:256]
                    ours.append(decode_rate(model, prompt))
                continue
            llm = llama_cpp.Llama(str(base), lora_path=str(adapter_file), n_ctx=512, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            prompt = llm.tokenize(text.encode(), add_bos=True)[:256]
            stamps = []
            for _ in llm.generate(prompt, temp=0.0, top_k=1, logits_processor=_no_end(llm)):
                stamps.append(time.perf_counter())
                if len(stamps) == DECODE_TOKENS + 1:
                    break
            theirs.append(DECODE_TOKENS / (stamps[-1] - stamps[0]))
            llm.close()
        print(f"rep {rep}: slm {ours[-1]:.1f}, llama-cpp-python {theirs[-1]:.1f} tok/s", file=sys.stderr)
    return {"slm": round(statistics.median(ours), 1), "llama_cpp_python": round(statistics.median(theirs), 1),
            "ratio": round(statistics.median(o / t for o, t in zip(ours, theirs, strict=True)), 3),
            "slm_runs": [round(r, 1) for r in ours], "llama_cpp_python_runs": [round(r, 1) for r in theirs]}


def _no_end(llm: Any) -> Any:
    import llama_cpp
    import numpy as np

    end = llm.token_eos()

    def bar(ids: Any, scores: Any) -> Any:
        scores[end] = -np.inf
        return scores

    return llama_cpp.LogitsProcessorList([bar])


MIXES = {"8 alone": [None] * 8, "8 through one adapter": ["facts"] * 8, "4 + 4 through two": ["facts", "random"] * 4}


def batching(args: argparse.Namespace, text: str) -> list[dict[str, Any]]:
    """Decode tokens/s of 8 sequences at once, by how they split between adapters, on each engine."""
    rows = []
    for name, engine, steps in (("smollm2", "llamacpp", 32), ("smollm2-hf", "transformers", 8)):
        model = slm.load(name, adapters=["facts", "random"], engine=engine, threads=args.threads, n_ctx=512,
                         kv_cells=2048, max_sequences=8)
        assert isinstance(model, slm.Model)
        rates: dict[str, list[float]] = {mix: [] for mix in MIXES}
        with model:
            prompt = model.engine.tokenize(text, add_special=True, parse_special=False)[:64]
            for rep in range(args.repetitions):
                for mix, adapters in MIXES.items() if rep % 2 == 0 else reversed(MIXES.items()):
                    rates[mix].append(_batched(model.engine, prompt, adapters, steps))
        rows += [{"engine": engine, "mix": mix, "decode_tps": round(statistics.median(r), 1),
                  "runs": [round(x, 1) for x in r]} for mix, r in rates.items()]
        print(rows[-3:], file=sys.stderr)
    return rows


def _batched(engine: Any, prompt: list[int], adapters: list[str | None], steps: int) -> float:
    seqs = [engine.new_sequence(a) for a in adapters]
    try:
        logits = engine.evaluate([(s, prompt) for s in seqs])
        start = time.perf_counter()
        for _ in range(steps):
            logits = engine.evaluate([(s, [int(row.argmax())]) for s, row in zip(seqs, logits, strict=True)])
        return steps * len(seqs) / (time.perf_counter() - start)
    finally:
        for s in seqs:
            engine.free(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    text = TEXT.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="slm-adapters-") as home:
        os.environ["SLM_HOME"] = home
        store = Path(home) / "models"
        store.mkdir()
        took = prepare(store)
        table = ways(args, store, text)
        versus = peer(args, store, text)
        batched = batching(args, text)
    report = report_head("adapters", started) | {
        "machine": machine() | {"versions": package_versions(VERSIONS)},
        "settings": {"repetitions": args.repetitions, "threads": args.threads, "decode_tokens": DECODE_TOKENS},
        "preparation_seconds": took, "ways": table, "peer": versus, "batching": batched}
    write_results(args.output, "adapters", report, render(report), indent=1)
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    ways_table = markdown_table(
        ("way of running it", "engine", "right of 8", "size", "perplexity", "decode tok/s"),
        [(r["label"], r["engine"], str(r["right"]), f"{r['size_bytes'] / 2**20:.1f} MiB", f"{r['perplexity']:.3f}",
          f"{r['decode_tps']:.1f}") for r in report["ways"]], "llrrrr")
    batching_table = markdown_table(("engine", "8 sequences", "decode tok/s"),
                                    [(r["engine"], r["mix"], f"{r['decode_tps']:.1f}") for r in report["batching"]],
                                    "llr")
    took = ", ".join(f"{k} {v:g} s" for k, v in report["preparation_seconds"].items())
    return fill(REPORT["report"], **report, ways_table=ways_table, batching_table=batching_table, took=took) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
