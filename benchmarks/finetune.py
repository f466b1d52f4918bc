"""Fine-tuning benchmark: training tokens/s and peak memory of `slm finetune`'s loop against a plain
transformers + peft ``Trainer`` script, on SmolLM2-135M (the Hugging Face folder `slm convert --to hf` writes).

Both sides train the same LoRA (rank 8, alpha 16, dropout 0.05, every Linear layer of the decoder blocks) for
the same steps and batch size, at the same learning rate and schedule, on the same rows: chat rows tokenized by
slm's own reader (so both see identical ids and labels, the loss on the assistant turns only), with the same
threads. Each run is its own process (peak RSS is the process's own ``ru_maxrss``); the two sides alternate and
each figure is the median of ``--repetitions``, each ratio the median of the paired ratios.

Tokens/s counts the tokens trained on (padding excluded) over the wall time of the training loop (model loading
excluded). What slm does differently: it sorts rows by length within buckets of batches (less padding) and
projects onto the vocabulary only at positions that take a loss; the Trainer pads each random batch to its
longest row and computes the logits of every position.

    .venv/bin/python benchmarks/finetune.py      # writes benchmarks/results/finetune.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RESULTS, machine, markdown_table, package_versions, report_head, write_results

VERSIONS = ("torch", "transformers", "peft", "accelerate")
WORDS = ["river", "stone", "lamp", "orbit", "garden", "signal", "copper", "meadow", "lantern", "harbor", "quiet",
         "ember", "valley", "thread", "mirror", "winter", "canvas", "beacon", "marble", "tide"]


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    """Chat rows of varied length (a question, an answer of 5 to 80 words), as people's data is."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            question = f"Describe item {i} using the words " + ", ".join(rng.sample(WORDS, 3)) + "."
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))).capitalize() + "."
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


def run_slm(model: str, data: str, steps: int, batch: int, threads: int) -> dict[str, Any]:
    from slm.tools.finetune import Settings, finetune

    with tempfile.TemporaryDirectory() as out:
        summary = finetune(model, data, str(Path(out) / "adapter"),
                           Settings(steps=steps, batch_size=batch, val_split=0.0, threads=threads, seed=0))
    return {"tokens": summary.tokens, "seconds": summary.seconds, "final_loss": summary.train_loss}


def run_trainer(model: str, data: str, steps: int, batch: int, threads: int) -> dict[str, Any]:
    """The plain script: peft's get_peft_model and transformers' Trainer with a padding collator."""
    import peft
    import torch
    import transformers

    from slm.tools import finetune_data

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
            for e in finetune_data.read(Path(data), tokenizer, 512).examples]
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    lm = peft.get_peft_model(lm, config)
    pad = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counted = {"tokens": 0}

    def collate(features: list[dict[str, Any]]) -> Any:
        batch_ = pad(features)
        counted["tokens"] += int(batch_["attention_mask"].sum())
        return batch_

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
            lr_scheduler_type="cosine", warmup_steps=steps // 20, weight_decay=0.0, max_grad_norm=1.0,
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=lm, args=args, train_dataset=rows, data_collator=collate)
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    return {"tokens": counted["tokens"], "seconds": round(seconds, 2), "final_loss": result.training_loss}


def child(side: str, model: str, data: str, steps: int, batch: int, threads: int) -> None:
    result = (run_slm if side == "slm" else run_trainer)(model, data, steps, batch, threads)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["tokens_per_second"] = round(result["tokens"] / result["seconds"], 1)
    print(json.dumps(result))


def measure(side: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", side, "--model", args.model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--data", str(data)]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_average_before": round(load, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SmolLM2's Hugging Face folder")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=("slm", "trainer"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.data, args.steps, args.batch_size, args.threads)
        return
    started = time.perf_counter()
    head_machine = machine()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "rows.jsonl"
        make_data(data, args.rows)
        runs: dict[str, list[dict[str, Any]]] = {"slm": [], "trainer": []}
        for repetition in range(args.repetitions):
            for side in (("slm", "trainer") if repetition % 2 == 0 else ("trainer", "slm")):
                runs[side].append(measure(side, args, data))
                print(side, runs[side][-1], flush=True)
    medians = {side: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_second", "peak_rss_mib")}
               for side, rs in runs.items()}
    ratio = statistics.median(s["tokens_per_second"] / t["tokens_per_second"]
                              for s, t in zip(runs["slm"], runs["trainer"], strict=True))
    report = {**report_head("finetune", started), "machine": head_machine, "versions": package_versions(VERSIONS),
              "settings": {"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                           "rows": args.rows, "rank": 8, "alpha": 16, "lr": 2e-4, "schedule": "cosine"},
              "runs": runs, "medians": medians, "tokens_per_second_ratio": round(ratio, 3)}
    table = markdown_table(["side", "training tokens/s (median)", "peak RSS MiB (median)"],
                           [[side, f"{m['tokens_per_second']:.1f}", f"{m['peak_rss_mib']:.0f}"]
                            for side, m in medians.items()], "lrr")
    loads = ", ".join(f"{r['load_average_before']:.1f}" for rs in runs.values() for r in rs)
    markdown = (f"# Fine-tuning: slm's LoRA loop against transformers' Trainer + peft\n\n"
                f"SmolLM2-135M (float32), LoRA rank 8 on all decoder Linear layers, {args.steps} steps of batch "
                f"{args.batch_size}, {args.threads} thread(s), {args.rows} chat rows of varied length; "
                f"{args.repetitions} interleaved runs per side, medians. slm / Trainer tokens/s: **{ratio:.2f}x**."
                f"\n\n{table}\n\nThe machine was shared with other work (load averages before each run: {loads}); "
                "the figures are noisy in proportion. See finetune.json for every run, the machine and versions.\n")
    write_results(args.output, "finetune", report, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
