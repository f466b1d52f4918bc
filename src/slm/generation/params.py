"""Generation parameters: one typed object, validated where it is built.

The defaults follow llama.cpp and Ollama (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), so a
model sounds the same here as there; ``temperature=0`` is greedy decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from slm.errors import InvalidParameter
from slm.generation.constraints import Grammar

#: A logits processor: all token ids of the sequence so far and the next-token logits (V,),
#: returning the logits to use. It may modify its argument in place and return it.
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]

MAX_TOP_LOGPROBS = 20
SAMPLERS = ("temperature", "top_k", "top_p", "min_p", "typical_p")
"""The truncation samplers, in the order they run by default (Hugging Face's)."""
MAX_LOOKUP = 32
"""The most tokens a prompt-lookup draft proposes in one step."""


@dataclass(frozen=True)
class GenerationParams:
    """How to pick each next token and when to stop."""

    max_tokens: int | None = None
    """Most tokens to generate; None means up to the end of the context."""
    temperature: float = 0.8
    top_k: int = 40
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    samplers: tuple[str, ...] = SAMPLERS
    """The order temperature and the truncations run in; one left out does not run (as llama.cpp's
    ``samplers``)."""
    repetition_penalty: float = 1.0
    """Divides the logit of every token already in the sequence (prompt included) when positive."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence of a token among the generated ones (OpenAI semantics)."""
    presence_penalty: float = 0.0
    """Subtracted once from every token already generated."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: Sequence[str] = ()
    """Strings that end generation; the text returned stops just before them."""
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    logits_processors: Sequence[LogitsProcessor] = ()
    grammar: Grammar | None = None
    """What the answer must be (a JSON schema, a regex, a choice, a grammar): every token is masked to it."""
    truncate: bool = False
    """If the prompt does not fit the context, drop its oldest tokens instead of failing."""
    lookup: int = 0
    """Speculative decoding by prompt lookup: up to this many tokens a step, proposed from earlier text of
    the sequence (0: off). Greedy output is unchanged; sampled output keeps its distribution."""
    speculative: bool = True
    """Draft with the model's draft model, when it was loaded with one (``load(..., draft=...)``)."""
    adapter: str | None = None
    """The LoRA adapter (one loaded with the model: ``load(..., adapters=[...])``) the answer is computed
    through; None: the model alone."""
    num_beams: int = 1
    """Beam search with this many beams (``generation.beam``); 1 decodes one sequence."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores ``sum of logprobs / generated tokens ** length_penalty``."""
    early_stopping: bool | str = False
    """Beam search, as transformers: True stops once ``num_beams`` beams are finished; False once the best
    running beam cannot beat them at its current length; "never" once it cannot at any length."""
    num_return_sequences: int = 1
    """Beam search: how many of the best finished beams to return (at most ``num_beams``)."""
    no_repeat_ngram_size: int = 0
    """No n-gram of this size (prompt included) occurs twice; 0 turns it off."""
    min_new_tokens: int = 0
    """Beam search: no end-of-generation token before this many tokens."""
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """The names set through ``of`` (even to their default value): what a remote model is sent."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, low=1)
        _number("temperature", self.temperature, low=0.0)
        _int("top_k", self.top_k, low=0)
        _number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("typical_p", self.typical_p, low=0.0, low_open=True, high=1.0)
        self._check_samplers()
        _number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _int("seed", self.seed, low=0)
        if not isinstance(self.logprobs, bool):
            raise InvalidParameter("logprobs", f"must be true or false, got {self.logprobs!r}")
        _int("top_logprobs", self.top_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise InvalidParameter("grammar", f"must be a Grammar, got {type(self.grammar).__name__}")
        if not isinstance(self.truncate, bool):
            raise InvalidParameter("truncate", f"must be true or false, got {self.truncate!r}")
        _int("lookup", self.lookup, low=0, high=MAX_LOOKUP)
        if not isinstance(self.speculative, bool):
            raise InvalidParameter("speculative", f"must be true or false, got {self.speculative!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise InvalidParameter("adapter", f"must be an adapter's name, got {self.adapter!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or ()
        if not isinstance(stop, Sequence | set) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidParameter("stop", "must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidParameter("logit_bias", "must map token ids to numbers")
        bias = {}
        for token, value in self.logit_bias.items():
            token_id = _token_id(token)
            if token_id is None:
                raise InvalidParameter("logit_bias", f"key {token!r} is not a token id") from None
            _number(f"logit_bias[{token_id}]", value, low=-100.0, high=100.0)
            bias[token_id] = float(value)
        object.__setattr__(self, "logit_bias", bias)
        if self.logits_processors is None:
            object.__setattr__(self, "logits_processors", ())
        if not all(callable(p) for p in self.logits_processors):
            raise InvalidParameter("logits_processors", "must be callables (token_ids, logits) -> logits")
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors))
        self._check_beams()

    def _check_samplers(self) -> None:
        samplers = self.samplers
        if isinstance(samplers, str) or not isinstance(samplers, Sequence) or not all(
                isinstance(name, str) for name in samplers):
            raise InvalidParameter("samplers", f"must be a list of sampler names ({', '.join(SAMPLERS)})")
        for i, name in enumerate(samplers):
            if name not in SAMPLERS:
                raise InvalidParameter(f"samplers[{i}]", f"{name!r} is not one of {', '.join(SAMPLERS)}")
            if name in samplers[:i]:
                raise InvalidParameter(f"samplers[{i}]", f"{name!r} is named twice")
        object.__setattr__(self, "samplers", tuple(samplers))

    def _check_beams(self) -> None:
        _int("num_beams", self.num_beams, low=1)
        _number("length_penalty", self.length_penalty)
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, bool | str):
            raise InvalidParameter("early_stopping", f'must be true, false or "never", got {self.early_stopping!r}')
        _int("num_return_sequences", self.num_return_sequences, low=1)
        if self.num_return_sequences > self.num_beams:
            raise InvalidParameter("num_return_sequences", f"must be at most num_beams ({self.num_beams}), "
                                   f"got {self.num_return_sequences}")
        _int("no_repeat_ngram_size", self.no_repeat_ngram_size, low=0)
        _int("min_new_tokens", self.min_new_tokens, low=0)
        if self.num_beams == 1:
            if self.min_new_tokens:
                raise InvalidParameter("min_new_tokens", "applies to beam search (num_beams > 1)")
            return
        # Beam search keeps the most likely sequences: a field that asks for a random draw, a grammar, stop
        # strings or logprobs has no meaning there, so it is refused rather than ignored. A sampling field
        # left at its default (not given) is no request for sampling.
        default = GenerationParams.__dataclass_fields__
        for name, neutral in _SAMPLING_NEUTRAL.items():
            value = getattr(self, name)
            if value != neutral and (name in self.given or value != default[name].default):
                raise InvalidParameter(name, f"cannot be combined with beam search (num_beams={self.num_beams}); "
                                       f"beam search does not sample (leave {name} unset or {neutral})")
        if self.grammar is not None:
            raise InvalidParameter(self.grammar.field, "cannot be combined with beam search (num_beams > 1)")
        for name in ("stop", "logprobs", "top_logprobs", "lookup"):
            if getattr(self, name):
                raise InvalidParameter(name, "is not supported with beam search (num_beams > 1)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> GenerationParams:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidParameter(name, "is not a generation parameter")
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    @classmethod
    def of(cls, params: GenerationParams | None = None, **overrides: Any) -> GenerationParams:
        """``params`` (or the defaults) with ``overrides`` applied; None values are ignored."""
        base = params or cls()
        given = {k: v for k, v in overrides.items() if v is not None}
        return base.replace(**given, given=base.given | set(given)) if given else base


_SAMPLING_NEUTRAL: dict[str, Any] = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0}
"""The sampling fields, each at the value that means no sampling (or no cut)."""


def _token_id(key: object) -> int | None:
    """A logit_bias key as a token id: an int >= 0, or its decimal string (JSON keys are strings)."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: object) -> str:
    """A value as an error quotes it: short, whatever was sent (a 400-digit integer, a long string)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):  # an int is finite
        raise InvalidParameter(name, f"must be a number, got {_shown(value)}")
    if isinstance(value, int) and abs(value) > 2**63:
        raise InvalidParameter(name, f"is out of range, got {_shown(value)}")
    assert isinstance(value, int | float)
    too_low = low is not None and (value < low or (low_open and value == low))
    too_high = high is not None and value > high
    if too_low or too_high:
        if low is not None and high is not None:
            bound = f"in {'(' if low_open else '['}{low}, {high}]"
        elif low is not None:
            bound = f"{'>' if low_open else '>='} {low}"
        else:
            bound = f"<= {high}"
        raise InvalidParameter(name, f"must be {bound}, got {_shown(value)}")


def _int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(name, f"must be an integer, got {_shown(value)}")
    _number(name, value, low, high)
