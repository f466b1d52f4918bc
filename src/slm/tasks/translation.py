"""Translations of texts of any length, part by part in order, keeping the document's structure: the
same paragraphs (blocks between blank lines) and Markdown headings, with the original blank lines
between them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from slm.errors import InvalidParameter
from slm.generation.params import GenerationParams
from slm.generation.stream import Completion
from slm.model import LanguageModel, Messages
from slm.tasks import budget
from slm.tasks.split import paragraphs, split

Progress = Callable[[int, int], None]
"""Called with (parts done, parts in all)."""

MAX_PART = 1024
"""Tokens of one part at most: a small model translates a page at a time more faithfully."""
GROWTH = 2
"""A translation may take up to this many times the tokens of its source (and 16 more)."""

BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
HEADING = re.compile(r"^(#{1,6})[ \t]+")


def request(text: str, target: str, source: str | None = None) -> Messages:
    """The translation request (``slm translate``)."""
    origin = f" from {source}" if source else ""
    return [{"role": "user", "content": f"Translate the following text{origin} into {target}. Reply with the "
                                        f"translation only.\n\n{text.strip()}"}]


def answer_tokens(tokens: int, params: GenerationParams) -> int:
    """Room for the translation of ``tokens`` tokens (at most ``max_tokens`` if it says)."""
    room = GROWTH * tokens + 16
    return min(room, params.max_tokens) if params.max_tokens else room


def fits(model: LanguageModel, text: str, target: str, source: str | None = None,
         params: GenerationParams | None = None) -> bool:
    """Whether ``text`` is translated in one prompt (as ``translate`` would)."""
    params = params or GenerationParams()
    answer = answer_tokens(budget.counter(model)(text), params)
    return budget.fits(model, request(text, target, source), answer)


def translate(model: LanguageModel, text: str, target: str, source: str | None = None,
              on_progress: Progress | None = None, params: GenerationParams | None = None,
              **overrides: Any) -> Completion:
    """``text`` translated into ``target`` by ``model``, however long: in one prompt when it fits, else
    in parts of whole paragraphs (sentences of a paragraph too long for one), each answer put back between
    the original blank lines. ``max_tokens`` bounds each part's answer. The completion is the last
    request's, with the text of all of them and the usage of all of them."""
    params = GenerationParams.of(params, **overrides)
    if fits(model, text, target, source, params):
        return model.chat(request(text, target, source), params)
    count = budget.counter(model)
    instruction = budget.prompt_tokens(model, request("", target, source))
    size = min(MAX_PART, (budget.context(model) - instruction - 16 - budget.MARGIN) // (GROWTH + 1))
    if params.max_tokens:
        size = min(size, params.max_tokens // GROWTH)
    if size < 1:
        raise InvalidParameter("max_tokens", "leaves no room to translate a long text in parts")
    lead = text[:len(text) - len(text.lstrip())]
    parts = split(text[len(lead):], count, size)
    translator = _Translator(model, target, source, params, count)
    out = [lead]
    for done, part in enumerate(parts):
        if on_progress:
            on_progress(done, len(parts))
        out.append(translator.part(part))
    if on_progress:
        on_progress(len(parts), len(parts))
    return replace(budget.total(translator.steps), text="".join(out))


class _Translator:
    """Translates the parts of one document, keeping each part's blocks and the whitespace between them."""

    def __init__(self, model: LanguageModel, target: str, source: str | None, params: GenerationParams,
                 count: budget.Count) -> None:
        self.model, self.target, self.source, self.params, self.count = model, target, source, params, count
        self.steps: list[Completion] = []

    def part(self, part: str) -> str:
        """A part of whole blocks (or of one block's sentences), translated block for block."""
        blocks = [(b.rstrip(), b[len(b.rstrip()):]) for b in paragraphs(part)]
        bodies = [body for body, _ in blocks]
        reply = self.ask("\n\n".join(bodies))
        answer = [p.strip() for p in BLANK_LINE.split(reply) if p.strip()]
        if len(answer) != len(bodies) or any(_headings(a) != _headings(b)
                                             for a, b in zip(answer, bodies, strict=True)):
            # the model merged, split or re-marked blocks: one block at a time keeps them
            if len(bodies) == 1 and not _headings(bodies[0]):
                answer = [_one_block(reply, bodies[0])]  # asking again would get the same answer
            else:
                answer = [self.block(body) for body in bodies]
        return "".join(_like(a, body) + sep for a, (body, sep) in zip(answer, blocks, strict=True))

    def block(self, body: str) -> str:
        """One block, its heading markers kept and no blank line in it; a line at a time for a block that
        mixes headings and text; the source itself if the model answers nothing."""
        lines = body.splitlines()
        if len(lines) > 1 and any(HEADING.match(line) for line in lines):
            return "\n".join(self.block(line) for line in lines)
        marker = HEADING.match(body)
        head = marker.group(0) if marker else ""
        return head + _one_block(self.ask(body[len(head):]), body[len(head):])

    def ask(self, text: str) -> str:
        params = self.params.replace(max_tokens=answer_tokens(self.count(text), self.params))
        self.steps.append(self.model.chat(request(text, self.target, self.source), params))
        return self.steps[-1].text


def _headings(block: str) -> list[int]:
    """The levels of the Markdown headings among a block's lines."""
    return [len(m.group(1)) for line in block.splitlines() if (m := HEADING.match(line))]


def _like(answer: str, body: str) -> str:
    """A heading's translation is one line, whatever the model added after it."""
    return answer.splitlines()[0] if "\n" not in body and HEADING.match(body) else answer


def _one_block(reply: str, body: str) -> str:
    """A reply made one block: no blank line, no heading marker; the source itself if it is empty."""
    text = BLANK_LINE.sub("\n", reply).strip()
    text = "\n".join(HEADING.sub("", line) for line in text.splitlines())
    return text or body
