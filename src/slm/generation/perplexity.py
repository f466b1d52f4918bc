"""Perplexity of a model over a text, as llama.cpp's ``llama-perplexity`` computes it, on any engine.

The text's tokens are cut into windows of ``n_ctx`` tokens (the tokens after the last whole window are left
out); each window is read on its own, from an empty cache, with its first token replaced by the beginning
of text when the model puts one in front of a text, and only the second half of each window is scored (so
every scored token has at least ``n_ctx / 2`` tokens of context): the negative log-likelihood of the tokens
at positions ``n_ctx/2 + 1 .. n_ctx - 1`` given the ones before them. The perplexity is ``exp`` of their
mean, with llama.cpp's error estimate (the standard error of that mean, times the perplexity).

    result = perplexity(engine, tokens, n_ctx=512)   # -> Perplexity(value=..., error=..., scored=...)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from slm.engines.base import Engine
from slm.errors import InvalidParameter

DEFAULT_WINDOW = 512
"""llama-perplexity's default ``-c``."""


@dataclass(frozen=True)
class Perplexity:
    value: float
    """exp(mean negative log-likelihood) of the scored tokens."""
    error: float
    """llama.cpp's ``+/-``: the standard error of the mean NLL, times the perplexity."""
    nll: float
    """The mean negative log-likelihood, in nats per token."""
    scored: int
    """Tokens scored: ``windows * (n_ctx - 1 - n_ctx // 2)``."""
    windows: int
    n_ctx: int
    tokens: int
    """Tokens in the whole text."""


def windows_in(tokens: int, n_ctx: int) -> int:
    """How many whole windows of ``n_ctx`` tokens a text of ``tokens`` tokens has."""
    return tokens // n_ctx


def check(tokens: int, n_ctx: int, context: int | None, windows: int | None = None) -> int:
    """The windows to score, once ``n_ctx`` fits the model and the text holds two windows at least
    (llama-perplexity's minimum); InvalidParameter naming what does not."""
    if n_ctx < 8:
        raise InvalidParameter("n_ctx", f"a window must hold at least 8 tokens, got {n_ctx}")
    if context is not None and n_ctx > context:
        raise InvalidParameter("n_ctx", f"a window of {n_ctx} tokens exceeds the model's context of {context}")
    if windows is not None and windows < 1:
        raise InvalidParameter("windows", f"must be at least 1, got {windows}")
    whole = windows_in(tokens, n_ctx)
    if whole < 2:
        raise InvalidParameter("text", f"has {tokens} tokens; a perplexity over windows of {n_ctx} needs at least "
                                       f"{2 * n_ctx} (two windows): give a longer text or a smaller window")
    return min(whole, windows) if windows is not None else whole


def perplexity(engine: Engine, tokens: Sequence[int], n_ctx: int = DEFAULT_WINDOW, windows: int | None = None,
               progress: Callable[[int, int, float], None] | None = None, adapter: str | None = None) -> Perplexity:
    """The perplexity of ``engine``'s model over ``tokens`` (the text's, as the model tokenizes it, with its
    beginning of text if it adds one), in windows of ``n_ctx``, the first ``windows`` of them (all by
    default), through LoRA adapter ``adapter`` if one is named. ``progress(done, total, running perplexity)`` is
    called after each window."""
    total = check(len(tokens), n_ctx, engine.info.context_length, windows)
    special = engine.info.special
    bos = special.bos_id if special.add_bos else None
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for w in range(total):
        window = list(tokens[w * n_ctx : (w + 1) * n_ctx])
        if bos is not None:
            window[0] = bos
        seq = engine.new_sequence(adapter)
        try:
            # the logits after positions first .. n_ctx - 1; the last one predicts nothing in the window
            logits = engine.evaluate([(seq, window)], keep=[n_ctx - first])[:-1]
        finally:
            engine.free(seq)
        losses = _losses(logits, window[first + 1 :])
        nll += float(losses.sum())
        nll2 += float((losses**2).sum())
        count += len(losses)
        if progress is not None:
            progress(w + 1, total, math.exp(nll / count))
    mean, mean2 = nll / count, nll2 / count
    variance = mean2 - mean * mean
    spread = math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    value = math.exp(mean)
    return Perplexity(value=value, error=spread * value, nll=mean, scored=count, windows=total, n_ctx=n_ctx,
                      tokens=len(tokens))


def _losses(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64."""
    rows = logits.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    picked = rows[np.arange(len(targets)), np.asarray(targets)]
    return np.asarray(log_sum - picked)
