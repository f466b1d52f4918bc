"""``slm perplexity``: how well a model predicts a text, the measure of what quantizing or fine-tuning cost."""

from __future__ import annotations

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
    from slm.generation.perplexity import check
    from slm.model.local import Model

    text = read_text(file, "FILE")
    options: dict[str, Any] = {"n_ctx": max(n_ctx, 8), "max_sequences": 1}
    if threads:
        options["threads"] = threads
    loaded = slm.load(model, **({"engine": engine} if engine else {}), **options)
    with loaded:
        if not isinstance(loaded, Model):
            raise InvalidParameter("MODEL", f"{model} is a remote model; perplexity needs the model's logits")
        tokens = loaded.engine.tokenize(text, add_special=True, parse_special=False)
        total = check(len(tokens), n_ctx, loaded.info.context_length, windows)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, transient=True) as bar:
            task = bar.add_task(f"{model}: windows of {n_ctx}", total=total)

            def advance(done: int, _total: int, running: float) -> None:
                bar.update(task, completed=done, description=f"{model}: perplexity {running:.3f}")

            result = loaded.perplexity(text, n_ctx, windows, advance)
    if as_json:
        print_json({"model": model, "engine": loaded.engine.name, "file": str(file), **vars(result)})
        return
    print(f"{model} ({loaded.engine.name}) on {file}: perplexity {result.value:.4f} +/- {result.error:.5f}")
    print(f"{result.scored} tokens scored in {result.windows} windows of {result.n_ctx} "
          f"({result.tokens} in the text); mean NLL {result.nll:.4f} nats/token")
