"""`slm run` with --json-schema, --regex, --choice, --grammar and --tool (cli/structured.py), as a real
subprocess on the embedded SmolLM2: answers in shape, tool calls printed as JSON, bad flags one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from test_cli import GREEDY, as_json, isolated, ok, one_line_error, slm_cmd

__all__ = ["isolated"]  # the module-scoped fixture that gives these runs an empty store

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
TOOLS = '''
import json as _json  # imported names are not tools


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city."""
    return "sunny"


def _helper() -> None:
    pass
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("structured")
    (where / "person.json").write_text(json.dumps(PERSON))
    (where / "tools.py").write_text(TOOLS)
    (where / "tools.json").write_text(json.dumps([{"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}}]))
    (where / "yesno.gbnf").write_text('root ::= ("yes" | "no")\n')
    (where / "broken.py").write_text("raise RuntimeError('no tools today')\n")
    return where


def test_json_schema_from_a_file_or_inline(files: Path) -> None:
    for schema in (str(files / "person.json"), json.dumps(PERSON)):
        result = ok(slm_cmd("run", "--json-schema", schema, *GREEDY, "Describe a person called Ada, aged 36."))
        jsonschema.validate(json.loads(result.stdout), PERSON)


def test_regex_choice_and_grammar_shape_the_answer(files: Path) -> None:
    year = ok(slm_cmd("run", "--regex", "[0-9]{4}", *GREEDY, "In which year did the Berlin Wall fall?")).stdout
    assert re.fullmatch(r"[0-9]{4}\n", year)
    choice = ok(slm_cmd("run", "--choice", "yes", "--choice", "no", *GREEDY, "Is water wet?")).stdout
    assert choice in ("yes\n", "no\n")
    gbnf = ok(slm_cmd("run", "--grammar", str(files / "yesno.gbnf"), *GREEDY, "Is fire hot?")).stdout
    assert gbnf in ("yes\n", "no\n")


def test_a_required_tool_call_is_printed_as_json(files: Path) -> None:
    result = ok(slm_cmd("run", "--tool", str(files / "tools.py"), "--tool-choice", "required", *GREEDY,
                        "What is the weather in Paris?"))
    call = json.loads(result.stdout.strip().splitlines()[-1])
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
    data = as_json(slm_cmd("run", "--tool", str(files / "tools.json"), "--tool-choice", "add", *GREEDY, "--json",
                           "What is 2 plus 3?"))
    assert data["finish_reason"] == "tool_calls"
    (added,) = data["tool_calls"]
    assert added["name"] == "add" and set(added["arguments"]) == {"a", "b"}


@pytest.mark.parametrize(("args", "needles"), [
    (["--json-schema", '{"type": "strin"}'], ["--json-schema", "strin"]),
    (["--json-schema", "missing.json"], ["--json-schema", "no such file"]),
    (["--json-schema", '{"type": "array", "uniqueItems": true}'], ["--json-schema", "uniqueItems"]),
    (["--regex", "("], ["--regex", "regular expression"]),
    (["--regex", "a", "--choice", "b"], ["--choice", "cannot be combined with --regex"]),
    (["--grammar", "missing.lark"], ["--grammar", "no such file"]),
    (["--tool-choice", "required"], ["--tool-choice", "needs tools"]),
    (["--tool", "TOOLS", "--tool-choice", "nope"], ["--tool-choice", "get_weather", "nope"]),
    (["--tool", "BROKEN"], ["--tool", "failed to run", "no tools today"]),
    (["--tool", "TOOLS", "--raw"], ["--tool", "--raw"]),
])
def test_bad_flags_are_one_line_and_exit_2(files: Path, args: list[str], needles: list[str]) -> None:
    args = [str(files / "tools.py") if a == "TOOLS" else str(files / "broken.py") if a == "BROKEN" else a
            for a in args]
    one_line_error(slm_cmd("run", *args, "Hello"), *needles)
