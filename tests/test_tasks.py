"""slm.tasks: documents longer than the context, summarized and translated part by part.

The splitter is checked with SmolLM2's tokenizer and with the estimate used for models without one; the
map-reduce and the translation's structure-keeping with a scripted model (the contract's other side: a
model without a tokenizer, as a remote one is) and with SmolLM2 through `slm`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import slm
import test_cli
from slm.api import load_local
from slm.engines import SpecialTokens
from slm.errors import InvalidParameter
from slm.generation import Completion, GenerationParams
from slm.generation.stream import Chunk, Timings, Usage
from slm.model import LanguageModel
from slm.tasks import split, summarize, translate
from slm.tasks.budget import estimate
from slm.tasks.summary import request as summary_request
from test_cli import isolated, one_line_error, show, slm_cmd  # noqa: F401  (isolated: the store fixture)

LICENSE = Path(__file__).parent / "data" / "apache-2.0.txt"
HEADING = re.compile(r"(?m)^#{1,6} ")


def blocks(text: str) -> list[str]:
    return [b for b in re.split(r"\n[ \t]*\n", text.strip()) if b.strip()]


def long_document(count: Any, tokens: int) -> str:
    """Markdown of at least ``tokens`` tokens: sections of six paragraphs of the Apache license."""
    paragraphs = [" ".join(p.split()) for p in blocks(LICENSE.read_text())]
    out: list[str] = []
    i = 0
    while count("\n\n".join(out)) < tokens:
        out.append(f"## Section {i // 6 + 1}" if i % 6 == 0 else paragraphs[i % len(paragraphs)])
        i += 1
    return "\n\n".join(out) + "\n"


VILLAGE = """# The garden

The garden behind the house is small. In spring, my mother plants tomatoes and beans there.

Every morning she waters the plants before breakfast. The birds sing in the old apple tree.

## The kitchen

The kitchen is the warmest room of the house. We cook soup there on cold evenings.

My father bakes bread on Sundays. The whole house smells of fresh bread.

The table is made of oak. It belonged to my grandmother.

## The village

The village has one school, one bakery and one church. The children walk to school together.

On Saturdays there is a market in the square. People sell cheese, eggs and flowers.

In the evening, the old men play cards in the café near the fountain.
"""


@pytest.fixture(scope="module", autouse=True)
def this_slm(isolated: None) -> None:  # noqa: F811
    """`slm` subprocesses import the slm under test (PYTHONPATH may be relative to another directory)."""
    here = str(Path(slm.__file__).resolve().parents[1])
    test_cli._ENV["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [test_cli._ENV.get("PYTHONPATH")])])


@pytest.fixture(scope="module")
def smollm2() -> Iterator[slm.Model]:
    with load_local("smollm2", n_ctx=512, threads=1) as model:
        yield model


def tokens_of(model: slm.Model) -> Any:
    return lambda text: len(model.tokenize(text, add_special=False))


# --- the splitter ------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [2048, 700, 120, 40, 7, 1])
def test_split_covers_the_text_in_order_within_budget(smollm2: slm.Model, budget: int) -> None:
    count = tokens_of(smollm2)
    text = long_document(count, 3000)
    parts = split(text, count, budget)
    assert "".join(parts) == text
    assert all(count(p) <= budget for p in parts), max(count(p) for p in parts)
    assert all(parts)


def test_split_cuts_at_the_coarsest_structure_that_fits(smollm2: slm.Model) -> None:
    count = tokens_of(smollm2)
    text = long_document(count, 3000)
    sections = re.split(r"(?m)^(?=## )", text)
    largest_section = max(count(s) for s in sections)
    largest_paragraph = max(count(b) for b in blocks(text))
    for part in split(text, count, largest_section):  # every section fits: parts are runs of sections
        assert part.startswith("## ")
    for part in split(text, count, largest_paragraph + 1):  # every paragraph fits: parts end at blank lines
        assert part.endswith("\n\n") or part == text[-len(part):]
    assert len(split(text, count, largest_section)) < len(split(text, count, largest_paragraph + 1))


def test_split_cuts_a_long_paragraph_at_sentences_then_words() -> None:
    paragraph = " ".join(f"Sentence number {i} says a little more than the one before it." for i in range(40))
    parts = split(paragraph, estimate, 40)
    assert "".join(parts) == paragraph
    assert all(p.endswith(". ") for p in parts[:-1])
    words = " ".join(f"word{i}" for i in range(200))  # no sentence ends at all
    parts = split(words, estimate, 10)
    assert "".join(parts) == words and all(p.endswith(" ") for p in parts[:-1])
    assert all(estimate(p) <= 10 for p in split("x" * 1000, estimate, 10))  # one "word" past the budget


# --- a scripted model: no tokenizer, a small context ------------------------------------------------

@dataclass
class Info:
    context_length: int | None
    architecture: str = "scripted"
    special: SpecialTokens = field(
        default_factory=lambda: SpecialTokens(bos_id=None, eos_id=None, end_of_generation=frozenset()))


@dataclass
class Scripted:
    """Answers a summary request with the text's first words, a translation with the text in capitals
    (``merges``: its paragraphs run together; ``splits``: a paragraph a sentence); records every prompt."""

    context: int
    translates: str = "faithfully"
    name: str = "scripted"
    instruct: bool = True
    prompts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def info(self) -> Info:
        return Info(self.context)

    def chat(self, messages: Any, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        params = GenerationParams.of(params, **overrides)
        prompt = messages[-1]["content"]
        self.prompts.append((prompt, params.max_tokens or 0))
        instruction, _, text = prompt.partition("\n\n")
        if instruction.startswith("Translate"):
            answer = {"faithfully": text, "merges": text.replace("\n\n", " "),
                      "splits": text.replace(". ", ".\n\n")}[self.translates].upper()
        else:
            answer = " ".join(text.split()[: (params.max_tokens or 64) // 2])
        usage = Usage(prompt_tokens=estimate(prompt), completion_tokens=estimate(answer))
        return Completion(answer, "stop", usage, Timings(0, 0, 0, 0, 0))

    def chat_stream(self, messages: Any, params: GenerationParams | None = None, **overrides: Any) -> Iterator[Chunk]:
        raise NotImplementedError

    def generate(self, prompt: Any, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        raise NotImplementedError

    def stream(self, prompt: Any, params: GenerationParams | None = None, **overrides: Any) -> Iterator[Chunk]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_scripted_model_is_a_language_model() -> None:
    assert isinstance(Scripted(1000), LanguageModel)


def test_summary_of_a_short_text_is_one_request() -> None:
    model = Scripted(4000)
    summarize(model, "A short note. Nothing more.", words=10, max_tokens=32)
    assert [p for p, _ in model.prompts] == [summary_request("A short note. Nothing more.", 10)[0]["content"]]


def test_summary_map_reduces_as_deep_as_needed_within_the_context() -> None:
    model = Scripted(600)
    text = long_document(estimate, 20_000)
    seen: list[tuple[int, int]] = []
    completion = summarize(model, text, max_tokens=64, on_progress=lambda done, total: seen.append((done, total)))
    assert completion.text
    for prompt, answer in model.prompts:
        assert estimate(prompt) + 8 + answer <= 600
    assert model.prompts[-1][0].startswith("The following are summaries")
    parts_summarized = sum(p.startswith("Summarize the following part") for p, _ in model.prompts)
    assert parts_summarized > estimate(text) // 600  # every part read, in more than one round:
    assert len({total for _, total in seen}) > 1  # the plan grew
    assert seen[-1][0] == seen[-1][1]
    assert completion.usage.prompt_tokens == sum(estimate(p) for p, _ in model.prompts)


def test_summary_refuses_max_tokens_that_leave_no_room() -> None:
    with pytest.raises(InvalidParameter, match="max_tokens"):
        summarize(Scripted(600), long_document(estimate, 5000), max_tokens=500)


@pytest.mark.parametrize("translates", ["faithfully", "merges", "splits"])
def test_translation_keeps_headings_and_paragraphs(translates: str) -> None:
    model = Scripted(300, translates=translates)
    text = VILLAGE * 3
    seen: list[tuple[int, int]] = []
    completion = translate(model, text, "French", on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][1] > 2
    if translates == "splits":  # each paragraph's sentences are put back together, a line each
        assert completion.text == text.upper().replace(". ", ".\n")
    else:  # the blank lines, headings and paragraphs where they were
        assert completion.text == text.upper()
    for prompt, answer in model.prompts:
        assert estimate(prompt) + 8 + answer <= 300


# --- slm summarize / translate with SmolLM2 ----------------------------------------------------------

def slm_long(*args: str) -> subprocess.CompletedProcess[str]:
    """`slm ARGS` with time for a long document on a busy machine."""
    command = [str(test_cli.SLM)] if test_cli.SLM.exists() else [sys.executable, "-m", "slm"]
    return subprocess.run([*command, *args], input="", capture_output=True, text=True, timeout=900,
                          env=test_cli._ENV, cwd=test_cli._CWD)


def test_summarize_a_document_longer_than_the_context(smollm2: slm.Model, tmp_path: Path) -> None:
    document = tmp_path / "long.md"
    document.write_text(long_document(tokens_of(smollm2), 9_200))
    # 9,200 tokens go past SmolLM2's 8,192 as they are; a 2,048 context keeps each part's prompt short
    result = slm_long("summarize", str(document), "--ctx-size", "2048", "--max-tokens", "48", "--temperature", "0",
                      "--threads", "1")
    assert result.returncode == 0, show(result)
    assert result.stdout.strip(), show(result)


def test_translate_a_document_longer_than_the_context(smollm2: slm.Model, tmp_path: Path) -> None:
    document, out = tmp_path / "village.md", tmp_path / "village.fr.md"
    document.write_text(VILLAGE)
    assert 3 * len(smollm2.tokenize(VILLAGE)) > 384  # the text and its translation do not fit one prompt
    result = slm_long("translate", "--to", "French", "--file", str(document), "--out", str(out),
                      "--ctx-size", "384", "--temperature", "0", "--threads", "1")
    assert result.returncode == 0, show(result)
    assert result.stdout == ""
    translated = out.read_text()
    assert len(HEADING.findall(translated)) == len(HEADING.findall(VILLAGE)) == 3, translated
    assert len(blocks(translated)) == len(blocks(VILLAGE)) == 11, translated
    assert not list(tmp_path.glob(".*.part"))


# --- bad input -----------------------------------------------------------------------------------------

def test_bad_documents_are_one_line(tmp_path: Path) -> None:
    empty, blank, binary, latin1, taken = (tmp_path / n for n in ("empty.txt", "blank.txt", "b.bin", "l.txt", "o.md"))
    empty.write_text("")
    blank.write_text("  \n\n \t\n")
    binary.write_bytes(bytes(range(256)) * 4)
    latin1.write_bytes("café au lait".encode("latin-1"))
    taken.write_text("already here")
    one_line_error(slm_cmd("summarize", str(empty)), "empty", str(empty))
    one_line_error(slm_cmd("summarize", str(blank)), "empty")
    one_line_error(slm_cmd("summarize", str(binary)), "binary", str(binary))
    one_line_error(slm_cmd("summarize", str(latin1)), "UTF-8", str(latin1))
    one_line_error(slm_cmd("translate", "--to", "French", "--file", str(binary)), "binary")
    one_line_error(slm_cmd("summarize", str(LICENSE), "--out", str(taken)), "--out", str(taken), "--force")
    one_line_error(slm_cmd("translate", "--to", "French", "Hello", "--out", str(taken)), "--out", "--force")
    one_line_error(slm_cmd("translate", "--to", "French", "Hello", "--file", str(LICENSE)), "--file")
    assert taken.read_text() == "already here"


def test_summarize_in_parts_to_a_json_file(tmp_path: Path) -> None:
    document, out = tmp_path / "village.md", tmp_path / "summary.json"
    document.write_text(VILLAGE * 4)
    out.write_text("an older summary")
    result = slm_long("summarize", str(document), "--ctx-size", "512", "--max-tokens", "32", "--temperature", "0",
                      "--threads", "1", "--json", "--out", str(out), "--force")
    assert result.returncode == 0, show(result)
    assert result.stdout == ""
    data = json.loads(out.read_text())
    assert data["text"].strip() and data["model"] == "smollm2"
    assert data["usage"]["prompt_tokens"] > len(VILLAGE * 4) // 5  # every part was read
