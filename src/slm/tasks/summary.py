"""Summaries of texts of any length: one prompt when the text fits the context; otherwise map-reduce,
each part summarized, then the joined summaries, as many rounds as it takes to fit one prompt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slm.errors import InvalidParameter, SlmError
from slm.generation.params import GenerationParams
from slm.generation.stream import Completion
from slm.model import LanguageModel, Messages
from slm.tasks import budget
from slm.tasks.split import split

Progress = Callable[[int, int], None]
"""Called with (requests done, requests planned); the plan grows when another round is needed."""

STEP_TOKENS = 256
"""The longest a partial summary may be when max_tokens does not say."""
MAX_PART = 2048
"""Tokens of one part at most: a small model summarizes a few pages better than a whole context of them."""


def request(text: str, words: int | None = None) -> Messages:
    """The one-prompt summary request (``slm summarize`` of a short text)."""
    length = f" in about {words} words" if words else " in a few sentences"
    return [{"role": "user", "content": f"Summarize the following text{length}.\n\n{text.strip()}"}]


def part_request(text: str) -> Messages:
    return [{"role": "user", "content": "Summarize the following part of a longer text in a few sentences.\n\n"
                                        f"{text.strip()}"}]


def joined_request(summaries: str, words: int | None = None) -> Messages:
    length = f" in about {words} words" if words else " in a few sentences"
    return [{"role": "user", "content": "The following are summaries of consecutive parts of one text. "
                                        f"Summarize the whole text{length}.\n\n{summaries.strip()}"}]


def fits(model: LanguageModel, text: str, words: int | None = None, params: GenerationParams | None = None) -> bool:
    """Whether ``text`` is summarized in one prompt (as ``summarize`` would)."""
    answer = (params.max_tokens if params else None) or STEP_TOKENS
    return budget.fits(model, request(text, words), answer)


def summarize(model: LanguageModel, text: str, words: int | None = None, on_progress: Progress | None = None,
              params: GenerationParams | None = None, **overrides: Any) -> Completion:
    """A summary of ``text`` (about ``words`` words) by ``model``, however long the text. ``max_tokens``
    bounds the answer (and each partial summary, which is at most 256 tokens). The completion is the last
    request's, with the usage of all of them."""
    params = GenerationParams.of(params, **overrides)
    if fits(model, text, words, params):
        return model.chat(request(text, words), params)
    step = min(params.max_tokens or STEP_TOKENS, STEP_TOKENS)
    final = params.max_tokens or STEP_TOKENS
    size = min(MAX_PART, budget.room(model, part_request(""), step))
    if size < 2 * step or budget.room(model, joined_request("", words), final) < step:
        raise InvalidParameter("max_tokens", f"{final} leaves too little of a {budget.context(model)}-token "
                               "context to summarize a long text in parts")
    count = budget.counter(model)
    steps: list[Completion] = []
    done = 0
    while True:
        parts = split(text, count, size)
        planned = done + len(parts) + 1
        if on_progress:
            on_progress(done, planned)
        summaries = []
        for part in parts:
            if count(part) <= step:  # already as short as its summary would be
                summaries.append(part.strip())
            else:
                steps.append(model.chat(part_request(part), params.replace(max_tokens=step)))
                summaries.append(steps[-1].text.strip())
            done += 1
            if on_progress:
                on_progress(done, planned)
        joined = "\n\n".join(s for s in summaries if s)
        if budget.fits(model, joined_request(joined, words), final):
            steps.append(model.chat(joined_request(joined, words), params))
            if on_progress:
                on_progress(done + 1, planned)
            return budget.total(steps)
        if count(joined) >= count(text):
            raise SlmError("the partial summaries are no shorter than the text; lower max_tokens")
        text = joined
