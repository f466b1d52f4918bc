"""Commands that generate: run, chat."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from slm.api import Model, load_language
from slm.cli.options import (
    BEAM_OPTIONS,
    as_flag,
    engine_options,
    generation_params,
    sampling_options,
    with_options,
)
from slm.cli.output import completion_json, print_json, print_stats, stderr
from slm.cli.structured import read_grammar, read_tools, structured_options
from slm.engines import media
from slm.engines.base import DEFAULT_SEQUENCES
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
                "flash_attention": "--flash-attn", "draft": "--draft", "adapters": "--adapter", "adapter": "--adapter"}


def _load(name: str | None, options: dict[str, Any]) -> Loaded:
    try:
        return load_language(name, **engine_options(options))
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
    if params.num_beams > 1:
        return _beam_answer(model, prompt, params, as_json, verbose)
    return _emit(model, ask(model, prompt, params), as_json, verbose)


def _beam_answer(model: Loaded, prompt: Prompt, params: GenerationParams, as_json: bool,
                 verbose: bool) -> Completion:
    """Beam search has no answer before it ends: the best beam is printed whole (each returned beam with
    its score when --num-return-sequences asks for several; --json lists them all)."""
    if prompt.messages is not None:
        completion = model.chat(prompt.messages, params)
    else:
        completion = model.generate(prompt.text or "", params)  # the CLI's raw prompts are text
    beams = getattr(completion, "beams", [])
    if as_json:
        print_json(completion_json(model.name, completion))
    elif len(beams) > 1:
        for rank, beam in enumerate(beams, 1):
            sys.stdout.write(f"#{rank} ({beam.score:.4f}) {beam.text}\n")
    else:
        sys.stdout.write(completion.text + "\n")
    if verbose:
        print_stats(completion)
    return completion


def _check_n(answers: int | None) -> int:
    if answers is not None and answers < 1:
        raise InvalidParameter("-n", f"must be at least 1, got {answers}")
    return answers or 1


def _named(make: Callable[[], GenerationParams], flag: str) -> GenerationParams:
    """``make()``, its error naming ``flag``."""
    try:
        return make()
    except InvalidParameter as e:
        raise InvalidParameter(flag, e.reason) from None


def _several_answers(model: Loaded, prompt: Prompt, params: GenerationParams, n: int, as_json: bool,
                     verbose: bool) -> Completion:
    """-n N: the answers come together when the last ends, each printed under its number (--json: a list)."""
    if not isinstance(model, Model):
        raise InvalidParameter("-n", f"{model.name} is not local: a remote model or route gives one answer a call")
    if prompt.messages is not None:
        use = prompt.tools
        tools = {} if use is None else {"tools": use.tools, "tool_choice": use.choice,
                                        "parallel_tool_calls": use.parallel}
        completion = model.chat(prompt.messages, params, n=n, **tools)
    else:
        completion = model.generate(prompt.text or "", params, n=n)  # the CLI's raw prompts are text
    if as_json:
        print_json(completion_json(model.name, completion))
    else:
        for number, choice in enumerate(getattr(completion, "choices", [completion]), 1):
            sys.stdout.write(f"#{number} {choice.text}\n")
            for call in choice.tool_calls:
                sys.stdout.write(json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
                                 + "\n")
    if verbose:
        print_stats(completion)
    return completion


def _read_image(typed: str, flag: str) -> tuple[bytes, media.Image]:
    """The file named after ``flag``, read and checked to be an image slm decodes (before a model loads,
    so a bad one is one line at once)."""
    where = f"{flag} {typed}"
    path = Path(typed).expanduser()
    if not path.exists():
        raise InvalidParameter(where, "no such file")
    if not path.is_file():
        raise InvalidParameter(where, "is not a file")
    try:
        if path.stat().st_size > media.MAX_BYTES:
            raise InvalidParameter(where, f"is larger than the limit of {media.MAX_BYTES} bytes")
        data = path.read_bytes()
    except OSError as e:
        raise InvalidParameter(where, f"cannot read it: {e.strerror or e}") from None
    return data, media.decode(data, where)


def _check_takes_images(model: Loaded, where: str) -> None:
    if not hasattr(model, "takes_images"):  # a remote model or a route: a local path means nothing there
        raise InvalidParameter(where, f"{model.name} is not local: images go to local vision models only")
    if not model.takes_images:
        raise InvalidParameter(where, f"{model.name} does not take images (a text-only model)")


def _attach(model: Loaded, line: str) -> dict[str, Any]:
    """``/image PATH`` in a chat: the image read and checked now, as the content part of the next message."""
    typed = line.removeprefix("/image").strip().strip("'\"")
    if not typed:
        raise InvalidParameter("/image", "give the path of an image: /image photo.jpg")
    _check_takes_images(model, f"/image {typed}")
    data, image = _read_image(typed, "/image")
    stderr.print(f"[dim]image attached: {escape(typed)} ({image.width}x{image.height})[/]")
    return {"type": "image", "image": data}


def _with_images(prompt: Prompt, images: Sequence[tuple[str, bytes]]) -> tuple[Prompt, dict[str, str]]:
    """The prompt's user turn with the images (as typed, their bytes) before its text, as content parts
    (Ollama's order); and, by each part's place in the messages (how the API names it in an error), the
    --image the user typed."""
    assert prompt.messages is not None, "images are refused with --raw and base models before this"
    *head, turn = prompt.messages
    parts: list[dict[str, Any]] = [{"type": "image", "image": data} for _, data in images]
    if turn["content"]:
        parts.append({"type": "text", "text": turn["content"]})
    flags = {f"messages[{len(head)}].content[{k}]": f"--image {typed}" for k, (typed, _) in enumerate(images)}
    return Prompt.chat([*head, {**turn, "content": parts}], prompt.tools), flags


def _named_by_flag(error: InvalidParameter, flags: dict[str, str]) -> InvalidParameter:
    """An error about an image part, naming the --image the user typed instead of its place in the messages."""
    for place, flag in flags.items():
        if error.field == place or error.field.startswith(place + "."):
            return InvalidParameter(flag, error.reason)
    return error


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
@click.option("--image", "images", multiple=True, metavar="FILE",
              help="An image for a vision model (PNG, JPEG, WebP, GIF), before the prompt (repeatable).")
@click.option("--top-logprobs", type=int, default=None, help="With --json: the N most likely tokens at each step.")
@click.option("-n", "answers", type=int, default=None,
              help="Sample N answers from one reading of the prompt, each printed under its number "
                   "(with --beams: the N best beams). [default: 1]")
@sampling_options
@with_options(BEAM_OPTIONS)
@structured_options
@with_options(output_options)
def run(args: tuple[str, ...], model: str | None, raw: bool, system: str | None, images: tuple[str, ...],
        as_json: bool, verbose: bool, json_schema: str | None, regex: str | None, choices: tuple[str, ...],
        grammar: str | None, tools: tuple[str, ...], tool_choice: str | None, answers: int | None,
        **options: Any) -> None:
    """Answer PROMPT with MODEL (default: the embedded smollm2), streaming the text.

    Text piped on stdin is the prompt, or is appended to PROMPT:
    `cat notes.txt | slm run "Summarize:"`. --json-schema, --regex, --choice or --grammar hold the answer
    to a shape; --tool offers tools, and the model's calls are printed as JSON, one a line. --image gives
    a vision model pictures: `slm run ./gemma3.gguf --image photo.jpg "What is in this picture?"`.
    --beams N searches N beams (transformers' beam search) and prints the best when it ends. -n N samples
    N answers at once: `slm run -n 3 --temperature 1 "Name a colour."`
    """
    constraint = read_grammar(json_schema, regex, choices, grammar)
    offered = read_tools(tools, tool_choice)
    if offered is not None and raw:
        raise InvalidParameter("--tool", "tools are offered in a chat, not with --raw")
    if images and raw:
        raise InvalidParameter("--image", "images go into a chat turn, not with --raw")
    pictures = [(typed, _read_image(typed, "--image")[0]) for typed in images]
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
    if not prompt.strip() and not images:
        raise InvalidParameter("prompt", "is empty; pass it as an argument or on stdin")
    top = options.pop("top_logprobs")
    params = generation_params(options, **({"logprobs": True, "top_logprobs": top} if top is not None else {}))
    if constraint is not None:
        params = params.replace(grammar=constraint)
    n = _check_n(answers)
    if n > 1 and params.num_beams > 1:
        params, n = _named(lambda: params.replace(num_return_sequences=n), "-n"), 1  # the n best beams
    if max(params.num_beams, n) > DEFAULT_SEQUENCES:
        options["max_sequences"] = max(params.num_beams, n)  # every beam or answer is a sequence of the engine
    with _load(model, options) as loaded:
        if images:
            _check_takes_images(loaded, f"--image {images[0]}")
            if not loaded.instruct:
                raise InvalidParameter("--image", f"{loaded.name} is a base model: images go into a chat turn")
        if not raw and not loaded.instruct:
            stderr.print(f"[dim]{loaded.name} is a base model, not tuned to chat: completing the prompt as text[/]")
        asked = Prompt.instruction(prompt, system, raw=raw, instruct=loaded.instruct)
        if offered is not None:
            if asked.messages is None:
                raise InvalidParameter("--tool", f"{loaded.name} is a base model: tools are offered to chat models")
            asked = Prompt.chat(asked.messages, offered)
        flags: dict[str, str] = {}
        if pictures:
            asked, flags = _with_images(asked, pictures)
        try:
            if n > 1:
                _several_answers(loaded, asked, params, n, as_json, verbose)
            else:
                _answer(loaded, asked, params, as_json, verbose)
        except InvalidParameter as e:
            raise _named_by_flag(e, flags) from None


@click.command()
@click.argument("model", required=False)
@click.option("--system", help="A system message for the whole conversation.")
@sampling_options
@click.option("-v", "--verbose", is_flag=True, help="Print token counts and speeds after each answer.")
def chat(model: str | None, system: str | None, verbose: bool, **options: Any) -> None:
    """Talk with MODEL turn by turn. /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops an answer;
    /image PATH attaches an image to the next message (a vision model)."""
    params = generation_params(options)
    interactive = sys.stdin.isatty()
    start: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    attached: list[dict[str, Any]] = []  # /image parts waiting for the next message
    with _load(model, options) as loaded:
        if interactive:
            context = loaded.info.context_length
            where = f"{context} tokens of context" if context else "remote"
            commands = " · /image PATH" if getattr(loaded, "takes_images", False) else ""
            stderr.print(f"[dim]{loaded.name} · {where}{commands} · /reset · /exit[/]")
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
                history, attached = list(start), []
                stderr.print("[dim]conversation cleared[/]")
                continue
            if text == "/image" or text.startswith("/image "):
                try:
                    attached.append(_attach(loaded, text))
                except InvalidParameter as e:
                    stderr.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
                continue
            content = [*attached, {"type": "text", "text": text}] if attached else text
            attached = []
            history.append({"role": "user", "content": content})
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
