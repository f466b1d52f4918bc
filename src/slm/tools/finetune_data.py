"""Training data for ``slm finetune``: JSONL rows -> token ids and labels (-100 where no loss is taken).

Three formats, detected per file from its first row and then required of every row:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}  chat
    {"prompt": "...", "completion": "..."}                                                       completion
    {"text": "..."}                                                                              text

A chat row is rendered with the model's own chat template and the loss is taken on its assistant turns only:
each turn's span is found by rendering the conversation up to it (with the generation prompt) and up to its
end, so whatever the template puts around a turn is attributed to the right side without knowing the
template. A completion takes the loss on the completion (and the end-of-sequence token after it), a text on
all of it. A bad row is an InvalidParameter naming its line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from slm.errors import InvalidParameter

IGNORE = -100
"""The label of a token that takes no loss (PyTorch's cross-entropy ``ignore_index``)."""
FORMATS = {"messages": "chat", "prompt": "completion", "text": "text"}


class Tokenizer(Protocol):
    """What this module needs of a Hugging Face tokenizer."""

    eos_token_id: int | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Example:
    """One training sequence: ids, and the label of each (the id itself, or IGNORE)."""

    line: int
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    format: str
    truncated: int
    """How many rows were cut to ``max_length``."""


def read(path: Path, tokenizer: Tokenizer, max_length: int, truncate: bool = True) -> Dataset:
    """Every row of the JSONL file ``path`` as an Example of at most ``max_length`` tokens."""
    if max_length < 2:
        raise InvalidParameter("--max-length", f"must be at least 2, not {max_length}")
    kind: str | None = None
    examples: list[Example] = []
    truncated = 0
    for line, row in _rows(path):
        row_kind = _kind(path, line, row)
        if kind is None:
            kind = row_kind
        elif row_kind != kind:
            raise InvalidParameter("DATA", f"{path}:{line}: a {row_kind} row in a {kind} file (the first row "
                                           "decides: messages, prompt/completion or text)")
        ids, labels = _encode(path, line, row, kind, tokenizer)
        if len(ids) > max_length:
            if not truncate:
                raise InvalidParameter("DATA", f"{path}:{line}: {len(ids)} tokens, more than --max-length "
                                               f"{max_length} (drop --no-truncate to cut it)")
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        examples.append(Example(line, ids, labels))
    if kind is None:
        raise InvalidParameter("DATA", f"{path} has no rows")
    return Dataset(examples, kind, truncated)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameter("DATA", f"cannot read {path}: {e}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InvalidParameter("DATA", f"{path}:{number}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise InvalidParameter("DATA", f"{path}:{number}: a JSON object is needed, not {type(row).__name__}")
        yield number, row


def _kind(path: Path, line: int, row: dict[str, Any]) -> str:
    for key, kind in FORMATS.items():
        if key in row:
            fields = ("prompt", "completion") if kind == "completion" else (key,)
            for field in fields:
                if field not in row:
                    raise InvalidParameter("DATA", f"{path}:{line}: missing field {field!r}")
            if kind == "chat":
                _check_messages(path, line, row["messages"])
            else:
                for field in fields:
                    if not isinstance(row[field], str):
                        raise InvalidParameter("DATA", f"{path}:{line}: {field!r} must be a string, "
                                                       f"not {type(row[field]).__name__}")
            return kind
    raise InvalidParameter("DATA", f"{path}:{line}: missing field: a row needs 'messages', 'prompt' and "
                                   "'completion', or 'text'")


def _check_messages(path: Path, line: int, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("DATA", f"{path}:{line}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise InvalidParameter("DATA", f"{path}:{line}: messages[{i}] needs a string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidParameter("DATA", f"{path}:{line}: no assistant message to learn from")


def _encode(path: Path, line: int, row: dict[str, Any], kind: str,
            tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "text":
        ids = _ids(tokenizer, row["text"], special=True) + eos
        return ids, list(ids)
    if kind == "completion":
        prompt = _ids(tokenizer, row["prompt"], special=True)
        completion = _ids(tokenizer, row["completion"], special=False) + eos
        return prompt + completion, [IGNORE] * len(prompt) + completion
    return _encode_chat(path, line, row["messages"], tokenizer)


def _encode_chat(path: Path, line: int, messages: list[dict[str, Any]],
                 tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The whole conversation's ids, labelled on the characters of each assistant turn."""
    full = _render(path, line, tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(path, line, tokenizer, messages[:i], True) if i else ""
        through = _render(path, line, tokenizer, messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise InvalidParameter("DATA", f"{path}:{line}: the chat template does not render this conversation "
                                           "turn by turn (an earlier turn changes with a later one)")
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [token if any(s <= begin < e for s, e in spans) else IGNORE
              for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)]
    return ids, labels


def _render(path: Path, line: int, tokenizer: Tokenizer, messages: list[dict[str, Any]], prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as e:  # the template's own exception (jinja2's, or raise_exception in a template)
        raise InvalidParameter("DATA", f"{path}:{line}: the model's chat template cannot render this row: "
                                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(text, str):
        raise InvalidParameter("DATA", f"{path}:{line}: the chat template rendered no text")
    return text


def _ids(tokenizer: Tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])
