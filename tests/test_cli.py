"""The `slm` command, run as a real subprocess against the embedded SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import slm
from slm.store import catalog

SLM = Path(sys.executable).parent / "slm"
TIMEOUT = 180
# One llama.cpp thread: on a shared machine its spinning worker threads slow down several-fold under
# contention. The flag goes with every generation whose output is compared with another's.
ONE_THREAD = ["--threads", "1"]
GREEDY = ["--temperature", "0", *ONE_THREAD]


def slm_cmd(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `slm ARGS`; stdin is empty (not a terminal) unless given."""
    command = [str(SLM)] if SLM.exists() else [sys.executable, "-m", "slm"]
    return subprocess.run(
        [*command, *args], input=stdin if stdin is not None else "", capture_output=True, text=True,
        timeout=TIMEOUT, env=env if env is not None else _ENV, cwd=cwd or _CWD,
    )


def show(result: subprocess.CompletedProcess[str]) -> str:
    """A run's exit status and output (the start and end of long output), for assertion messages."""

    def clip(text: str) -> str:
        return repr(text) if len(text) <= 1500 else f"{text[:800]!r} ... {text[-700:]!r}"

    return f"exit {result.returncode}\nstdout: {clip(result.stdout)}\nstderr: {clip(result.stderr)}"


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, show(result)
    assert "Traceback" not in result.stderr, show(result)
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    ok(result)
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, nothing but `error: ...` on one stderr line, naming every needle (case-insensitive)."""
    assert result.returncode == 2, show(result)
    assert "Traceback" not in result.stdout + result.stderr, show(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, show(result)
    line = lines[0]
    assert line.startswith("error:"), show(result)
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


_ENV: dict[str, str] = {}
_CWD = Path.cwd()


@pytest.fixture(scope="module", autouse=True)
def isolated(tmp_path_factory: pytest.TempPathFactory) -> None:
    """An empty model store and working directory, and no llama.cpp log on stderr."""
    global _CWD
    home = tmp_path_factory.mktemp("slm-home")
    _ENV.clear()
    _ENV.update({k: v for k, v in os.environ.items() if k not in ("SLM_VERBOSE", "SLM_HOME")})
    _ENV["SLM_HOME"] = str(home)
    _CWD = tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def hi() -> dict[str, Any]:
    """`slm run "Hi" --json`, greedy: the reference for the variants below."""
    return as_json(slm_cmd("run", "Hi", "--json", *GREEDY, "--max-tokens", "8"))


@pytest.fixture(scope="module")
def hello() -> str:
    """`slm run "Hello"` greedy, as printed."""
    return ok(slm_cmd("run", "Hello", *GREEDY, "--max-tokens", "16")).stdout


# --- slm run -------------------------------------------------------------------------------------


def test_run_prints_text() -> None:
    result = ok(slm_cmd("run", "What is the capital of France?", "--temperature", "0", "--max-tokens", "16"))
    assert result.stdout.strip()
    assert result.stdout.endswith("\n")
    assert result.stderr == ""


def test_run_json(hi: dict[str, Any]) -> None:
    assert hi["model"] == "smollm2"
    assert isinstance(hi["text"], str) and hi["text"].strip()
    assert hi["finish_reason"] in ("stop", "length")
    usage = hi["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(hi["timings"], dict)
    assert hi["timings"]["time_to_first_token"] >= 0
    assert "logprobs" not in hi


def test_run_json_top_logprobs(hi: dict[str, Any]) -> None:
    data = as_json(slm_cmd("run", "Hi", "--json", *GREEDY, "--max-tokens", "8", "--top-logprobs", "3"))
    assert data["text"] == hi["text"]
    logprobs = data["logprobs"]
    assert len(logprobs) == data["usage"]["completion_tokens"]
    for step in logprobs:
        assert step["logprob"] <= 0
        top = step["top"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == step["token"]  # greedy picks the most likely token


def test_run_raw_has_no_chat_template(hi: dict[str, Any]) -> None:
    raw = as_json(slm_cmd("run", "Hi", "--raw", "--json", *GREEDY, "--max-tokens", "8"))
    assert raw["usage"]["prompt_tokens"] < hi["usage"]["prompt_tokens"]
    assert raw["usage"]["prompt_tokens"] <= 2  # "Hi" (and perhaps BOS), nothing else


def test_run_system_changes_the_prompt(hi: dict[str, Any]) -> None:
    data = as_json(slm_cmd("run", "Hi", "--system", "Answer in French.", "--json", *GREEDY, "--max-tokens", "8"))
    assert data["usage"]["prompt_tokens"] != hi["usage"]["prompt_tokens"]
    longer = as_json(slm_cmd("run", "Hi", "--system", "Answer in French. " * 10, "--json", *GREEDY,
                             "--max-tokens", "8"))
    assert longer["usage"]["prompt_tokens"] > data["usage"]["prompt_tokens"]


@pytest.mark.parametrize("args", [["smollm2", "Hi"], ["-m", "smollm2", "Hi"], ["--model", "SmolLM2", "Hi"]],
                         ids=["argument", "-m", "--model"])
def test_run_explicit_model_equals_default(hi: dict[str, Any], args: list[str]) -> None:
    data = as_json(slm_cmd("run", *args, "--json", *GREEDY, "--max-tokens", "8"))
    assert data["model"] == "smollm2"
    assert data["text"] == hi["text"]
    assert data["usage"] == hi["usage"]


def test_run_model_path(hi: dict[str, Any]) -> None:
    path = catalog.resolve("smollm2").path
    data = as_json(slm_cmd("run", str(path), "Hi", "--json", *GREEDY, "--max-tokens", "8"))
    assert data["text"] == hi["text"]


def test_run_prompt_from_stdin(hi: dict[str, Any]) -> None:
    data = as_json(slm_cmd("run", "--json", *GREEDY, "--max-tokens", "8", stdin="Hi\n"))
    assert data["usage"] == hi["usage"]
    assert data["text"] == hi["text"]


def test_run_model_argument_and_prompt_from_stdin(hi: dict[str, Any]) -> None:
    data = as_json(slm_cmd("run", "smollm2", "--json", *GREEDY, "--max-tokens", "8", stdin="Hi\n"))
    assert data["text"] == hi["text"]


def test_run_stdin_is_appended_to_the_prompt(hi: dict[str, Any]) -> None:
    data = as_json(slm_cmd("run", "Hi", "--json", *GREEDY, "--max-tokens", "8",
                           stdin="Here is some more context for the question.\n"))
    assert data["usage"]["prompt_tokens"] > hi["usage"]["prompt_tokens"] + 5


def test_run_verbose_prints_stats_on_stderr_only(hi: dict[str, Any]) -> None:
    result = ok(slm_cmd("run", "Hi", *GREEDY, "--max-tokens", "8", "--verbose"))
    assert result.stdout == hi["text"] + "\n"
    stats = " ".join(result.stderr.split())  # the line may be wrapped at the console width
    assert "time to first token" in stats
    assert "tok/s" in stats
    assert f"{hi['usage']['prompt_tokens']} prompt tokens" in stats
    assert "tok/s" not in result.stdout


def test_run_stop() -> None:
    args = ["run", "Count from 1 to 10, separated by commas.", "--json", *GREEDY, "--max-tokens", "24"]
    full = as_json(slm_cmd(*args))
    assert "5" in full["text"], full
    stopped = as_json(slm_cmd(*args, "--stop", "5"))
    assert stopped["finish_reason"] == "stop"
    assert "5" not in stopped["text"]
    assert full["text"].startswith(stopped["text"])
    assert stopped["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]


def test_run_seed_is_reproducible() -> None:
    args = ["run", "Tell me a story.", "--json", "--temperature", "0.8", "--max-tokens", "16", "--seed", "1234",
            *ONE_THREAD]
    first, second = as_json(slm_cmd(*args)), as_json(slm_cmd(*args))
    assert first["text"] == second["text"]
    assert first["text"].strip()


def test_run_long_prompt_argument() -> None:
    """A prompt longer than a file name may be (255 bytes) is a prompt, not an unreadable path."""
    prompt = "Repeat the next words back to me: " + "la " * 120
    result = ok(slm_cmd("run", prompt, *GREEDY, "--max-tokens", "4"))
    assert result.stdout.strip()


def test_run_prompt_longer_than_context() -> None:
    long_text = "word " * 300  # about 300 tokens; --ctx-size 64 gives at most a few hundred
    args = ["run", "--ctx-size", "64", "--max-tokens", "8", *GREEDY]
    line = one_line_error(slm_cmd(*args, stdin=long_text), "context")
    assert "truncat" in line  # it says how to make it fit
    data = as_json(slm_cmd(*args, "--truncate", "--json", stdin=long_text))
    assert data["usage"]["prompt_tokens"] < 300
    assert data["usage"]["prompt_tokens"] + 8 <= 256


def test_run_small_context_with_a_prompt_that_fits() -> None:
    """--ctx-size below the batch size (512) with a prompt between the two must not abort in llama.cpp."""
    prompt = "Tell me about the history of the city of Rome and of its empire, in detail, please. " * 2
    result = slm_cmd("run", prompt, "--ctx-size", "64", "--max-tokens", "8", *GREEDY)
    if result.returncode == 2:  # a context of exactly 64 tokens: then it must say so
        one_line_error(result, "context")
    else:
        assert ok(result).stdout.strip()


# --- bad input: one line, exit 2 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-files")
    truncated = folder / "truncated.gguf"
    with catalog.resolve("smollm2").path.open("rb") as f:
        truncated.write_bytes(f.read(64 * 1024))
    text = folder / "x.gguf"
    text.write_text("This is a text file with a model's name, but it is not a model at all.\n")
    empty = folder / "empty.txt"
    empty.write_text("\n")
    weightless = folder / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text('{"model_type": "llama"}\n')
    return {"truncated": truncated, "text": text, "empty": empty, "missing": folder / "missing.gguf",
            "folder": folder, "weightless": weightless}


BAD_INPUT: list[tuple[str, list[str], list[str]]] = [
    ("unknown-model", ["run", "smolm2", "hi"], ["smolm2", "did you mean 'smollm2'"]),
    ("missing-gguf", ["run", "{missing}", "hi"], ["no such model file", "missing.gguf"]),
    ("truncated-gguf", ["run", "{truncated}", "hi"], ["truncated.gguf", "could not be loaded"]),
    ("text-as-gguf", ["run", "{text}", "hi"], ["x.gguf", "not a GGUF model"]),
    ("directory", ["run", "{folder}", "hi"], ["folder", "config.json"]),
    ("hf-folder-without-weights", ["run", "{weightless}", "hi"], ["config.json", "no .safetensors"]),
    ("empty-prompt", ["run", ""], ["prompt", "empty"]),
    ("blank-prompt", ["run", "   "], ["prompt", "empty"]),
    ("temperature-negative", ["run", "hi", "--temperature", "-1"], ["--temperature", "-1"]),
    ("top-p-zero", ["run", "hi", "--top-p", "0"], ["--top-p"]),
    ("top-p-above-one", ["run", "hi", "--top-p", "1.5"], ["--top-p", "1.5"]),
    ("max-tokens-zero", ["run", "hi", "--max-tokens", "0"], ["--max-tokens"]),
    ("top-k-negative", ["run", "hi", "--top-k", "-1"], ["--top-k"]),
    ("temperature-not-a-number", ["run", "hi", "--temperature", "abc"], ["--temperature", "abc"]),
    ("logit-bias-malformed", ["run", "hi", "--logit-bias", "foo"], ["--logit-bias", "foo"]),
    ("logit-bias-out-of-range", ["run", "hi", "--logit-bias", "5=500"], ["--logit-bias", "500"]),
    ("top-logprobs-too-many", ["run", "hi", "--top-logprobs", "50"], ["--top-logprobs"]),
    ("seed-negative", ["run", "hi", "--seed", "-1"], ["--seed"]),
    ("too-many-arguments", ["run", "smollm2", "a", "b"], ["prompt"]),
    ("summarize-missing-file", ["summarize", "/no/such/file"], ["no such file", "/no/such/file"]),
    ("summarize-empty-file", ["summarize", "{empty}"], ["empty"]),
    ("summarize-empty-stdin", ["summarize", "-"], ["stdin", "empty"]),
    ("translate-without-to", ["translate", "Good morning"], ["--to"]),
    ("translate-empty-stdin", ["translate", "--to", "French"], ["empty"]),
    ("catalog-model-not-here", ["run", "phi3-mini", "hi"],
     ["phi3-mini", "not on this machine", "https://huggingface.co/microsoft/Phi-3-mini-4k-instruct-gguf"]),
    ("catalog-model-not-here-chat", ["chat", "phi3.5-mini"], ["phi3.5-mini", "huggingface.co"]),
    ("pull-unknown", ["pull", "nosuch"], ["nosuch"]),
    ("unknown-command", ["runn", "hi"], ["runn"]),
    ("unknown-option", ["run", "hi", "--temprature", "0"], ["--temprature"]),
    ("beams-zero", ["run", "hi", "--beams", "0"], ["--beams", "0"]),
    ("beams-with-top-p", ["run", "hi", "--beams", "4", "--top-p", "0.5"], ["--top-p", "beam search"]),
    ("beams-with-temperature", ["run", "hi", "--beams", "4", "--temperature", "0.7"], ["--temperature", "beam"]),
    ("beams-more-returned-than-beams", ["run", "hi", "--beams", "2", "--num-return-sequences", "3"],
     ["--num-return-sequences", "num_beams"]),
    ("beams-early-stopping", ["run", "hi", "--beams", "2", "--early-stopping", "sometimes"], ["--early-stopping"]),
    ("beams-length-penalty", ["run", "hi", "--beams", "2", "--length-penalty", "abc"], ["--length-penalty"]),
]


@pytest.mark.parametrize(("args", "needles"), [(a, n) for _, a, n in BAD_INPUT], ids=[i for i, _, _ in BAD_INPUT])
def test_bad_input_is_one_line(bad_files: dict[str, Path], args: list[str], needles: list[str]) -> None:
    args = [a.format(**{k: str(v) for k, v in bad_files.items()}) for a in args]
    one_line_error(slm_cmd(*args), *needles)


@pytest.mark.parametrize(("flag", "value"), [("--ctx-size", "8"), ("--threads", "0")])
def test_bad_engine_flags_are_named_as_flags(flag: str, value: str) -> None:
    """Like the sampling flags, a bad --ctx-size or --threads names the flag the user typed."""
    one_line_error(slm_cmd("run", "hi", flag, value, "--max-tokens", "4"), flag)


def test_run_beams_json_lists_every_returned_beam(model: slm.Model) -> None:
    """`--beams 4 --num-return-sequences 2 --json`: the best beam's text, and both beams with their scores,
    as the Python API returns them; without --json each beam is printed with its score."""
    args = ["run", "--beams", "4", "--num-return-sequences", "2", "--max-tokens", "8", "--length-penalty", "0.5",
            "--early-stopping", "true", "--no-repeat-ngram-size", "3", *ONE_THREAD, "Name a colour."]
    result = as_json(slm_cmd(*args, "--json"))
    expected = model.chat([{"role": "user", "content": "Name a colour."}], num_beams=4, num_return_sequences=2,
                          max_tokens=8, length_penalty=0.5, early_stopping=True, no_repeat_ngram_size=3)
    assert [b["tokens"] for b in result["beams"]] == [b.tokens for b in expected.beams]
    assert result["text"] == expected.text == result["beams"][0]["text"]
    assert result["beams"][0]["score"] >= result["beams"][1]["score"]
    lines = ok(slm_cmd(*args)).stdout.splitlines()
    assert [line.split(") ", 1)[1] for line in lines] == [b.text for b in expected.beams]
    # More beams than the default four sequences: the engine is loaded with one per beam.
    assert as_json(slm_cmd("run", "--beams", "6", "--max-tokens", "4", *ONE_THREAD, "--json", "Hi"))["beams"]


# --- summarize, translate, chat ----------------------------------------------------------------------

NOTES = (
    "The city council met on Tuesday to discuss the new bicycle lanes. After a long debate, the council "
    "voted to build two lanes on Main Street next spring, paid for by the state transport fund.\n"
)


def test_summarize_file_and_stdin(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES)
    from_file = ok(slm_cmd("summarize", str(notes), *GREEDY, "--max-tokens", "24"))
    assert from_file.stdout.strip()
    from_stdin = ok(slm_cmd("summarize", "-", *GREEDY, "--max-tokens", "24", stdin=NOTES))
    assert from_stdin.stdout == from_file.stdout


def test_summarize_json() -> None:
    data = as_json(slm_cmd("summarize", "-", "--words", "10", "--json", *GREEDY, "--max-tokens", "16", stdin=NOTES))
    assert data["text"].strip()
    assert data["usage"]["prompt_tokens"] > 40


def test_translate_argument_and_stdin() -> None:
    from_argument = ok(slm_cmd("translate", "--to", "French", "Good morning", *GREEDY, "--max-tokens", "16"))
    assert from_argument.stdout.strip()
    from_stdin = ok(slm_cmd("translate", "--to", "French", *GREEDY, "--max-tokens", "16", stdin="Good morning\n"))
    assert from_stdin.stdout == from_argument.stdout


def test_chat_from_stdin_with_reset(hello: str) -> None:
    """Two answers; after /reset the second is what a fresh `slm run` gives."""
    fresh = ok(slm_cmd("run", "What is 2+2?", *GREEDY, "--max-tokens", "16")).stdout
    result = ok(slm_cmd("chat", *GREEDY, "--max-tokens", "16", stdin="Hello\n/reset\nWhat is 2+2?\n/exit\n"))
    assert result.stdout == hello + fresh
    assert "/reset" not in result.stdout
    assert "/exit" not in result.stdout


def test_chat_ends_at_end_of_input(hello: str) -> None:
    result = ok(slm_cmd("chat", *GREEDY, "--max-tokens", "16", stdin="Hello\n"))
    assert result.stdout == hello
    assert ok(slm_cmd("chat", stdin="")).stdout == ""


def test_chat_exit_stops_reading() -> None:
    result = ok(slm_cmd("chat", *GREEDY, "--max-tokens", "8", stdin="/exit\nHello\n"))
    assert result.stdout == ""


# --- help, version, list -------------------------------------------------------------------------------

HELP: list[tuple[list[str], list[str]]] = [
    ([], ["run", "chat", "summarize", "translate", "list", "pull", "--version"]),
    (["run"], ["--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--raw", "--system", "--json",
               "--verbose", "--stop", "--model", "--top-logprobs", "--truncate", "--ctx-size"]),
    (["chat"], ["--system", "--max-tokens", "--temperature", "--top-p", "--seed", "/reset", "/exit"]),
    (["summarize"], ["FILE", "--words", "--max-tokens", "--temperature", "--json", "--verbose", "--model"]),
    (["translate"], ["--to", "--from", "--max-tokens", "--temperature", "--json", "--model"]),
    (["list"], ["--json"]),
    (["pull"], ["MODEL"]),
]


@pytest.mark.parametrize(("command", "expected"), HELP, ids=[" ".join(c) or "slm" for c, _ in HELP])
def test_help(command: list[str], expected: list[str]) -> None:
    result = ok(slm_cmd(*command, "--help"))
    assert result.stdout.startswith("Usage: slm")
    for text in expected:
        assert text in result.stdout, f"{text!r} missing from `slm {' '.join(command)} --help`"


def test_version() -> None:
    for flag in ("--version", "-V"):
        result = ok(slm_cmd(flag))
        assert slm.__version__ in result.stdout
        assert result.stdout.startswith("slm")


def test_list() -> None:
    result = ok(slm_cmd("list"))
    for alias in ("smollm2", "gemma3:270m", "qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b", "phi3-mini", "phi3.5-mini",
                  "phi3.5-moe", "phi3.5-vision"):
        assert alias in result.stdout


def test_list_json() -> None:
    rows = {row["alias"]: row for row in as_json(slm_cmd("list", "--json"))}
    assert set(rows) == {"smollm2", "gemma3:270m", "qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b", "phi3-mini",
                         "phi3.5-mini", "phi3.5-moe", "phi3.5-vision", "phi3.5-vision:onnx", "phi3-vision",
                         "phi3-vision:onnx", "gemma3:4b", "smolvlm:256m", "minilm"}
    assert rows["smollm2"]["present"] is True
    assert Path(rows["smollm2"]["path"]) == catalog.resolve("smollm2").path
    assert rows["smollm2"]["size_bytes"] == catalog.resolve("smollm2").path.stat().st_size
    assert rows["phi3-mini"]["present"] is False
    assert rows["phi3-mini"]["path"] is None
    assert rows["phi3-mini"]["url"].startswith("https://huggingface.co/")


# --- pull ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path, str]:
    """`slm pull gemma3:270m` into a fresh SLM_HOME: (env, home, what it printed)."""
    home = tmp_path_factory.mktemp("pull-home")
    env = {**_ENV, "SLM_HOME": str(home)}
    result = ok(slm_cmd("pull", "gemma3:270m", env=env))
    return env, home, result.stdout


def test_pull_puts_the_model_in_the_store(gemma_home: tuple[dict[str, str], Path, str]) -> None:
    _env, home, printed = gemma_home
    path = home / "models" / catalog.CATALOG["gemma3:270m"].filename
    assert path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"
    assert str(path) in printed
    assert [p.name for p in (home / "models").iterdir()] == [path.name]  # no partial file left behind


def test_list_shows_the_pulled_model(gemma_home: tuple[dict[str, str], Path, str]) -> None:
    env, home, _ = gemma_home
    rows = {row["alias"]: row for row in as_json(slm_cmd("list", "--json", env=env))}
    assert rows["gemma3:270m"]["present"] is True
    assert Path(rows["gemma3:270m"]["path"]).parent == home / "models"


def test_pull_again_says_it_is_already_here(gemma_home: tuple[dict[str, str], Path, str]) -> None:
    env, home, _ = gemma_home
    result = ok(slm_cmd("pull", "gemma3:270m", env=env))
    assert "already" in result.stdout
    result = ok(slm_cmd("pull", "GEMMA3:270M", env=env))
    assert "already" in result.stdout


def test_run_the_pulled_model(gemma_home: tuple[dict[str, str], Path, str]) -> None:
    env, _, _ = gemma_home
    raw = as_json(slm_cmd("run", "gemma3:270m", "Hi", "--raw", "--json", *GREEDY, "--max-tokens", "8", env=env))
    assert raw["model"] == "gemma3:270m"
    result = ok(slm_cmd("run", "gemma3:270m", "Hi", "--max-tokens", "8", *GREEDY, env=env))
    assert result.stdout.strip()


def test_a_converted_model_runs_by_name_on_the_transformers_engine(converted_home: Path) -> None:
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    result = as_json(slm_cmd("run", "smollm2-hf", "The capital of France is", "--max-tokens", "6", "--json",
                             *GREEDY, env=env))
    assert result["usage"]["completion_tokens"] >= 1 and result["text"]
    reference = as_json(slm_cmd("run", "smollm2", "The capital of France is", "--max-tokens", "6", "--json",
                                "--engine", "transformers", *GREEDY, env=env))  # the GGUF, dequantized
    assert reference["text"] == result["text"]


def test_convert_refuses_to_overwrite_and_names_what_is_wrong(converted_home: Path,
                                                              smollm2_onnx_int4_path: Path) -> None:
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    one_line_error(slm_cmd("convert", "smollm2", "--to", "hf", env=env), "already exists", "--force")
    assert not list((converted_home / "models").glob("*.part"))
    one_line_error(slm_cmd("run", "smollm2-hf", "Hi", "--engine", "llamacpp", env=env), "llamacpp", "transformers")
    one_line_error(slm_cmd("convert", "smollm2", "--to", "gguf", env=env), "already gguf")
    one_line_error(slm_cmd("convert", "smollm2-hf-onnx-int4", "--to", "gguf", env=env), "is onnx", "--to hf")
    one_line_error(slm_cmd("convert", "smollm2-hf", "--to", "gguf", "--precision", "int4", env=env),
                   "int4", "q8_0")
    one_line_error(slm_cmd("convert", "smollm2-hf", "--to", "onnx", "--precision", "q8_0", env=env), "q8_0", "int4")
    assert slm_cmd("convert", "smollm2", "--to", "onnx", "--precision", "int8", env=env).returncode == 2
    assert not list((converted_home / "models").glob("*.part"))
    folder = converted_home / "keep-me"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    one_line_error(slm_cmd("convert", "smollm2-hf", "--to", "gguf", "--output", str(folder), "--force", env=env),
                   "is a folder")
    assert (folder / "notes.txt").read_text() == "mine"  # --force replaces a model, never a folder of yours


def test_a_hugging_face_folder_converted_to_gguf_runs_by_name_on_llamacpp(converted_home: Path) -> None:
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    done = slm_cmd("convert", "smollm2-hf", "--to", "gguf", "--force", env=env)  # q8_0 by default
    assert done.returncode == 0, show(done)
    assert (converted_home / "models" / "smollm2-hf-q8_0.gguf").is_file()
    assert "slm run smollm2-hf-q8_0" in done.stdout
    result = as_json(slm_cmd("run", "smollm2-hf-q8_0", "The capital of France is", "--max-tokens", "6", "--json",
                             *GREEDY, env=env))
    assert result["usage"]["completion_tokens"] >= 1
    shown = as_json(slm_cmd("show", "smollm2-hf-q8_0", "--json", env=env))
    assert shown["format"] == "gguf" and shown["engine"] == "llamacpp"


def test_an_onnx_build_runs_by_name(converted_home: Path, smollm2_onnx_int4_path: Path) -> None:
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    result = as_json(slm_cmd("run", smollm2_onnx_int4_path.name, "Hello", "--max-tokens", "4", "--json", *GREEDY,
                             env=env))
    assert result["usage"]["completion_tokens"] >= 1


def test_show_says_which_engine_runs_a_model_and_why(converted_home: Path) -> None:
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    gguf = as_json(slm_cmd("show", "smollm2", "--json", env=env))
    assert gguf["format"] == "gguf" and gguf["engine"] == "llamacpp" and "llama.cpp" in gguf["why"]
    assert gguf["engines_that_can"] == ["llamacpp", "transformers"]
    hf = as_json(slm_cmd("show", "smollm2-hf", "--json", env=env))
    assert hf["format"] == "hf" and hf["engine"] == "transformers"
    assert "CPU" in hf["why"] or "GPU" in hf["why"]  # it says where it will run
    one_line_error(slm_cmd("show", "smollm2-hf", "--engine", "onnx", env=env), "--engine", "transformers")
    asked = as_json(slm_cmd("show", "smollm2", "--engine", "transformers", "--json", env=env))
    assert asked["engine"] == "transformers" and "--engine transformers" in asked["why"]


def test_list_shows_converted_models_and_the_engine_of_each(converted_home: Path,
                                                            smollm2_onnx_int4_path: Path) -> None:
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    rows = {row["alias"]: row for row in as_json(slm_cmd("list", "--json", env=env))}
    assert rows["smollm2"]["engine"] == "llamacpp" and rows["smollm2"]["present"]
    assert rows["smollm2-hf"]["format"] == "hf" and rows["smollm2-hf"]["engine"] == "transformers"
    onnx = rows[smollm2_onnx_int4_path.name]
    assert onnx["format"] == "onnx" and onnx["engine"] == "onnx" and onnx["source"] == "convert"
    assert not [alias for alias in rows if alias.endswith(".part")]
    table = slm_cmd("list", env={**env, "COLUMNS": "140"}).stdout
    assert "engine" in table and "smollm2-hf" in table and "transformers" in table
    # with an ONNX build of the folder at hand, show says so (the CPU is where it pays)
    assert smollm2_onnx_int4_path.name in as_json(slm_cmd("show", "smollm2-hf", "--json", env=env))["why"]


def test_show_and_list_describe_an_openvino_build_from_its_files(converted_home: Path, model: slm.Model,
                                                                  smollm2_openvino_int4_path: Path) -> None:
    """Precision, architecture, trained context and parameter count, read from the folder (the engine does not
    report a count for it) and equal to what llama.cpp counts in the GGUF it came from."""
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    name = smollm2_openvino_int4_path.name
    shown = as_json(slm_cmd("show", name, "--engine", "openvino", "--json", env=env))
    assert shown["format"] == "openvino" and shown["engine"] == "openvino" and shown["precision"] == "int4"
    assert shown["architecture"] == "llama" and shown["context_length"] == 8192
    assert shown["parameters"] == model.info.parameters
    text = ok(slm_cmd("show", name, env={**env, "COLUMNS": "140"})).stdout
    assert f"135M ({model.info.parameters:,})" in text and "int4" in text
    assert "unknown" in ok(slm_cmd("show", "smollm2", env=env)).stdout  # a GGUF's context: not read, not 0
    row = {r["alias"]: r for r in as_json(slm_cmd("list", "--json", env=env))}[name]
    assert (row["parameters"], row["quantization"], row["engine"]) == ("135M", "int4", "openvino")


def test_run_engine_openvino_runs_the_openvino_build(converted_home: Path, smollm2_openvino_int4_path: Path) -> None:
    env = {**_ENV, "SLM_HOME": str(converted_home)}
    result = as_json(slm_cmd("run", "smollm2", "--engine", "openvino", "--raw", "The capital of France is",
                             "--max-tokens", "4", "--temperature", "0", "--json", env=env))
    assert result["usage"]["completion_tokens"] >= 1 and result["text"]
