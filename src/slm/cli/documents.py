"""Commands over whole documents: summarize, translate. A text that fits one prompt streams its answer
as `slm run` does; a longer one goes through ``slm.tasks`` part by part, with a progress bar on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slm.cli.options import generation_params, sampling_options, with_options
from slm.cli.output import completion_json, print_stats, stderr
from slm.cli.run import _answer, _load, output_options
from slm.errors import InvalidParameter, WriteFailed
from slm.generation import Completion
from slm.model import Prompt
from slm.tasks import summary, translation

if TYPE_CHECKING:
    from slm.cli.run import Loaded

document_options = [
    click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Write the result to this file instead of stdout."),
    click.option("--force", is_flag=True, help="Replace the --out file if it exists."),
]


def read_text(source: str) -> str:
    """A file's text (stdin's for -); a missing, unreadable, binary or empty one is a user mistake."""
    name = "stdin" if source == "-" else "FILE"
    try:
        if source == "-":
            data = sys.stdin.buffer.read() if sys.stdin is not None else b""
        else:
            data = Path(source).read_bytes()
    except FileNotFoundError:
        raise InvalidParameter(name, f"no such file: {source}") from None
    except OSError as e:
        raise InvalidParameter(name, f"cannot read {source}: {e.strerror or e}") from None
    where = "stdin" if source == "-" else source
    if b"\x00" in data:
        raise InvalidParameter(name, f"{where} is binary, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidParameter(name, f"cannot read {where} as UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise InvalidParameter(name, "is empty" if source == "-" else f"{source} is empty")
    return text


def check_out(out: Path | None, force: bool) -> None:
    if out is not None and out.exists() and not force:
        raise InvalidParameter("--out", f"{out} exists; add --force to replace it")


def write_out(out: Path, text: str) -> None:
    """``text`` into ``out`` through a temporary file beside it, so no half-written result is left."""
    part = out.with_name(f".{out.name}.part")
    try:
        part.write_text(text, encoding="utf-8")
        os.replace(part, out)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise WriteFailed(f"could not write {out}: {e.strerror or e}") from None


def in_parts(what: str, work: Callable[[Callable[[int, int], None]], Completion]) -> Completion:
    """Run a task over a long document with a progress bar of its requests on stderr."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=True) as bar:
        task = bar.add_task(what, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


def deliver(model: Loaded, completion: Completion, out: Path | None, as_json: bool, verbose: bool) -> None:
    """The result on stdout, or in --out (the JSON object with --json)."""
    text = json.dumps(completion_json(model.name, completion), ensure_ascii=False, indent=2) + "\n" if as_json \
        else completion.text.strip() + "\n"
    if out is not None:
        write_out(out, text)
    else:
        sys.stdout.write(text)
    if verbose:
        print_stats(completion)


@click.command()
@click.argument("source", metavar="FILE|-")
@click.option("-m", "--model", help="Model alias or .gguf path. [default: smollm2]")
@click.option("--words", type=click.IntRange(min=1), default=None, help="Aim for about this many words.")
@sampling_options
@with_options(output_options + document_options)
def summarize(source: str, model: str | None, words: int | None, as_json: bool, verbose: bool, out: Path | None,
              force: bool, **options: Any) -> None:
    """Summarize a text file (or stdin with -). A text longer than the context is summarized in parts,
    then the parts' summaries together; --max-tokens bounds each answer."""
    check_out(out, force)
    text = read_text(source)
    params = generation_params(options)
    with _load(model, options) as loaded:
        if out is None and summary.fits(loaded, text, words, params):
            _answer(loaded, Prompt.chat(summary.request(text, words)), params, as_json, verbose)
            return
        completion = in_parts("summarizing", lambda progress: summary.summarize(
            loaded, text, words, progress, params))
        deliver(loaded, completion, out, as_json, verbose)


@click.command()
@click.argument("text", required=False)
@click.option("--to", "target", required=True, help="Language to translate into, e.g. French.")
@click.option("--from", "source_language", help="Language of the text (otherwise the model guesses).")
@click.option("-f", "--file", "source", metavar="FILE|-", help="Translate this file (or stdin with -).")
@click.option("-m", "--model", help="Model alias or .gguf path. [default: smollm2]")
@sampling_options
@with_options(output_options + document_options)
def translate(text: str | None, target: str, source_language: str | None, source: str | None, model: str | None,
              as_json: bool, verbose: bool, out: Path | None, force: bool, **options: Any) -> None:
    """Translate TEXT (or a --file, or stdin) into the language given by --to. A text longer than the context
    is translated a few paragraphs at a time, keeping its paragraphs and headings; --max-tokens bounds each
    answer."""
    if text is not None and source is not None:
        raise InvalidParameter("TEXT", "give the text or --file, not both")
    if text is None and source is None and sys.stdin.isatty():
        raise InvalidParameter("TEXT", "is missing; pass it as an argument, with --file or on stdin")
    if not target.strip():
        raise InvalidParameter("--to", "is empty")
    check_out(out, force)
    if text is None or text == "-":
        text = read_text(source or "-")
    elif not text.strip():
        raise InvalidParameter("TEXT", "is empty")
    params = generation_params(options)
    with _load(model, options) as loaded:
        if out is None and translation.fits(loaded, text, target, source_language, params):
            _answer(loaded, Prompt.chat(translation.request(text, target, source_language)), params, as_json,
                    verbose)
            return
        completion = in_parts(f"translating into {target}", lambda progress: translation.translate(
            loaded, text, target, source_language, progress, params))
        deliver(loaded, completion, out, as_json, verbose)
