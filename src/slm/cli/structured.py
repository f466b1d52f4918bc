"""The options of `slm run` that shape the answer: a JSON schema, a regex, choices, a grammar, tools.

    slm run --json-schema person.json "Describe Ada Lovelace"
    slm run --choice yes --choice no "Is the sky blue?"
    slm run --tool tools.py "What is the weather in Paris?"      # prints the call as JSON

Each is read and checked before the model loads, so a bad schema or tools file costs one line and no wait.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from slm.cli.options import with_options
from slm.errors import InvalidParameter
from slm.generation.constraints import Grammar, requested_grammar
from slm.generation.tool_use import ToolUse

options = [
    click.option("--json-schema", "json_schema", metavar="FILE|JSON",
                 help="Answer with JSON that matches this schema (a file, or the schema itself)."),
    click.option("--regex", metavar="PATTERN", help="Answer with text that matches this regular expression."),
    click.option("--choice", "choices", multiple=True, metavar="TEXT", help="Answer with one of these (repeat it)."),
    click.option("--grammar", metavar="FILE", help="Answer in this grammar: a Lark (.lark) or GBNF (.gbnf) file."),
    click.option("--tool", "tools", multiple=True, metavar="FILE",
                 help="Offer the tools in FILE: the public functions of a .py file, or a JSON list of function "
                      "specs. The model's calls are printed as JSON."),
    click.option("--tool-choice", metavar="auto|required|none|NAME",
                 help="Whether the model must call a tool (required), may (auto, the default), or must call NAME."),
]


def structured_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return with_options(options)(f)


def read_grammar(json_schema: str | None, regex: str | None, choices: tuple[str, ...],
                 grammar: str | None) -> Grammar | None:
    """The grammar the flags ask for (at most one of them)."""
    given = {"--json-schema": json_schema, "--regex": regex, "--choice": choices or None, "--grammar": grammar}
    named = [flag for flag, value in given.items() if value is not None]
    if len(named) > 1:
        raise InvalidParameter(named[1], f"cannot be combined with {named[0]}: give one constraint")
    try:
        if json_schema is not None:
            return requested_grammar(response_format=_schema(json_schema))[0]
        if grammar is not None:
            return Grammar.of_text(_file_text(grammar, "--grammar"), "--grammar")
        return requested_grammar(regex=regex, choices=list(choices) if choices else None)[0]
    except InvalidParameter as e:
        flag = {"response_format": "--json-schema", "regex": "--regex", "choices": "--choice"}.get(e.field, e.field)
        raise InvalidParameter(flag, e.reason) from None


def _schema(source: str) -> dict[str, Any]:
    text = source if source.lstrip().startswith("{") else _file_text(source, "--json-schema")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidParameter("--json-schema", f"is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(schema, dict):
        raise InvalidParameter("--json-schema", "must be a JSON object (a schema)")
    return schema


def _file_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidParameter(flag, f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameter(flag, f"cannot read {path}: {e}") from None


def read_tools(files: tuple[str, ...], choice: str | None) -> ToolUse | None:
    """The tools of every ``--tool`` file, and ``--tool-choice``."""
    if not files:
        if choice is not None:
            raise InvalidParameter("--tool-choice", "needs tools: give --tool FILE")
        return None
    tools: list[object] = []
    for path in files:
        tools.extend(_tools_in(path))
    try:
        return ToolUse.of(tools, choice)
    except InvalidParameter as e:
        flag = "--tool-choice" if e.field == "tool_choice" else f"--tool ({e.field})"
        raise InvalidParameter(flag, e.reason) from None


def _tools_in(path: str) -> list[object]:
    if path.endswith(".py"):
        _file_text(path, "--tool")  # a missing or unreadable file is one line
        try:
            namespace = runpy.run_path(path)
        except Exception as e:  # the user's file failed to run: say where, without its traceback
            raise InvalidParameter("--tool", f"{path} failed to run: {type(e).__name__}: {e}") from None
        functions = [v for k, v in namespace.items() if callable(v) and not k.startswith("_")
                     and getattr(v, "__module__", None) == "<run_path>"]
        if not functions:
            raise InvalidParameter("--tool", f"{path} defines no public function")
        return list(functions)
    try:
        specs = json.loads(_file_text(path, "--tool"))
    except json.JSONDecodeError as e:
        raise InvalidParameter("--tool", f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    return specs if isinstance(specs, list) else [specs]
