"""The step-level generator, in the style of ONNX Runtime GenAI.

    gen = Generator(engine, params)
    gen.append_tokens(prompt_ids)
    while not gen.is_done():
        gen.generate_next_token()
        print(gen.next_token)

Tokens are evaluated lazily: ``append_tokens`` only queues them, and the next
``generate_next_token`` runs the engine over everything queued (the prompt, or the last sampled
token) before sampling. So the final sampled token is never evaluated for nothing, and
``rewind_to`` can undo any suffix.

With a ``proposer`` (``slm.generation.speculative``), each decoding step also checks a draft, so one call
may add several tokens: ``step_tokens`` lists what the last call added (``next_token`` is its last).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from slm.engines import media
from slm.engines.base import Engine, TakesImages
from slm.errors import ContextOverflow, InvalidParameter
from slm.generation.constraints import GrammarConstraint, grammar_tokenizer
from slm.generation.params import GenerationParams
from slm.generation.sampling import Sampler, build_sampler, log_softmax
from slm.generation.speculative import Draft, Proposer, Stats, verify


class TokenText(NamedTuple):
    """A token as an API reports it: decoded alone, and its own bytes (which may be part of a UTF-8
    character, so that ``text`` alone cannot give them back)."""

    text: str
    bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability, and the most likely alternatives at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    texts: Mapping[int, TokenText] = field(default_factory=dict, compare=False, repr=False)
    """The chosen token and each alternative as text and bytes, read from the engine when the step ran
    (on the engine's thread), so that whoever formats them later need not touch the engine."""

    def text_of(self, token: int) -> TokenText:
        return self.texts.get(token, TokenText("", b""))


class Generator:
    """One sequence in an engine, advanced one token at a time."""

    def __init__(
        self,
        engine: Engine,
        params: GenerationParams | None = None,
        sequence: tuple[int, Sequence[int]] | None = None,
        proposer: Proposer | None = None,
    ) -> None:
        """``sequence``: adopt an engine sequence whose KV cache already holds these tokens (a
        reused prefix) instead of opening an empty one. ``proposer``: decode speculatively with its drafts
        (the generator closes it)."""
        self.engine = engine
        self.params = params or GenerationParams()
        check_logit_bias(self.params, engine.info.vocab_size)
        seq, cached = sequence if sequence is not None else (engine.new_sequence(self.params.adapter), [])
        self.seq = seq
        self.tokens: list[int] = list(cached)
        """Every token of the sequence: what was appended and what was generated."""
        self.generated = 0
        self.next_token: int | None = None
        self.last_logprob: TokenLogprob | None = None
        self.finish_reason: str | None = None
        self._evaluated = len(self.tokens)  # tokens[:_evaluated] are in the engine's KV cache
        self._logits: np.ndarray | None = None  # (V,) after tokens[_evaluated - 1]
        self._sampler: Sampler | None = None
        self.constraint = _constraint(engine, self.params)
        """The grammar's state in this sequence, when the parameters have one (a batching caller fills
        the masks of many at once)."""
        self._end_of_generation = engine.info.special.end_of_generation
        self._context = engine.info.context_length
        self._vocab = engine.info.vocab_size
        self.proposer = proposer
        self.speculation = Stats()
        """Drafts checked, tokens proposed and kept (with a proposer)."""
        self.step_tokens: list[int] = []
        """The tokens the last step added (one, or with a draft up to its length plus one)."""
        self.step_logprobs: list[TokenLogprob | None] = []
        """Their logprobs, when asked for."""

    def append_tokens(self, ids: Sequence[int]) -> None:
        """Queue tokens (a prompt, a user's turn) to be read before the next token is generated."""
        ids = list(ids)
        if not ids:
            raise InvalidParameter("tokens", "nothing to append")
        bad = first_bad_id(self.engine, ids)
        if bad is not None:
            raise InvalidParameter("tokens", f"{bad!r} is not a token id of this model (0..{self._vocab - 1})")
        ids = [int(t) for t in ids]  # numpy integers too, as ONNX Runtime GenAI accepts
        if len(self.tokens) + len(ids) > self._context:
            raise ContextOverflow(
                "tokens", f"{len(self.tokens) + len(ids)} tokens do not fit the context of {self._context}",
                len(self.tokens) + len(ids), self._context,
            )
        self.tokens.extend(ids)
        self.generated = 0  # max_tokens counts from the latest input
        self.finish_reason = None

    def is_done(self) -> bool:
        return self.finish_reason is not None

    def generate_next_token(self) -> int:
        """Run the engine over what is queued, then sample and queue the next token (with a proposer, a
        decoding step checks a draft too and may add several: see ``step_tokens``)."""
        pending = self.pending_tokens()
        if not pending:
            return self.advance(None)
        draft = self.draft() if len(pending) == 1 else Draft([])
        keep = [len(draft.tokens) + 1] if draft.tokens else None
        return self.take_step(self.engine.evaluate([(self.seq, pending + draft.tokens)], keep=keep), draft)[-1]

    # A batching caller (the scheduler) runs the engine itself, for many generators in one call:
    # it evaluates ``pending_tokens()`` (or a chunk of them, then ``mark_evaluated``) and hands the
    # logits after the last one to ``advance``.

    def pending_tokens(self) -> list[int]:
        """Tokens queued but not yet in the KV cache."""
        return self.tokens[self._evaluated :]

    @property
    def evaluated(self) -> int:
        """How many of ``tokens`` (from the first) the KV cache holds."""
        return self._evaluated

    def evaluated_tokens(self) -> list[int]:
        """The tokens the KV cache holds."""
        return self.tokens[: self._evaluated]

    def mark_evaluated(self, count: int) -> None:
        """The caller evaluated the first ``count`` pending tokens (a chunk of a long prompt)."""
        assert 0 < count <= len(self.tokens) - self._evaluated
        self._evaluated += count
        self._logits = None

    def advance(self, logits: np.ndarray | None) -> int:
        """Sample the next token from the logits after all pending tokens (None: reuse the last)."""
        self._check_running()
        if logits is not None:
            self._logits = logits
            self._evaluated = len(self.tokens)
        if self._logits is None or self._evaluated < len(self.tokens):
            raise InvalidParameter("generator", "append tokens before generating")
        self.step_tokens, self.step_logprobs = [], []
        token = self.sample(self._logits)
        self._logits = None
        self._append(token)
        return token

    def take_step(self, rows: np.ndarray, draft: Draft) -> list[int]:
        """Take a step that evaluated the pending tokens and ``draft``: ``rows`` are the logits after the last
        pending token and after each draft token. Returns the tokens added."""
        if draft.tokens:
            return self.advance_draft(rows, draft)
        return [self.advance(rows[0])]

    def draft(self) -> Draft:
        """A draft for the next step to check: the proposer's, when there is one and the generator is decoding
        (its one pending token is the last it sampled); else none. Never longer than the context and
        ``max_tokens`` leave room for."""
        if self.proposer is None or self.finish_reason is not None or self.generated == 0:
            return Draft([])
        if self._evaluated != len(self.tokens) - 1:
            return Draft([])
        limit = self._context - len(self.tokens) - 1
        if self.params.max_tokens is not None:
            limit = min(limit, self.params.max_tokens - self.generated - 1)
        if limit <= 0:
            return Draft([])
        return self.proposer.propose(self.tokens, limit, self._ensure_sampler())

    def advance_draft(self, rows: np.ndarray, draft: Draft) -> list[int]:
        """Take a step that evaluated the pending token and ``draft``: ``rows`` are the logits after each,
        (len(draft) + 1, V). Keeps the draft's longest prefix the model agrees with and one token of the
        model's own (``speculative.verify``), forgets the rest in the KV cache; returns the tokens added."""
        self._check_running()
        k = len(draft.tokens)
        if rows.shape[0] != k + 1 or self._evaluated != len(self.tokens) - 1:
            raise InvalidParameter("generator", "a draft's step needs the logits after the pending token and each "
                                                "draft token")
        sampler = self._ensure_sampler()
        self.step_tokens, self.step_logprobs = [], []
        kept = 0
        for j in range(k + 1):
            token, processed = verify(sampler, self.tokens, rows, draft, j)
            self._append(token, processed)
            if j == k or token != draft.tokens[j]:
                break
            kept += 1
            if self.finish_reason is not None:
                break
        self.speculation.steps += 1
        self.speculation.proposed += k
        self.speculation.accepted += kept
        assert self.proposer is not None
        self.proposer.accepted(k, kept)
        self._logits = None
        evaluated = len(self.tokens) - 1  # all but the newest token; the draft's rejected tail goes
        if evaluated < self._evaluated + 1 + k:
            self.engine.rewind(self.seq, evaluated)
        self._evaluated = evaluated
        return list(self.step_tokens)

    def _check_running(self) -> None:
        if self.finish_reason is not None:
            raise InvalidParameter(
                "generator", f"generation is finished ({self.finish_reason}); rewind or append first"
            )

    def _ensure_sampler(self) -> Sampler:
        if self._sampler is None:
            self._sampler = build_sampler(self.params, generated_from=len(self.tokens), constraint=self.constraint)
        return self._sampler

    def _append(self, token: int, processed: np.ndarray | None = None) -> None:
        """Add a chosen token (``processed``: the logits it was chosen from, when its logprob is not yet
        recorded) and see whether it ends the generation."""
        if processed is not None and self.params.logprobs:
            self.last_logprob = _logprob_of(self.engine, token, log_softmax(processed), self.params.top_logprobs)
        self.tokens.append(token)
        self.generated += 1
        self.next_token = token
        self.step_tokens.append(token)
        self.step_logprobs.append(self.last_logprob)
        if token in self._end_of_generation:
            self.finish_reason = "stop"
        elif self._at_limit():
            self.finish_reason = "length"

    def _at_limit(self) -> bool:
        limit = self.params.max_tokens
        return (limit is not None and self.generated >= limit) or len(self.tokens) >= self._context

    def sample(self, logits: np.ndarray) -> int:
        """Process, record logprobs if asked, and pick a token (modifies ``logits``)."""
        self._ensure_sampler()
        assert self._sampler is not None
        logits = self._sampler.process(self.tokens, logits)
        if self.params.logprobs:
            logp = log_softmax(logits)
            token = self._sampler.choose(self.tokens, logits)
            self.last_logprob = _logprob_of(self.engine, token, logp, self.params.top_logprobs)
            return token
        return self._sampler.choose(self.tokens, logits)

    def rewind_to(self, length: int) -> None:
        """Forget every token from position ``length`` on, in the sequence and its KV cache."""
        if not 0 <= length <= len(self.tokens):
            raise InvalidParameter("length", f"must be in [0, {len(self.tokens)}], got {length}")
        keep_cached = min(self._evaluated, length)
        if keep_cached == length and length > 0:
            keep_cached -= 1  # re-read the last kept token to get logits after it
        keep_cached = media.whole_images_before(self.tokens, keep_cached)  # an image is read whole
        self.engine.rewind(self.seq, keep_cached)
        self._evaluated = keep_cached
        self.generated = max(0, self.generated - (len(self.tokens) - length))
        del self.tokens[length:]
        self._logits = None
        self.finish_reason = None

    def evict(self) -> None:
        """Free the KV cache but keep every token and the sampling state (a scheduler short of KV
        cache pauses this sequence); ``adopt`` a sequence later to go on where it stopped."""
        self.close()
        self._evaluated = 0
        self._logits = None

    def adopt(self, sequence: tuple[int, Sequence[int]]) -> None:
        """Go on in ``sequence``, an engine sequence whose KV cache holds a prefix of ``tokens``; the
        rest is evaluated again before the next token is sampled."""
        seq, cached = sequence
        assert self.seq is None and list(cached) == self.tokens[: len(cached)]
        self.seq = seq
        self._evaluated = len(cached)

    def detach(self) -> tuple[int, list[int]]:
        """Hand over the engine sequence and the tokens its KV cache holds, without freeing it (the
        proposer's is freed)."""
        if self.proposer is not None:
            self.proposer.close()
        seq, self.seq = self.seq, None  # type: ignore[assignment]
        return seq, self.tokens[: self._evaluated]

    def close(self) -> None:
        """Free the sequence's KV cache (and the proposer's)."""
        if self.proposer is not None:
            self.proposer.close()
        if self.seq is not None:
            self.engine.free(self.seq)
            self.seq = None  # type: ignore[assignment]

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _constraint(engine: Engine, params: GenerationParams) -> GrammarConstraint | None:
    grammar = params.grammar
    if grammar is None:
        return None
    return GrammarConstraint(grammar, grammar_tokenizer(engine), engine.info.vocab_size)


def check_logit_bias(params: GenerationParams, vocab: int) -> None:
    """Refuse a logit bias on a token id the vocabulary does not have."""
    beyond = sorted(t for t in params.logit_bias if t >= vocab)
    if beyond:
        raise InvalidParameter("logit_bias", f"token id {beyond[0]} is not in this model's vocabulary (0..{vocab - 1})")


def first_bad_id(engine: Engine, ids: Sequence[object]) -> object | None:
    """The first of ``ids`` that is not a token id of the engine's vocabulary (nor, for an engine that takes
    images, an image's placeholder id); None when all are."""
    vocab, images = engine.info.vocab_size, isinstance(engine, TakesImages)
    return next((t for t in ids if not _is_token(t, vocab) and not (images and _is_placeholder(t))), None)


def _is_placeholder(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and bool(value < 0)


def _is_token(value: object, vocab: int) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and bool(0 <= value < vocab)


def _logprob_of(engine: Engine, token: int, logp: np.ndarray, top: int) -> TokenLogprob:
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        best = np.argpartition(logp, -top)[-top:]
        best = best[np.argsort(-logp[best], kind="stable")]
        # A token a grammar refused (-inf) is no alternative: it could not have been chosen.
        alternatives = tuple((int(t), float(logp[t])) for t in best if np.isfinite(logp[t]))
    shown = (token, *(t for t, _ in alternatives))
    texts = {t: TokenText(engine.detokenize([t]), engine.token_bytes(t)) for t in shown}
    return TokenLogprob(token, float(logp[token]), alternatives, texts)
