"""OpenVINO int4 recipes for SmolLM2-135M: what each costs in quality, size and speed, with llama.cpp's Q4_1 of
the same model as the peer.

Every candidate is NNCF's ``compress_weights`` applied to the float32 graph ``slm convert --to openvino
--precision fp32`` wrote (the graph the exporter compresses), saved beside that folder's tokenizer files.
For each one, all run with slm's plugin settings (float32 compute and KV cache) and ``--threads`` threads:

- agreement: greedy tokens (``--tokens`` new ones, ``LLMPipeline``) that equal the float32 export's before
  the first difference, on raw and chat-templated prompts: the mean over the prompts, the fewest, and how
  many prompts agree throughout;
- NLL: the mean negative log-likelihood, in nats a token, of a fixed English text (harness.PROMPT_TEXT, not the
  exporter's calibration text) and of the float32 export's own greedy continuations of the prompts, read from
  the graph's logits in one call a sequence; KL: the mean KL divergence from the float32 export's next-token
  distribution over that text;
- size of openvino_model.bin (the GGUF file for llama.cpp), the seconds ``compress_weights`` took, and decode
  tok/s (``LLMPipeline``'s own time per output token, ``--decode-tokens`` after a 128-token prompt; the
  median of ``--repetitions``).

The fp32 folder is SmolLM2's Q4_1 GGUF dequantized (``slm convert smollm2 --to hf``), so llama.cpp's Q4_1 holds
the very weights the reference computes with: its row measures llama.cpp's arithmetic, not a quantization,
and an int4 recipe whose groups are the GGUF's 32-weight blocks can nearly restore those weights.

    SLM_HOME=/tmp/ovh .venv/bin/python benchmarks/openvino_int4.py   # needs smollm2-hf-openvino-fp32 there
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
from transformers import AutoTokenizer

from engines import llama_native, openvino_native
from harness import (
    PROMPT_TEXT,
    RESULTS,
    Quiet,
    fill,
    git_revision,
    machine,
    markdown_table,
    now,
    package_versions,
    templates,
    write_results,
)
from slm.engines.openvino import CPU_CONFIG
from slm.store.catalog import resolve, store_dir
from slm.tools import openvino_export

VERSIONS = ("openvino", "openvino-genai", "openvino-tokenizers", "nncf", "llama-cpp-python", "torch", "transformers")
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "The three primary colors are", "import numpy as np\n\n# compute the mean of"]
CHAT_PROMPTS = ["What is the boiling point of water?", "Write a haiku about autumn.",
                "Give me three tips for learning Python.", "Explain photosynthesis to a child."]


def recipes(group: int, fp32: Path) -> dict[str, Callable[[ov.Model], ov.Model]]:
    """Each candidate, by its name in the table: the model -> its compressed copy (``group`` is the exporter's
    own group size for the model, 64 for SmolLM2; the data-aware ones read the exporter's calibration
    samples, tokenized by the ``fp32`` folder's tokenizer)."""
    import nncf
    from nncf import CompressWeightsMode as Mode

    asym, sym = Mode.INT4_ASYM, Mode.INT4_SYM
    samples = openvino_export.calibration(fp32)  # the exporter's own

    def nncf_recipe(**options: Any) -> Callable[[ov.Model], ov.Model]:
        return lambda model: nncf.compress_weights(model, **options)

    def data_aware(**options: Any) -> Callable[[ov.Model], ov.Model]:
        return lambda model: nncf.compress_weights(model, dataset=nncf.Dataset(samples), **options)

    return {
        f"int4 asym g{group} (before)": nncf_recipe(mode=asym, group_size=group, ratio=1.0),
        "int4 asym g32": nncf_recipe(mode=asym, group_size=32, ratio=1.0),
        f"int4 sym g{group}": nncf_recipe(mode=sym, group_size=group, ratio=1.0),
        "int4 asym g32 all_layers": nncf_recipe(mode=asym, group_size=32, ratio=1.0, all_layers=True),
        f"int4 asym g{group} ratio 0.8 by weight error": nncf_recipe(mode=asym, group_size=group, ratio=0.8),
        f"int4 asym g{group} ratio 0.6 by weight error": nncf_recipe(mode=asym, group_size=group, ratio=0.6),
        f"int4 asym g{group} awq + scale estimation": data_aware(mode=asym, group_size=group, ratio=1.0, awq=True,
                                                                 scale_estimation=True),
        "int4 asym g32 scale estimation": data_aware(mode=asym, group_size=32, ratio=1.0, scale_estimation=True),
        f"int4 asym g{group} ratio 0.8 by activations + awq + scale estimation": data_aware(
            mode=asym, group_size=group, ratio=0.8, awq=True, scale_estimation=True),
        f"int4 asym g{group} ratio 0.8 by activations (slm's default)": lambda model: openvino_export.compress(
            model, "int4", group, fp32),
        "int8 asym (per channel)": nncf_recipe(mode=Mode.INT8_ASYM),
    }


def common_prefix(ours: list[int], theirs: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


def pipeline_greedy(pipe: Any, ids: list[int], tokens: int) -> list[int]:
    config = ov_genai.GenerationConfig(max_new_tokens=tokens, do_sample=False)
    prompt = np.array([ids], np.int64)
    inputs = ov_genai.TokenizedInputs(ov.Tensor(prompt), ov.Tensor(np.ones_like(prompt)))
    return [int(t) for t in pipe.generate(inputs, config).tokens[0]]


def log_probs(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Graph:
    """One compiled stateful graph; ``log_probs(ids)`` reads a whole sequence from a fresh state."""

    def __init__(self, xml: Path, threads: int) -> None:
        compiled = ov.Core().compile_model(xml, "CPU", dict(CPU_CONFIG, INFERENCE_NUM_THREADS=threads))
        self.request = compiled.create_infer_request()

    def log_probs(self, ids: list[int]) -> np.ndarray:
        self.request.reset_state()
        out = self.request.infer({"input_ids": np.array([ids], np.int64),
                                  "attention_mask": np.ones((1, len(ids)), np.int64),
                                  "position_ids": np.arange(len(ids), dtype=np.int64)[None],
                                  "beam_idx": np.zeros(1, np.int32)})
        return log_probs(np.asarray(out["logits"])[0])  # (T, V)


class Llama:
    """llama.cpp on the GGUF with every position's logits, for the same two readings."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False,
                                   flash_attn=True, logits_all=True)

    def greedy(self, ids: list[int], tokens: int) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if token == self.llm.token_eos() or len(out) == tokens:
                break
        return out

    def log_probs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return log_probs(np.array(self.llm.scores[: len(ids)], dtype=np.float32))


def nll(probs: np.ndarray, ids: list[int], start: int) -> list[float]:
    """-log p of ``ids[start:]``, each read from the row before it."""
    return [-float(probs[i - 1, ids[i]]) for i in range(start, len(ids))]


def kl(reference: np.ndarray, probs: np.ndarray) -> float:
    """Mean KL(reference || probs) over the rows."""
    return float((np.exp(reference) * (reference - probs)).sum(axis=-1).mean())


def quality(greedy: Callable[[list[int], int], list[int]], read: Callable[[list[int]], np.ndarray],
            reference: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Agreement, NLL and KL of one model against the float32 export's ``reference`` readings."""
    prefixes = [common_prefix(greedy(ids, tokens), theirs)
                for ids, theirs in zip(reference["prompts"], reference["greedy"], strict=True)]
    text = reference["text"]
    probs = read(text)
    continuation = [value for ids, theirs in zip(reference["prompts"], reference["greedy"], strict=True)
                    for value in nll(read(ids + theirs), ids + theirs, len(ids))]
    return {"agreement": prefixes, "agreement_mean": statistics.mean(prefixes),
            "full": sum(p == len(t) for p, t in zip(prefixes, reference["greedy"], strict=True)),
            "nll_text": statistics.mean(nll(probs, text, 1)), "nll_continuation": statistics.mean(continuation),
            "kl_text": kl(reference["text_log_probs"], probs)}


def speed(run: Callable[[], tuple[float, float]], repetitions: int) -> float:
    return statistics.median(run()[1] for _ in range(repetitions))


def prompts(tokenizer: Any) -> list[list[int]]:
    raw = [tokenizer(p)["input_ids"] for p in RAW_PROMPTS]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in CHAT_PROMPTS]
    return raw + [list(ids) for ids in chat]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens a prompt for agreement")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ovq"), help="where the candidates are written")
    parser.add_argument("--only", nargs="*", help="candidates whose name contains one of these words")
    parser.add_argument("--max-contention", type=float, default=0.05,
                        help="redo a speed run when other processes took more than this share of the machine")
    parser.add_argument("--no-speed", action="store_true", help="quality only (no decode runs)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    fp32 = resolve("smollm2-hf-openvino-fp32").path
    gguf = resolve("smollm2").path
    tokenizer = AutoTokenizer.from_pretrained(fp32)
    ids = prompts(tokenizer)
    speed_prompt = tokenizer(PROMPT_TEXT)["input_ids"][:128]
    text = tokenizer(PROMPT_TEXT)["input_ids"]

    exact = ov_genai.LLMPipeline(str(fp32), "CPU", ATTENTION_BACKEND="SDPA", INFERENCE_NUM_THREADS=args.threads,
                                 **CPU_CONFIG)
    reference: dict[str, Any] = {"prompts": ids, "greedy": [pipeline_greedy(exact, p, args.tokens) for p in ids],
                                 "text": text, "text_log_probs": Graph(fp32 / "openvino_model.xml", args.threads)
                                 .log_probs(text)}
    del exact

    rows: list[dict[str, Any]] = []
    speeds: dict[str, Callable[[], tuple[float, float]]] = {}

    def openvino_row(name: str, folder: Path, seconds: float | None) -> None:
        pipe = ov_genai.LLMPipeline(str(folder), "CPU", ATTENTION_BACKEND="SDPA",
                                    INFERENCE_NUM_THREADS=args.threads, **CPU_CONFIG)
        graph = Graph(folder / "openvino_model.xml", args.threads)
        rows.append({"recipe": name, "size": (folder / "openvino_model.bin").stat().st_size,
                     "compress_seconds": seconds,
                     **quality(lambda p, n: pipeline_greedy(pipe, p, n), graph.log_probs, reference, args.tokens)})
        speeds[name] = lambda: openvino_native(folder, speed_prompt, args.decode_tokens, args.threads)
        print(line(rows[-1]), file=sys.stderr, flush=True)

    openvino_row("fp32 (reference)", fp32, None)
    llama = Llama(gguf, args.threads)
    rows.append({"recipe": "llama.cpp Q4_1 GGUF (embedding Q8_0)", "size": gguf.stat().st_size,
                 "compress_seconds": None, **quality(llama.greedy, llama.log_probs, reference, args.tokens)})
    llama.llm.close()
    speeds[rows[-1]["recipe"]] = lambda: llama_native(gguf, speed_prompt, args.decode_tokens, args.threads)
    print(line(rows[-1]), file=sys.stderr, flush=True)

    config = json.loads((fp32 / "config.json").read_text())
    for name, compress in recipes(openvino_export._group_size(config), fp32).items():
        if args.only and not any(word in name for word in args.only):
            continue
        folder = args.work / re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(fp32, folder, ignore=shutil.ignore_patterns("openvino_model.*"))
        model = ov.Core().read_model(fp32 / "openvino_model.xml")
        start = time.perf_counter()
        model = compress(model)
        seconds = time.perf_counter() - start
        ov.save_model(model, folder / "openvino_model.xml", compress_to_fp16=False)
        del model
        openvino_row(name, folder, seconds)

    # Speed last, each run when the machine is quiet (and redone when other processes took a share of it).
    quiet = Quiet(threshold=args.max_contention, retries=2, max_wait=120)
    for row in [] if args.no_speed else rows:
        runs = [quiet.run(row["recipe"], speeds[row["recipe"]]) for _ in range(args.repetitions)]
        row["decode"] = statistics.median(run.result[1] for run in runs)
        row["others_cpu_share"] = max(run.others for run in runs)
        print(f"{row['recipe']}: {row['decode']:.1f} tok/s (others took up to {row['others_cpu_share']:.0%})",
              file=sys.stderr, flush=True)

    report = {"benchmark": "openvino_int4", "date": now(), "git": git_revision(),
              "machine": machine() | {"versions": package_versions(VERSIONS)},
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
              | {"store": str(store_dir()), "prompts": len(ids)},
              "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1)}
    write_results(args.output, "openvino_int4", report, render(report) + "\n", indent=1)
    print(render(report))
    return 0


def line(row: dict[str, Any]) -> str:
    return (f"{row['recipe']}: {row['size'] / 1e6:.1f} MB, agreement {row['agreement']}, "
            f"NLL text {row['nll_text']:.3f}, continuation {row['nll_continuation']:.3f}, KL {row['kl_text']:.4f}, "
            f"compressed in {row['compress_seconds'] or 0:.1f} s")


HEADER = ("recipe", "model MB", "agreement (mean / min / all 32)", "NLL text", "NLL fp32 greedy", "KL text",
          "decode tok/s (others' CPU share)", "compress s")


def render(report: dict[str, Any]) -> str:
    """openvino_int4.md: the template filled from the report."""
    rows = [(r["recipe"], f"{r['size'] / 1e6:.1f}",
             f"{r['agreement_mean']:.1f} / {min(r['agreement'])} / {r['full']}",
             f"{r['nll_text']:.3f}", f"{r['nll_continuation']:.3f}", f"{r['kl_text']:.4f}",
             f"{r['decode']:.1f} ({r['others_cpu_share']:.0%})" if "decode" in r else "-",
             "-" if r["compress_seconds"] is None else f"{r['compress_seconds']:.1f}") for r in report["rows"]]
    return fill(templates("openvino_int4")["report"], **report, table=markdown_table(HEADER, rows, "lrrrrrrr"))


if __name__ == "__main__":
    sys.exit(main())
