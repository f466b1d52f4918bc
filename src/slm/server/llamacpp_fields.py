"""llama.cpp's request fields on the OpenAI endpoints (its server takes them on /v1/chat/completions and
/v1/completions): what slm honours under llama.cpp's name, what it takes because it changes nothing here, and
what it refuses by name. A client written for llama.cpp's server never has a field silently dropped.

Honoured (``schemas.OpenAISampling`` maps them): ``n_predict`` (max tokens; -1: no limit), ``grammar`` (GBNF),
``json_schema``, ``repeat_penalty``, ``samplers`` (names, aliases or letters: the order of temperature and the
truncations), ``n_cmpl`` (``n``), ``ignore_eos`` (``without_end``: the end-of-generation tokens are banned,
on a local model).
Taken, changing nothing here: slm reuses cached prompt prefixes whatever ``cache_prompt`` says (the answer is
the same); it has no slots (``id_slot``), never shifts the context (``n_keep``, ``n_discard``,
``n_cache_reuse``), and drafts as the server was started (``speculative.*``); ``verbose`` and
``backend_sampling`` change nothing either, nor do the knobs of samplers that are off (``xtc_threshold``,
``dry_base``, ``mirostat_tau``, ...). Fields no server of this list knows are ignored, as OpenAI's are.
Taken at the value that turns them off, refused otherwise (``NEUTRAL``): the samplers slm does not have
(DRY, XTC, mirostat, dynamic temperature, top-n-sigma, adaptive-p, min_keep) and the response extras it does
not write (timings per token, tokens, progress, post-sampling probabilities, response_fields, n_probs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from slm.errors import InvalidParameter
from slm.generation.params import GenerationParams


def _off(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


def _below(limit: float) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int | float) and value < limit


def _empty(value: Any) -> bool:
    return not value


NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dry_multiplier": (_off(0, 0.0), "0 (DRY is not a sampler of slm's)"),
    "xtc_probability": (_off(0, 0.0), "0 (XTC is not a sampler of slm's)"),
    "mirostat": (_off(0), "0 (mirostat is not a sampler of slm's)"),
    "dynatemp_range": (_off(0, 0.0), "0 (dynamic temperature is not a sampler of slm's)"),
    "top_n_sigma": (_below(0), "negative (top-n-sigma is not a sampler of slm's)"),
    "adaptive_target": (_below(0), "negative (adaptive-p is not a sampler of slm's)"),
    "min_keep": (_off(0), "0 (slm's truncations keep no minimum count)"),
    "n_probs": (_off(0), "0 (ask for logprobs and top_logprobs instead)"),
    "post_sampling_probs": (_off(False), "false (logprobs are of the processed distribution)"),
    "timings_per_token": (_off(False), "false (usage and /metrics report timings)"),
    "return_tokens": (_off(False), "false (POST /tokenize gives the ids of a text)"),
    "return_progress": (_off(False), "false"),
    "response_fields": (_empty, "empty (every field is returned)"),
    "n_indent": (_off(0), "0 (no indentation rule for infill)"),
    "t_max_predict_ms": (_below(1), "0 or -1 (use the server's --timeout, or max_tokens)"),
    "lora": (_empty, "empty (serve adapters with slm serve --adapter and name one as the model)"),
    "grammar_lazy": (_off(False), "false"),
    "grammar_triggers": (_empty, "empty"),
    "preserved_tokens": (_empty, "empty"),
    "input_prefix": (_empty, "empty (infill is not supported)"),
    "input_suffix": (_empty, "empty (infill is not supported)"),
    "input_extra": (_empty, "empty (infill is not supported)"),
    "image_data": (_empty, "empty (send images as image_url parts)"),
    "chat_template_kwargs": (_empty, "empty (the model's chat template is rendered as it is)"),
    "chat_format": (_empty, "unset"),
    "chat_parser": (_empty, "unset"),
    "reasoning_format": (_off(None, "none", "auto"), "none or auto (slm does not split reasoning out)"),
    "reasoning_budget_tokens": (_off(-1), "-1"),
    "continue_final_message": (_off(None, False), "false"),
}
"""A llama.cpp field slm takes only at the value that turns it off: the test, and what that value is."""


_SAMPLER_NAMES = {"top_k": "top_k", "top_p": "top_p", "nucleus": "top_p", "min_p": "min_p", "typ_p": "typical_p",
                  "typical_p": "typical_p", "typ": "typical_p", "temperature": "temperature", "temp": "temperature",
                  "penalties": "penalties", "dry": "dry", "xtc": "xtc", "top_n_sigma": "top_n_sigma",
                  "infill": "infill", "adaptive_p": "adaptive_p"}
_SAMPLER_CHARS = {"k": "top_k", "p": "top_p", "m": "min_p", "y": "typical_p", "t": "temperature", "e": "penalties",
                  "d": "dry", "x": "xtc", "s": "top_n_sigma", "i": "infill", "a": "adaptive_p"}
_SPELLINGS = {name.replace("_", ""): sampler for name, sampler in _SAMPLER_NAMES.items()}
OFF_SAMPLERS = frozenset({"dry", "xtc", "top_n_sigma"})
"""Samplers slm does not have, whose settings NEUTRAL keeps off: naming them in the order changes nothing."""


def check(extra: Mapping[str, Any]) -> None:
    """Refuses, naming it, a llama.cpp field set to a value slm cannot honour; fields of no other server are
    left to the caller (ignored, as OpenAI's own unknown fields are)."""
    for name, value in extra.items():
        if name in NEUTRAL:
            test, neutral = NEUTRAL[name]
            if not test(value):
                raise InvalidParameter(name, f"is not supported by this server; it takes only {neutral}")


def sampler_order(samplers: str | Sequence[str]) -> tuple[str, ...]:
    """llama.cpp's ``samplers`` (names in any of its spellings, or one letter each) -> slm's order of
    temperature and the truncations. Penalties stay first, where slm applies them (``check_penalties``)."""
    names = list(samplers) if isinstance(samplers, str) else samplers
    spelled = []
    for i, raw in enumerate(names):
        key = raw if isinstance(samplers, str) else raw.lower().replace("-", "").replace("_", "")
        sampler = _SAMPLER_CHARS.get(key) if isinstance(samplers, str) else _SPELLINGS.get(key)
        if sampler is None:
            raise InvalidParameter(f"samplers[{i}]", f"{raw!r} is not one of llama.cpp's samplers "
                                   f"({', '.join(sorted(_SAMPLER_NAMES))}, or their letters)")
        if sampler in ("infill", "adaptive_p"):
            raise InvalidParameter(f"samplers[{i}]", f"the {sampler} sampler is not supported by this server")
        spelled.append(sampler)
    return tuple(s for s in spelled if s not in OFF_SAMPLERS)


def apply_samplers(params: GenerationParams, order: tuple[str, ...]) -> GenerationParams:
    """``params`` running only the samplers of ``order``, in that order. Penalties, when set, must come first
    in the order (slm applies them to the logits first); left out, they are off as llama.cpp leaves them off."""
    on = list(order)  # sampler_order's: slm's samplers and "penalties"
    if _penalized(params) and "penalties" in on and on.index("penalties") != 0:
        raise InvalidParameter("samplers", "penalties must come before the other samplers here (slm applies "
                               "repetition, frequency and presence penalties to the logits first)")
    changes: dict[str, Any] = {"samplers": tuple(s for s in on if s != "penalties")}
    if "penalties" not in on:
        changes.update(repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    if "temperature" not in on and params.temperature == 0.0:
        changes["temperature"] = 1.0  # no temperature sampler: llama.cpp draws from the distribution as it is
    return params.replace(**changes)


def apply_repeat_window(repeat_last_n: int | None, params: GenerationParams) -> GenerationParams:
    """llama.cpp's penalties look at the last ``repeat_last_n`` tokens (64 by default; 0 turns them off, -1 is
    the whole context); slm's repetition penalty looks at the whole sequence, its frequency and presence
    penalties at the generated tokens. With a penalty on, -1 and 0 are honoured, other windows refused."""
    if repeat_last_n is None or repeat_last_n == -1 or not _penalized(params):
        return params
    if repeat_last_n == 0:
        return params.replace(repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    raise InvalidParameter("repeat_last_n", f"must be -1 (or 0: no penalties) with a penalty on: slm's penalties "
                           f"look at the whole sequence, not the last {repeat_last_n} tokens")


def without_end(params: GenerationParams, end_of_generation: frozenset[int]) -> GenerationParams:
    """``params`` that never end the answer with one of ``end_of_generation`` (llama.cpp's ``ignore_eos``: it
    runs to ``max_tokens``, a stop string or the context's end)."""
    banned = sorted(end_of_generation)

    def ban(token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        logits[banned] = -np.inf
        return logits

    return params.replace(logits_processors=(*params.logits_processors, ban))


def _penalized(params: GenerationParams) -> bool:
    """Whether a repetition, frequency or presence penalty is on."""
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)
