"""``slm quantize`` compresses a model; ``slm perplexity`` measures how well a model predicts a text, and so
what compressing (or fine-tuning) it cost."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slm.cli.options import ENGINE_CHOICES
from slm.cli.output import print_json
from slm.errors import InvalidParameter

stderr = Console(stderr=True)


def read_text(path: Path, flag: str) -> str:
    """The UTF-8 text of ``path``; InvalidParameter naming ``flag`` when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameter(flag, f"cannot read {path}: {e}") from None


@click.command("perplexity")
@click.argument("model")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=512, show_default=True,
              help="Tokens per window (llama-perplexity's -c); the second half of each is scored.")
@click.option("--windows", type=int, default=None, help="Score only the first N windows. [default: all]")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default=None, help="The engine. [default: auto]")
@click.option("--threads", type=int, default=None, help="CPU threads. [default: all cores]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def perplexity(model: str, file: Path, n_ctx: int, windows: int | None, engine: str | None, threads: int | None,
               as_json: bool) -> None:
    """The perplexity of MODEL over the text in FILE, computed as llama.cpp's llama-perplexity does (windows of
    --ctx-size tokens, the second half of each scored), on any engine. Lower is better; compare models on the
    same text and window only."""
    import slm
    from slm.model.local import Model

    text = read_text(file, "FILE")
    options: dict[str, Any] = {"n_ctx": max(n_ctx, 8), "max_sequences": 1}
    if threads:
        options["threads"] = threads
    loaded = slm.load(model, **({"engine": engine} if engine else {}), **options)
    with loaded:
        if not isinstance(loaded, Model):
            raise InvalidParameter("MODEL", f"{model} is a remote model; perplexity needs the model's logits")
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, transient=True) as bar:
            task = bar.add_task(f"{model}: windows of {n_ctx}", total=None)

            def advance(done: int, total: int, running: float) -> None:
                bar.update(task, completed=done, total=total, description=f"{model}: perplexity {running:.3f}")

            result = loaded.perplexity(text, n_ctx, windows, advance)
    if as_json:
        print_json({"model": model, "engine": loaded.engine.name, "file": str(file), **vars(result)})
        return
    print(f"{model} ({loaded.engine.name}) on {file}: perplexity {result.value:.4f} +/- {result.error:.5f}")
    print(f"{result.scored} tokens scored in {result.windows} windows of {result.n_ctx} "
          f"({result.tokens} in the text); mean NLL {result.nll:.4f} nats/token")


@click.command("quantize")
@click.argument("model")
@click.option("--type", "kind", required=True, metavar="TYPE",
              help="llama.cpp's quantization type: q4_k_m, q5_k_m, q6_k, q8_0, q4_0, q4_1, iq4_xs, f16, ...")
@click.option("--out", "out", default=None,
              help="A name in the model store, or a .gguf path. [default: MODEL with TYPE in place of its type]")
@click.option("--allow-requantize", is_flag=True, help="Quantize a file already below 8 bits (loses more).")
@click.option("--imatrix", "calibration", type=click.Path(path_type=Path), default=None, metavar="TEXT",
              help="Weigh the quantization by an importance matrix computed from this text file, as llama-imatrix "
                   "does (needed by the iq1/iq2/iq3_xxs types).")
@click.option("--imatrix-ctx", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--threads", type=int, default=None, help="CPU threads. [default: all cores]")
def quantize(model: str, kind: str, out: str | None, allow_requantize: bool, calibration: Path | None,
             imatrix_ctx: int, force: bool, threads: int | None) -> None:
    """Quantize the GGUF MODEL (float or q8_0: `slm convert MODEL --to gguf --precision fp16` writes one) to
    TYPE with llama.cpp's own quantizer; the result runs by name."""
    from slm.store import catalog
    from slm.tools import quantize as q

    resolved = catalog.resolve(model)
    kind = kind.lower()
    source = q.check(resolved, kind, allow_requantize, calibration is not None)
    text = read_text(calibration, "--imatrix") if calibration is not None else None
    target = q.output_for(out) if out else q.default_output(resolved, kind)
    if target.exists() and not force:
        raise InvalidParameter("--out", f"{target} already exists (--force replaces it)")
    if not target.parent.is_dir():
        raise InvalidParameter("--out", f"{target.parent} is not a folder")
    matrix = None
    if text is not None:
        from slm.tools.imatrix import importance

        with Progress(*Progress.get_default_columns(), console=stderr, transient=True) as bar:
            task = bar.add_task("importance matrix", total=None)
            matrix = importance(resolved.path, text, imatrix_ctx, threads,
                                lambda done, total: bar.update(task, completed=done, total=total))
    with stderr.status(f"quantizing {resolved.name} ({source}) to {kind}..."):
        q.quantize(resolved, kind, target, allow_requantize, threads, matrix)
    before, after = resolved.path.stat().st_size, target.stat().st_size
    stderr.print(f"[green]done[/]: {target} ({after / 2**20:.0f} MiB, {after / before:.0%} of the "
                 f"{before / 2**20:.0f} MiB {source} file)", soft_wrap=True)
    print(f"slm run {target.stem if target.parent == catalog.store_dir() else target} \"...\"")


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--text", "file", type=click.Path(path_type=Path), required=True,
              help="The text to score every model on (the same text and window make figures comparable).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--windows", type=int, default=None, help="Score only the first N windows. [default: all]")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default=None, help="The engine. [default: auto]")
@click.option("--threads", type=int, default=None, help="CPU threads. [default: all cores]")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def evaluate(models: tuple[str, ...], file: Path, n_ctx: int, windows: int | None, engine: str | None,
             threads: int | None, as_json: bool) -> None:
    """Size, bits per weight, perplexity over --text and decode tokens/s of each of MODELS, in one table: what
    quantizing (or fine-tuning) a model cost and what it saved."""
    from rich.table import Table

    from slm.tools.evaluate import evaluate as measure

    text = read_text(file, "--text")
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task("", total=len(models))
        for name in models:
            bar.update(task, description=name)

            def advance(done: int, total: int, running: float, name: str = name) -> None:
                bar.update(task, description=f"{name}: window {done}/{total}, perplexity {running:.3f}")

            rows.append(measure(name, text, n_ctx, windows, engine, threads, advance))
            bar.advance(task)
    if as_json:
        print_json({"text": str(file), "n_ctx": n_ctx, "rows": [row.as_dict() for row in rows]})
        return
    table = Table(title=f"{file.name}, windows of {n_ctx} ({rows[0].scored} tokens scored)")
    for column in ("model", "engine", "precision", "size", "bits/weight", "perplexity", "decode tok/s"):
        table.add_column(column, justify="left" if column in ("model", "engine", "precision") else "right")
    best = min(row.perplexity for row in rows)
    for row in rows:
        ppl = f"{row.perplexity:.3f} +/- {row.error:.3f}"
        table.add_row(row.model, row.engine, row.precision or "-", f"{row.size_bytes / 2**20:.0f} MiB",
                      f"{row.bits_per_weight:.2f}" if row.bits_per_weight else "-",
                      f"[green]{ppl}[/]" if row.perplexity == best else ppl, f"{row.decode_tps:.1f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
