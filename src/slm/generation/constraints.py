"""Constrained decoding: a grammar every generated token must keep the text inside of.

A ``Grammar`` says what the answer may be (a JSON schema, any JSON object, a regex, one of some strings, a
Lark or GBNF grammar); it is checked when it is made, so a request with a bad one fails before it is
queued. Each sequence that generates under it gets a ``GrammarConstraint``: an ordinary logits processor
that sets every token the grammar does not allow next to -inf, so the generator, every engine and the
scheduler carry it unchanged. It follows the tokens the sequence actually holds (what was sampled, and
what a rewind or a scheduler's pause and recompute left), so it never drifts from the text.

The grammars are llguidance's (the library llama.cpp, vLLM, SGLang and ONNX Runtime GenAI use). Its
tokenizer is built once per engine from that engine's own vocabulary, so a mask always means the ids the
engine samples. A batching caller computes the masks of all its constrained sequences in one call
(``fill_masks``: llguidance's parallel fill, without the GIL) into one buffer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np

from slm.engines.base import Engine, common_prefix, default_threads
from slm.errors import InvalidParameter

JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON on one line with a space after ``,`` and ``:``: what models write unprompted, and never an answer
that runs on in whitespace until it hits ``max_tokens``."""


@dataclass(frozen=True)
class Grammar:
    """What a generated text may be, checked when made: ``InvalidParameter`` naming ``field`` (the request
    field it came from) when it does not compile."""

    kind: str
    """json_schema, json, regex, choice, lark or gbnf."""
    spec: str
    """The grammar in llguidance's form."""
    field: str
    """The request field it came from, named in errors."""
    schema: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False)
    """The JSON schema, when it is one (the answer can be checked against it)."""
    trigger: str | None = None
    """A regular expression (Python's) over the text generated so far: until it matches, the model writes
    freely; then the grammar holds from the token where the match begins (that token may start with
    whitespace the grammar allows). None: the grammar holds from the first token."""

    def __post_init__(self) -> None:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.spec)
        if failed:
            raise InvalidParameter(self.field, _clean(messages[0]))

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str, field: str = "response_format") -> Grammar:
        """Text that is one JSON value matching ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidParameter(field, f"is not valid JSON: {e.msg} at position {e.pos}") from None
        if not isinstance(schema, Mapping):
            raise InvalidParameter(field, f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(tightened(schema), overrides=JSON_STYLE)  # type: ignore[arg-type]
        except ValueError as e:
            raise InvalidParameter(field, _clean(str(e))) from None
        return cls("json_schema", spec, field, dict(schema))

    @classmethod
    def any_json(cls, field: str = "response_format") -> Grammar:
        """Any JSON object (OpenAI's ``json_object``, Ollama's ``format: "json"``)."""
        return cls.json_schema({"type": "object"}, field)

    @classmethod
    def regex(cls, pattern: str, field: str = "regex") -> Grammar:
        """Text that matches ``pattern`` as a whole (Rust regex syntax, as llguidance reads it)."""
        if not isinstance(pattern, str) or not pattern:
            raise InvalidParameter(field, "must be a non-empty regular expression")
        try:  # checked by llguidance's own (Rust) regex parser, not Python's, whose syntax differs (\p{Lu})
            return cls("regex", llguidance.LLMatcher.grammar_from_regex(pattern), field)
        except InvalidParameter as e:
            raise InvalidParameter(field, f"is not a valid regular expression: {e.reason}") from None

    @classmethod
    def choice(cls, options: Sequence[str], field: str = "choices") -> Grammar:
        """Exactly one of ``options``."""
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise InvalidParameter(field, "must be a list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))
        return cls("choice", llguidance.LLMatcher.grammar_from_lark(lark), field)

    @classmethod
    def lark(cls, text: str, field: str = "grammar", trigger: str | None = None) -> Grammar:
        """A Lark grammar (llguidance's dialect: ``start`` is the whole text)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidParameter(field, "must be a non-empty grammar")
        if trigger is not None:
            re.compile(trigger)
        return cls("lark", llguidance.LLMatcher.grammar_from_lark(text), field, trigger=trigger)

    @classmethod
    def gbnf(cls, text: str, field: str = "grammar") -> Grammar:
        """A llama.cpp GBNF grammar (``root ::= ...``), converted to Lark."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidParameter(field, "must be a non-empty grammar")
        try:
            spec = llguidance.grammar_from("gbnf", text)
        except ValueError as e:
            raise InvalidParameter(field, _clean(str(e))) from None
        return cls("gbnf", spec, field)

    @classmethod
    def of_text(cls, text: str, field: str = "grammar") -> Grammar:
        """A grammar file's text: GBNF when it has a ``::=`` rule, Lark otherwise."""
        return cls.gbnf(text, field) if "::=" in text else cls.lark(text, field)


def tightened(schema: Any) -> Any:
    """``schema`` narrowed where a small model would otherwise never stop, as OpenAI's strict mode narrows
    it: every object that lists its properties is closed to others unless it says otherwise (``allOf``
    members stay open, as closing each would refuse the others' properties), and numbers get at most 16
    digits before the point and 6 after it unless the schema bounds them itself. It allows a subset of
    what ``schema`` allows, so every answer still validates; without it a small model writes made-up
    properties, or digits, until ``max_tokens``."""
    if isinstance(schema, list):
        return [tightened(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: tightened(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), Mapping):
            out[key] = {name: tightened(sub) for name, sub in out[key].items()}
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    kinds = out.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if kinds & {"number", "integer"}:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -NUMBER_LIMIT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = NUMBER_LIMIT
        if "number" in kinds and "multipleOf" not in out:
            out["multipleOf"] = 1e-6
    return out


NUMBER_LIMIT = 10**15

_SUBSCHEMAS = frozenset({"items", "prefixItems", "anyOf", "oneOf", "not", "additionalProperties",
                         "contains", "if", "then", "else"})


def requested_grammar(response_format: object = None, grammar: object = None, regex: object = None,
                      choices: object = None) -> tuple[Grammar | None, Any]:
    """The grammar the Python API's options ask for, and what a finished answer is parsed into: a pydantic
    model class, ``json`` (for any JSON schema), or None. At most one option may be given.

    ``response_format``: a JSON schema (dict), a pydantic model class, ``"json"`` (any object), ``"text"``,
    or OpenAI's ``{"type": "json_object" | "json_schema" | "text", ...}``. ``grammar``: a ``Grammar``, or the
    text of a Lark or GBNF grammar. ``regex``: a pattern the whole answer matches. ``choices``: strings, one
    of which is the answer."""
    given = [(n, v) for n, v in (("response_format", response_format), ("grammar", grammar), ("regex", regex),
                                  ("choices", choices)) if v is not None]
    if len(given) > 1:
        raise InvalidParameter(given[1][0], f"cannot be combined with {given[0][0]}: give one constraint")
    if not given:
        return None, None
    name, value = given[0]
    if name == "grammar":
        if isinstance(value, Grammar):
            return value, None
        if not isinstance(value, str):
            raise InvalidParameter("grammar", "must be a Grammar or the text of a Lark or GBNF grammar")
        return Grammar.of_text(value), None
    if name == "regex":
        return Grammar.regex(value), None  # type: ignore[arg-type]
    if name == "choices":
        return Grammar.choice(value), None  # type: ignore[arg-type]
    return _response_format(value)


def _response_format(value: object) -> tuple[Grammar | None, Any]:
    schema_of = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema_of):  # a pydantic model class
        return Grammar.json_schema(schema_of()), value
    if value == "text":
        return None, None
    if value == "json":
        return Grammar.any_json(), json
    if not isinstance(value, Mapping):
        raise InvalidParameter("response_format", "must be a JSON schema, a pydantic model class, 'json' or 'text'")
    kind = value.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return Grammar.any_json(), json
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise InvalidParameter("response_format.json_schema", "must be an object {name, schema, strict}")
        return Grammar.json_schema(spec.get("schema") or {"type": "object"}, "response_format.json_schema.schema"), json
    return Grammar.json_schema(value), json


def _clean(message: str) -> str:
    """llguidance's error as one line, without its parser-state dump."""
    line = " ".join(message.split("<state>")[0].split())
    return re.sub(r"^((error|parser error): )+", "", line, flags=re.I).rstrip(";. ") or "the grammar failed"


# --- one tokenizer per engine ---------------------------------------------------------------

_tokenizers: weakref.WeakKeyDictionary[Engine, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


class _Vocabulary:
    """An engine's vocabulary in the form llguidance's ``TokenizerWrapper`` reads: each id's bytes, the
    end tokens, and a tokenize function (which llguidance calls with text)."""

    def __init__(self, engine: Engine) -> None:
        special = engine.info.special
        self.tokens = [engine.token_bytes(t) for t in range(engine.info.vocab_size)]  # control tokens: b""
        self.eos_token_id = special.eos_id if special.eos_id is not None else min(special.end_of_generation)
        self.bos_token_id = special.bos_id
        self.special_token_ids = [t for t, piece in enumerate(self.tokens) if not piece]
        self._engine = engine

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # the wrapper probes with bytes first, then falls back to text
        return self._engine.tokenize(text, add_special=False, parse_special=False)


def grammar_tokenizer(engine: Engine) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for ``engine``, built on first use (reading every token once) and kept
    while the engine lives. Call it on the thread that drives the engine."""
    with _tokenizers_lock:
        tokenizer = _tokenizers.get(engine)
        if tokenizer is None:
            vocabulary = _Vocabulary(engine)
            ends = sorted(engine.info.special.end_of_generation) or [vocabulary.eos_token_id]
            tokenizer = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(vocabulary), n_vocab=engine.info.vocab_size, eos_token=ends,
            )
            _tokenizers[engine] = tokenizer
        return tokenizer


# --- one sequence under a grammar -----------------------------------------------------------


class GrammarConstraint:
    """One sequence's place in a grammar, as a logits processor ``(token_ids, logits) -> logits``.

    The tokens it judges are those after the position of its first call (the prompt's end), or, with a
    trigger, those from the token where the trigger first matches the generated text; until then it
    changes nothing. Each call brings the matcher level with the sequence: it consumes what was added and
    rolls back what a rewind removed. A sequence that holds a token the grammar refuses (appended by its
    caller) is an InvalidParameter.
    """

    def __init__(self, grammar: Grammar, tokenizer: llguidance.LLTokenizer, vocab_size: int) -> None:
        self.grammar = grammar
        self._matcher = llguidance.LLMatcher(tokenizer, grammar.spec, log_level=0)
        if self._matcher.is_error():
            raise InvalidParameter(grammar.field, _clean(self._matcher.get_error()))
        self._tokenizer = tokenizer
        self._trigger = re.compile(grammar.trigger.encode()) if grammar.trigger else None
        self._prompt_end: int | None = None
        self._start: int | None = None  # where the grammar begins; None: not yet (waiting for the trigger)
        self._seen: list[int] = []  # with a trigger: the generated tokens read so far, and their bytes
        self._pieces: list[bytes] = []
        self._refused = 0  # with a trigger: generated tokens before this one start no match the grammar takes
        self._consumed: list[int] = []
        self._mask = allocate_masks(1, vocab_size)[0]
        self._mask_ready = False

    @property
    def active(self) -> bool:
        """Whether the grammar has begun (always, without a trigger, once the first token is asked for)."""
        return self._start is not None

    @property
    def accepting(self) -> bool:
        """Whether the text under the grammar is a whole sentence of it."""
        return self.active and bool(self._matcher.is_accepting())

    def sync(self, token_ids: Sequence[int]) -> None:
        """Follow the sequence: consume its new tokens, roll back those it no longer holds."""
        if self._prompt_end is None:
            self._prompt_end = len(token_ids)
            if self._trigger is None:
                self._start = self._prompt_end
        if self._trigger is not None:
            self._find_trigger(token_ids)
        if self._start is None:
            return
        generated = token_ids[self._start :]
        held = len(self._consumed)
        if len(generated) < held or list(generated[:held]) != self._consumed:
            keep = common_prefix(self._consumed, generated)
            if not self._matcher.rollback(held - keep):  # beyond its history: replay what is kept
                self._matcher.reset()
                replayed = self._matcher.consume_tokens(self._consumed[:keep]) if keep else True
                assert replayed, "tokens the grammar took once it takes again"
            del self._consumed[keep:]
            self._mask_ready = False
            held = keep
        new = [int(t) for t in generated[held:]]
        if new:
            if not self._matcher.consume_tokens(new):
                raise InvalidParameter("tokens", f"do not fit the grammar: {_clean(self._matcher.get_error())}")
            self._consumed.extend(new)
            self._mask_ready = False

    def _find_trigger(self, token_ids: Sequence[int]) -> None:
        """Begin the grammar at the token where the trigger first matches the generated text, if the grammar
        takes what was written from there on (if not, that match is passed over); end it again when a
        rewind goes back before that token."""
        assert self._trigger is not None and self._prompt_end is not None
        generated = list(token_ids[self._prompt_end :])
        keep = common_prefix(self._seen, generated)
        if keep < len(self._seen):
            del self._seen[keep:], self._pieces[keep:]
            self._refused = min(self._refused, keep)
            if self._start is not None and self._start - self._prompt_end >= keep:
                self._matcher.reset()
                self._consumed.clear()
                self._mask_ready = False
                self._start = None
        for token in generated[len(self._seen) :]:
            self._seen.append(token)
            self._pieces.append(self._tokenizer.decode_bytes([token]))
        if self._start is not None:
            return
        text = b"".join(self._pieces)
        offset = sum(len(p) for p in self._pieces[: self._refused])
        while (match := self._trigger.search(text, offset)) is not None:
            first, at = self._token_at(match.start())
            if not text[at : match.start()].strip() and self._matcher.consume_tokens(generated[first:]):
                self._start = self._prompt_end + first
                self._consumed = generated[first:]
                self._mask_ready = False
                return
            self._matcher.reset()  # the grammar does not take it: a refusal is for good (the text only grows)
            self._refused = first + 1
            offset = match.start() + 1

    def _token_at(self, position: int) -> tuple[int, int]:
        """The generated token that holds byte ``position`` of the text, and where that token begins."""
        at = 0
        for index, piece in enumerate(self._pieces):
            if position < at + len(piece):
                return index, at
            at += len(piece)
        return len(self._pieces) - 1, at - len(self._pieces[-1])

    def adopt_mask(self, row: np.ndarray) -> None:
        """Take the mask a batched ``fill_masks`` computed for this state."""
        self._mask = row
        self._mask_ready = True

    def __call__(self, token_ids: Sequence[int], logits: np.ndarray) -> np.ndarray:
        self.sync(token_ids)
        if self._start is None:
            return logits
        if not self._mask_ready:
            self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            self._mask_ready = True
        apply_mask(logits, self._mask)
        return logits


def allocate_masks(rows: int, vocab_size: int) -> np.ndarray:
    """Room for ``rows`` token masks: one bit per token id, 32 to an int32 word. (rows, ceil(V / 32))"""
    return np.full((rows, (vocab_size + 31) // 32), -1, dtype=np.int32)


def apply_mask(logits: np.ndarray, mask: np.ndarray) -> None:
    """Set the logit of every token ``mask`` refuses to -inf, in place. logits (V,), mask (ceil(V / 32),)"""
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=logits.shape[0]).view(bool)  # (V,)
    np.copyto(logits, -np.inf, where=~allowed)


_executor: llguidance.LLExecutor | None = None


def fill_masks(constraints: Sequence[tuple[GrammarConstraint, Sequence[int]]], vocab_size: int) -> None:
    """Bring each constraint level with its sequence's tokens and compute all their masks in one parallel
    call into one buffer; each constraint's next call then only applies its row."""
    global _executor
    if not constraints:
        return
    for constraint, token_ids in constraints:
        constraint.sync(token_ids)
    constraints = [(c, t) for c, t in constraints if c.active]
    if not constraints:
        return
    if _executor is None:
        _executor = llguidance.LLExecutor(num_threads=default_threads())
    masks = allocate_masks(len(constraints), vocab_size)  # (B, ceil(V / 32))
    _executor.unsafe_compute_mask_ptr(
        [(c._matcher, row) for row, (c, _) in enumerate(constraints)], masks.ctypes.data, masks.shape[1] * 4,
        masks.shape[0],
    )
    for row, (constraint, _) in enumerate(constraints):
        constraint.adopt_mask(masks[row])
