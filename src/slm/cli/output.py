"""How the CLI talks: one-line errors, stats, JSON, tables."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from slm.generation import Completion
from slm.generation.beam import BeamCompletion
from slm.model import Choices

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on one line and exit."""
    stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # its [brackets] are text
    sys.exit(code)


def completion_json(model: str, completion: Completion) -> dict[str, Any]:
    usage = completion.usage
    result: dict[str, Any] = {
        "model": model,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "timings": asdict(completion.timings),
    }
    if completion.served_by:
        result["served_by"] = completion.served_by
    if completion.tool_calls:
        result["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in completion.tool_calls]
    if isinstance(completion, Choices):
        result["choices"] = [{k: v for k, v in completion_json(model, c).items() if k != "model"}
                             for c in completion.choices]
    if isinstance(completion, BeamCompletion):
        result["beams"] = [{"text": b.text, "tokens": b.tokens, "score": b.score, "finish_reason": b.finish_reason}
                           for b in completion.beams]
    if completion.logprobs:
        result["logprobs"] = [
            {"token": lp.token, "logprob": lp.logprob, "top": [{"token": t, "logprob": p} for t, p in lp.top]}
            for lp in completion.logprobs
        ]
    return result


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def print_stats(completion: Completion) -> None:
    """The --verbose line: token counts, time to first token, speeds."""
    u, t = completion.usage, completion.timings
    stderr.print(
        f"[dim]{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated ({completion.finish_reason}) · "
        f"time to first token {t.time_to_first_token * 1000:.0f} ms · "
        f"prompt {t.prompt_tokens_per_second:.0f} tok/s · generation {t.decode_tokens_per_second:.1f} tok/s"
        + (f" · drafts: {t.draft_tokens_accepted} of {t.draft_tokens} tokens kept" if t.draft_tokens else "")
        + (f" · answered by {completion.served_by}" if completion.served_by else "") + "[/]"
    )


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB", "MB") else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError
