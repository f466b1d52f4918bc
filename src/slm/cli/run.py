"""Commands that generate: run, chat, summarize, translate."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

import slm
from slm.api import Model
from slm.cli.options import as_flag, engine_options, generation_params, sampling_options, with_options
from slm.cli.output import completion_json, print_json, print_stats, stderr
from slm.cli.structured import read_grammar, read_tools, structured_options
from slm.errors import InvalidParameter, ModelNotFound, SlmError
from slm.generation import Chunk, Completion, GenerationParams
from slm.generation.stream import collect
from slm.model import Prompt, ask
from slm.store import catalog

if TYPE_CHECKING:
    from slm.remote import RemoteModel, Router

    Loaded = Model | RemoteModel | Router
    """A local model, a remote one or a route: the same chat_stream / stream."""


def _read_stdin() -> str:
    return "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()


def _is_model(name: str) -> bool:
    try:
        catalog.resolve(name)
    except ModelNotFound:
        return name.lower() in catalog.CATALOG  # a known alias that is not downloaded is still a model
    except SlmError:
        return True
    return True


ENGINE_FLAGS = {"n_ctx": "--ctx-size", "threads": "--threads", "kv_cells": "--kv-size", "engine": "--engine",
                "flash_attention": "--flash-attn"}


def _load(name: str | None, options: dict[str, Any]) -> Loaded:
    try:
        return slm.load(name, **engine_options(options))
    except InvalidParameter as e:
        if e.field not in ENGINE_FLAGS:
            raise
        raise as_flag(e, ENGINE_FLAGS[e.field]) from None


def _emit(model: Loaded, chunks: Iterator[Chunk], as_json: bool, verbose: bool) -> Completion:
    """Stream text to stdout (or collect it for --json); return the completion."""
    completion = collect(chunks, on_chunk=None if as_json else _print_text)
    if as_json:
        print_json(completion_json(model.name, completion))
    else:
        if completion.text and completion.tool_calls:
            sys.stdout.write("\n")
        for call in completion.tool_calls:  # one JSON object a line, for scripts to run them
            sys.stdout.write(json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False) + "\n")
        if not completion.tool_calls:
            sys.stdout.write("\n")
    if verbose:
        print_stats(completion)
    return completion


def _print_text(chunk: Chunk) -> None:
    if chunk.text:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()


def _answer(model: Loaded, prompt: Prompt, params: GenerationParams, as_json: bool, verbose: bool) -> Completion:
    return _emit(model, ask(model, prompt, params), as_json, verbose)


output_options = [
    click.option("--json", "as_json", is_flag=True,
                 help="Print one JSON object: text, finish reason, usage, timings."),
    click.option("-v", "--verbose", is_flag=True, help="Print token counts, time to first token and tokens/s."),
]


@click.command()
@click.argument("args", nargs=-1, metavar="[MODEL] [PROMPT]")
@click.option("-m", "--model", help="Model alias or .gguf path (instead of the MODEL argument).")
@click.option("--raw", is_flag=True, help="Plain completion of the prompt, without the chat template.")
@click.option("--system", help="A system message to put before the prompt.")
@click.option("--top-logprobs", type=int, default=None, help="With --json: the N most likely tokens at each step.")
@sampling_options
@structured_options
@with_options(output_options)
def run(args: tuple[str, ...], model: str | None, raw: bool, system: str | None, as_json: bool,
        verbose: bool, json_schema: str | None, regex: str | None, choices: tuple[str, ...], grammar: str | None,
        tools: tuple[str, ...], tool_choice: str | None, **options: Any) -> None:
    """Answer PROMPT with MODEL (default: the embedded smollm2), streaming the text.

    Text piped on stdin is the prompt, or is appended to PROMPT:
    `cat notes.txt | slm run "Summarize:"`. --json-schema, --regex, --choice or --grammar hold the answer
    to a shape; --tool offers tools, and the model's calls are printed as JSON, one a line.
    """
    constraint = read_grammar(json_schema, regex, choices, grammar)
    offered = read_tools(tools, tool_choice)
    if offered is not None and raw:
        raise InvalidParameter("--tool", "tools are offered in a chat, not with --raw")
    if len(args) > 2:
        raise click.UsageError("expected at most MODEL and PROMPT; quote a prompt with spaces")
    if len(args) == 2:
        model, prompt = model or args[0], args[1]
    elif len(args) == 1 and model is None and _is_model(args[0]):
        model, prompt = args[0], ""
    else:
        prompt = args[0] if args else ""
    piped = _read_stdin()
    prompt = "\n\n".join(p for p in (prompt, piped.strip()) if p)
    if not prompt.strip():
        raise InvalidParameter("prompt", "is empty; pass it as an argument or on stdin")
    top = options.pop("top_logprobs")
    params = generation_params(options, **({"logprobs": True, "top_logprobs": top} if top is not None else {}))
    if constraint is not None:
        params = params.replace(grammar=constraint)
    with _load(model, options) as loaded:
        if not raw and not loaded.instruct:
            stderr.print(f"[dim]{loaded.name} is a base model, not tuned to chat: completing the prompt as text[/]")
        asked = Prompt.instruction(prompt, system, raw=raw, instruct=loaded.instruct)
        if offered is not None:
            if asked.messages is None:
                raise InvalidParameter("--tool", f"{loaded.name} is a base model: tools are offered to chat models")
            asked = Prompt.chat(asked.messages, offered)
        _answer(loaded, asked, params, as_json, verbose)


@click.command()
@click.argument("model", required=False)
@click.option("--system", help="A system message for the whole conversation.")
@sampling_options
@click.option("-v", "--verbose", is_flag=True, help="Print token counts and speeds after each answer.")
def chat(model: str | None, system: str | None, verbose: bool, **options: Any) -> None:
    """Talk with MODEL turn by turn. /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops an answer."""
    params = generation_params(options)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    with _load(model, options) as loaded:
        if interactive:
            context = loaded.info.context_length
            where = f"{context} tokens of context" if context else "remote"
            stderr.print(f"[dim]{loaded.name} · {where} · /reset · /exit[/]")
        if not loaded.instruct:
            stderr.print(f"[yellow]{loaded.name} is a base model, not tuned to chat: its answers may not end[/]")
        if interactive:
            import readline  # noqa: F401  (line editing and history for input())
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line as in a shell
                sys.stdout.write("\n")
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                history = list(start)
                stderr.print("[dim]conversation cleared[/]")
                continue
            history.append({"role": "user", "content": text})
            try:
                completion = _answer(loaded, Prompt.chat(history), params, False, verbose)
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                history.pop()
                continue
            except InvalidParameter as e:
                history.pop()
                stderr.print(f"[bold red]error:[/] {e}" + (" (/reset to start over)" if "context" in str(e) else ""))
                continue
            history.append({"role": "assistant", "content": completion.text})


def _read_text(source: str) -> str:
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise InvalidParameter("FILE", f"no such file: {source}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameter("FILE", f"cannot read {source} as UTF-8 text: {e}") from None
    if not text.strip():
        raise InvalidParameter("FILE" if source != "-" else "stdin", "is empty")
    return text


@click.command()
@click.argument("source", metavar="FILE|-")
@click.option("-m", "--model", help="Model alias or .gguf path. [default: smollm2]")
@click.option("--words", type=click.IntRange(min=1), default=None, help="Aim for about this many words.")
@sampling_options
@with_options(output_options)
def summarize(source: str, model: str | None, words: int | None, as_json: bool, verbose: bool,
              **options: Any) -> None:
    """Summarize a text file (or stdin with -)."""
    text = _read_text(source)
    params = generation_params(options)
    length = f" in about {words} words" if words else " in a few sentences"
    messages = [{"role": "user", "content": f"Summarize the following text{length}.\n\n{text.strip()}"}]
    with _load(model, options) as loaded:
        _answer(loaded, Prompt.chat(messages), params, as_json, verbose)


@click.command()
@click.argument("text", required=False)
@click.option("--to", "target", required=True, help="Language to translate into, e.g. French.")
@click.option("--from", "source_language", help="Language of the text (otherwise the model guesses).")
@click.option("-m", "--model", help="Model alias or .gguf path. [default: smollm2]")
@sampling_options
@with_options(output_options)
def translate(text: str | None, target: str, source_language: str | None, model: str | None,
              as_json: bool, verbose: bool, **options: Any) -> None:
    """Translate TEXT (or stdin, or - for stdin) into the language given by --to."""
    if text is None and sys.stdin.isatty():
        raise InvalidParameter("TEXT", "is missing; pass it as an argument or on stdin")
    text = _read_text("-") if text in (None, "-") else text
    if not text.strip():
        raise InvalidParameter("TEXT", "is empty")
    if not target.strip():
        raise InvalidParameter("--to", "is empty")
    params = generation_params(options)
    origin = f" from {source_language}" if source_language else ""
    messages = [{
        "role": "user",
        "content": f"Translate the following text{origin} into {target}. Reply with the translation only.\n\n"
                   f"{text.strip()}",
    }]
    with _load(model, options) as loaded:
        _answer(loaded, Prompt.chat(messages), params, as_json, verbose)
