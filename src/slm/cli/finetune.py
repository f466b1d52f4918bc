"""``slm finetune``: a LoRA adapter of a Hugging Face model trained on a JSONL file, into the store."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slm.cli.output import stderr, stdout


@click.command("finetune")
@click.argument("model")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, help="The adapter's name in the store (or a folder path).")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=int, default=16, show_default=True, help="LoRA alpha (the update is scaled "
              "by alpha/rank).")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="Dropout on the LoRA input.")
@click.option("--target-modules", default=None, metavar="NAMES",
              help="Comma-separated module names to adapt. [default: every Linear layer in the decoder blocks, "
                   "read from the model]")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine",
              show_default=True, help="Learning-rate decay after the warmup.")
@click.option("--warmup", type=int, default=None, help="Warmup steps. [default: 5% of the steps]")
@click.option("--epochs", type=float, default=None, help="Passes over the data. [default: 1]")
@click.option("--steps", type=int, default=None, help="Optimizer steps (instead of --epochs).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Rows per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per row; longer rows are cut.")
@click.option("--no-truncate", is_flag=True, help="Refuse a row longer than --max-length instead of cutting it.")
@click.option("--val-split", type=float, default=0.1, show_default=True, help="Fraction of rows held out for "
              "the validation loss.")
@click.option("--eval-every", type=int, default=50, show_default=True, help="Validation loss every N steps.")
@click.option("--save-every", type=int, default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the adapter's initial weights, the "
              "split and the data order.")
@click.option("--resume", is_flag=True, help="Continue the unfinished run of --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing adapter, or start an unfinished run over.")
@click.option("--threads", type=int, default=None, help="CPU threads. [default: all cores]")
def finetune(model: str, data: Path, out: str, rank: int, alpha: int, dropout: float, target_modules: str | None,
             lr: float, schedule: str, warmup: int | None, epochs: float | None, steps: int | None,
             batch_size: int, grad_accum: int, max_length: int, no_truncate: bool, val_split: float,
             eval_every: int, save_every: int, seed: int, resume: bool, force: bool, threads: int | None) -> None:
    """Train a LoRA adapter of MODEL (a Hugging Face folder: `slm convert MODEL --to hf` writes one) on the
    JSONL file DATA: chat rows ({"messages": [...]}, loss on the assistant turns), completions ({"prompt",
    "completion"}) or text ({"text"}). Ctrl-C saves a checkpoint; --resume continues from it."""
    from slm.tools.finetune import Settings, StepReport
    from slm.tools.finetune import finetune as train

    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip()) if target_modules is not None \
        else None
    settings = Settings(rank=rank, alpha=alpha, dropout=dropout, target_modules=modules, lr=lr, schedule=schedule,
                        warmup=warmup, epochs=epochs, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                        max_length=max_length, truncate=not no_truncate, val_split=val_split,
                        eval_every=eval_every, save_every=save_every, seed=seed, threads=threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=stderr, transient=True) as bar:
        task = bar.add_task(f"loading {model}", total=None, stats="")

        def start(plan: dict[str, Any]) -> None:
            note = f", {plan['truncated']} cut to --max-length" if plan["truncated"] else ""
            bar.console.print(f"{plan['format']} data: {plan['examples']} rows to train on, {plan['val_examples']} "
                              f"held out{note}; LoRA on {', '.join(plan['target_modules'])} "
                              f"({plan['trainable_parameters']:,} parameters) on {plan['device']}", soft_wrap=True)
            if plan["step"]:
                bar.console.print(f"resuming at step {plan['step']}")
            bar.update(task, description=f"training {out}", total=plan["total_steps"], completed=plan["step"])

        def step(report: StepReport) -> None:
            if report.val_loss is not None:
                bar.console.print(f"step {report.step}: validation loss {report.val_loss:.4f}")
            if not math.isnan(report.loss):
                bar.update(task, completed=report.step,
                           stats=f"loss {report.loss:.4f}  {report.tokens_per_second:,.0f} tok/s")

        summary = train(model, data, out, settings, force=force, resume=resume, on_step=step, on_start=start)
    val = f", validation loss {summary.first_val_loss:.4f} -> {summary.val_loss:.4f}" \
        if summary.val_loss is not None and summary.first_val_loss is not None else ""
    stderr.print(f"[green]done[/]: {summary.steps} steps, training loss {summary.train_loss:.4f}{val}; "
                 f"{summary.tokens_per_second:,.0f} tokens/s", soft_wrap=True)
    stdout.print(f"adapter of {summary.base}: {summary.output}", soft_wrap=True)
