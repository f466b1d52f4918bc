"""A local model: an engine and the generation loop over it.

    model = slm.load("smollm2")
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)
    for chunk in model.stream("Once upon a time", max_tokens=50):
        print(chunk.text, end="")
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from slm.engines import Engine, ModelInfo, TakesImages
from slm.engines.base import check_adapter
from slm.errors import ContextOverflow, InvalidParameter
from slm.generation import builtin_templates, chat_template
from slm.generation.beam import beam_complete, beam_stream
from slm.generation.choices import several
from slm.generation.constraints import requested_grammar
from slm.generation.generator import Generator
from slm.generation.params import GenerationParams
from slm.generation.perplexity import DEFAULT_WINDOW, Perplexity, perplexity
from slm.generation.speculative import proposer_for
from slm.generation.stream import Chunk, Completion, Usage, collect, fit_to_context, stream
from slm.generation.tool_calls import ToolCallParser, ToolFormat, detect_format
from slm.generation.tool_use import ToolUse
from slm.model.contract import Messages
from slm.model.images import image_places, split_images
from slm.model.prompt import Prompt

TextOrIds = str | Sequence[int]

CONSTRAINTS = ("response_format", "grammar", "regex", "choices")
"""The Python API's options for what the answer must be (``constraints.requested_grammar``)."""
TOOLS = ("tools", "tool_choice", "parallel_tool_calls")


@dataclass
class Prepared:
    """A prompt ready for the engine: its ids, the parameters (with the grammar of its tools or answer
    format), and how to read the answer back (tool calls, a parsed JSON answer)."""

    tokens: list[int]
    params: GenerationParams
    parser: ToolCallParser | None = None
    parse_as: Any = None
    """``json`` or a pydantic model class: what a finished answer is parsed into."""
    n: int = 1
    """How many answers are asked for (OpenAI's ``n``)."""

    def choice(self, index: int) -> Prepared:
        """The ``index``-th of ``n`` answers: a parser of its own, and with a seed, seed + index, so the
        answers differ yet the call is reproducible."""
        params = self.params if self.params.seed is None else self.params.replace(seed=self.params.seed + index)
        parser = None if self.parser is None else self.parser.format.parser(self.parser.use)
        return replace(self, params=params, parser=parser, n=1)

    def read(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """The chunks with tool calls split from their text."""
        parser = self.parser
        return chunks if parser is None else (parser.chunk(c) for c in chunks)

    def finish(self, completion: Completion) -> Completion:
        """The completion with its answer parsed, when it was asked for and the answer finished."""
        if self.parse_as is not None and completion.finish_reason == "stop":
            if self.parse_as is json:
                completion.parsed = json.loads(completion.text)
            else:
                completion.parsed = self.parse_as.model_validate_json(completion.text)
        return completion


@dataclass
class Choices(Completion):
    """``n`` sampled answers to one prompt: the first, as any completion, and ``choices``, all of them in
    order. ``usage`` counts the prompt once and the tokens of every answer."""

    choices: list[Completion] = field(default_factory=list)


class Model:
    """A loaded model and the generation loop over it."""

    def __init__(self, name: str, engine: Engine, instruct: bool = True, draft: Engine | None = None,
                 adapter: str | None = None) -> None:
        self.name = name
        self.engine = engine
        self.instruct = instruct
        """False for a pretrained base model: it continues text but was not tuned to end a turn."""
        self.draft = draft
        """A smaller model's engine that drafts tokens for speculative decoding (``load(..., draft=...)``)."""
        check_adapter(adapter, engine.info.adapters)
        self.adapter = adapter
        """The LoRA adapter calls go through unless they name another (``adapter=``); None: the model alone."""

    def with_adapter(self, adapter: str | None) -> Model:
        """This model through another of its loaded LoRA adapters (None: the model alone). The two share the
        engine, its memory and its sequences: closing one closes both."""
        return Model(self.name, self.engine, self.instruct, self.draft, adapter)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    # --- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """``special``: control tokens written as their text rather than left out."""
        return self.engine.detokenize(tokens, special)

    @property
    def chat_template_source(self) -> str | None:
        info = self.info
        return info.chat_template or builtin_templates.for_architecture(info.architecture)

    @functools.cached_property
    def tool_format(self) -> ToolFormat:
        """How this model writes tool calls: the format its chat template declares, or the generic one."""
        return detect_format(self.chat_template_source)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True,
                            tools: ToolUse | None = None) -> str:
        """The prompt text for a conversation (and the tools it may call), from the model's own template."""
        info = self.info
        template = self.chat_template_source
        if not template:
            raise InvalidParameter("messages", f"{self.name} has no chat template; use raw completion")
        offered = tools if tools is not None and tools.choice != "none" else None
        messages, extra = self.tool_format.render(messages, offered)
        return chat_template.render(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=info.special.bos_text,
            eos_token=info.special.eos_text,
            **extra,
        )

    @property
    def takes_images(self) -> bool:
        """Whether the model reads images (a vision model loaded with what it needs for them)."""
        return isinstance(self.engine, TakesImages)

    def chat_tokens(self, messages: Messages, tools: ToolUse | None = None) -> list[int]:
        """The prompt ids for a conversation; each image in it is a run of placeholder ids. BOS is added
        only if the template did not write it."""
        places = image_places(messages)
        engine = self.engine
        if places and not isinstance(engine, TakesImages):
            raise InvalidParameter(places[0], f"{self.name} does not take images (a text-only model)")
        marker = engine.image_marker if isinstance(engine, TakesImages) else ""
        messages, images = split_images(messages, marker)
        text = self.apply_chat_template(messages, tools=tools)
        special = self.info.special
        add_bos = special.add_bos and not (special.bos_text and text.startswith(special.bos_text))
        if images:
            assert isinstance(engine, TakesImages)
            return engine.tokenize_with_images(text, images, add_special=add_bos)
        return engine.tokenize(text, add_special=add_bos, parse_special=True)

    def prepare(self, prompt: Prompt, params: GenerationParams, parse_as: Any = None) -> Prepared:
        """A prompt's ids, and parameters with the grammar its tools need. Tools with ``response_format``
        or a grammar are refused: the answer cannot be held to both."""
        use = prompt.tools if prompt.messages is not None else None
        if use is None or use.choice == "none":
            return Prepared(self.prompt_tokens(prompt), params, None, parse_as)
        if params.grammar is not None:
            raise InvalidParameter(params.grammar.field, "cannot be combined with tools: the answer is a tool call")
        if params.num_beams > 1:
            raise InvalidParameter("tools", "cannot be combined with beam search (num_beams > 1)")
        tokens = self.prompt_tokens(prompt)
        room = self.info.context_length - (params.max_tokens or 1)
        if len(tokens) > room and not params.truncate:
            raise ContextOverflow("tools", f"the conversation with its {len(use.tools)} tools takes {len(tokens)} "
                                  f"tokens, beyond the {room} this model's context leaves (offer fewer tools)")
        grammar = self.tool_format.grammar(use)
        return Prepared(tokens, params.replace(grammar=grammar), self.tool_format.parser(use))

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        """The ids a prompt stands for: its context first, then the conversation, text or ids."""
        if prompt.messages is not None:
            ids = self.chat_tokens(prompt.messages, prompt.tools)
        else:
            ids = self._raw_tokens(prompt.text if prompt.text is not None else (prompt.tokens or ()))
        return [*prompt.context, *ids]

    def _raw_tokens(self, prompt: TextOrIds) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidParameter("prompt", "is empty")
            return self.tokenize(prompt)
        tokens = list(prompt)
        if not tokens:
            raise InvalidParameter("prompt", "is empty")
        return tokens

    # --- generation ------------------------------------------------------------------------

    def generator(self, params: GenerationParams | None = None, **overrides: Any) -> Generator:
        """A step-level generator (append tokens, generate one token at a time, rewind); with ``lookup`` or a
        draft model, speculative (a step may add several tokens: ``step_tokens``)."""
        params = self._params(params, overrides)
        return Generator(self.engine, params, proposer=proposer_for(params, self.draft))

    def stream(self, prompt: TextOrIds, params: GenerationParams | None = None, **overrides: Any) -> Iterator[Chunk]:
        """Raw completion of ``prompt`` (text or ids), streamed chunk by chunk. Besides the generation
        parameters, ``response_format``, ``grammar``, ``regex`` or ``choices`` constrain the answer. With
        ``num_beams > 1`` no beam is the answer until the search ends: the stream is then one chunk, the best
        beam's whole text (``generate`` also returns the other beams)."""
        return self._stream(self._prepare(Prompt.raw(self._raw_tokens(prompt)), params, overrides))

    def generate(self, prompt: TextOrIds, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """Raw completion of ``prompt`` (text or ids); with a JSON ``response_format``, ``parsed`` holds the
        answer parsed. With ``num_beams > 1`` (beam search: ``length_penalty``, ``early_stopping``,
        ``num_return_sequences``, ``no_repeat_ngram_size``, ``min_new_tokens``) it is a ``BeamCompletion``:
        the best beam, and ``beams``, the returned ones ranked with their scores. With ``n > 1`` it is a
        ``Choices``: ``n`` answers sampled side by side from one reading of the prompt (with beams, ``n`` is
        ``num_return_sequences``)."""
        prepared = self._prepare(Prompt.raw(self._raw_tokens(prompt)), params, overrides)
        return self._complete(prepared)

    def chat_stream(
        self, messages: Messages, params: GenerationParams | None = None, **overrides: Any
    ) -> Iterator[Chunk]:
        """The assistant's next turn, streamed; it ends at the model's end-of-turn token. ``tools`` (specs
        or Python functions), ``tool_choice`` and ``parallel_tool_calls`` offer tools; chunks then carry
        ``tool_calls``. ``response_format``, ``grammar``, ``regex`` or ``choices`` constrain the answer."""
        return self._stream(self._prepare(Prompt.chat(messages), params, overrides))

    def chat(self, messages: Messages, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """The assistant's next turn; it ends at the model's end-of-turn token. With tools, ``tool_calls``
        holds the calls made; with a JSON ``response_format``, ``parsed`` the answer parsed. With
        ``num_beams > 1``, as ``generate``: a ``BeamCompletion`` with the ranked ``beams``; with ``n > 1`` a
        ``Choices`` with ``n`` answers."""
        prepared = self._prepare(Prompt.chat(messages), params, overrides)
        return self._complete(prepared)

    def _prepare(self, prompt: Prompt, params: GenerationParams | None, overrides: dict[str, Any]) -> Prepared:
        """Split the Python API's options into a prompt with tools, a grammar, and generation parameters."""
        n = _answers(overrides.pop("n", 1))
        constraint = {k: overrides.pop(k) for k in CONSTRAINTS if k in overrides}
        tool_options = {k: overrides.pop(k) for k in TOOLS if k in overrides}
        grammar, parse_as = requested_grammar(**constraint)
        if tool_options:
            if prompt.messages is None:
                raise InvalidParameter(next(iter(tool_options)), "tools are offered in a chat, not a raw completion")
            use = ToolUse.of(tool_options.get("tools"), tool_options.get("tool_choice"),
                             tool_options.get("parallel_tool_calls"))
            prompt = Prompt.chat(prompt.messages, use)
        if n > 1 and (overrides.get("num_beams") or (params.num_beams if params else 1)) > 1:
            overrides["num_return_sequences"] = n  # vLLM's sense: the n best beams
            n = 1
        params = self._params(params, overrides)
        if grammar is not None:
            params = params.replace(grammar=grammar)
        return replace(self.prepare(prompt, params, parse_as), n=n)

    def _params(self, params: GenerationParams | None, overrides: dict[str, Any]) -> GenerationParams:
        """The call's parameters, through this model's adapter unless they name another."""
        params = GenerationParams.of(params, **overrides)
        if params.adapter is None and self.adapter is not None:
            params = params.replace(adapter=self.adapter)
        check_adapter(params.adapter, self.info.adapters)
        return params

    def _stream(self, prepared: Prepared) -> Iterator[Chunk]:
        if prepared.n > 1:
            raise InvalidParameter("n", "a stream carries one answer: ask generate() or chat() for n answers")
        tokens = fit_to_context(self.info, prepared.tokens, prepared.params)
        if prepared.params.num_beams > 1:
            return beam_stream(self.engine, tokens, prepared.params)
        proposer = proposer_for(prepared.params, self.draft)
        return prepared.read(stream(self.engine, tokens, prepared.params, proposer))

    def _complete(self, prepared: Prepared) -> Completion:
        if prepared.params.num_beams > 1:
            tokens = fit_to_context(self.info, prepared.tokens, prepared.params)
            return beam_complete(self.engine, tokens, prepared.params)
        if prepared.n > 1:
            return self._several(prepared)
        return prepared.finish(collect(self._stream(prepared)))

    def _several(self, prepared: Prepared) -> Choices:
        """``n`` answers sampled side by side: the prompt is read once, the answers fork it."""
        tokens = fit_to_context(self.info, prepared.tokens, prepared.params)
        choices = [prepared.choice(i) for i in range(prepared.n)]
        answers = several(self.engine, tokens, [c.params for c in choices],
                          lambda params: proposer_for(params, self.draft))
        done = [c.finish(collect(c.read(iter(chunks)))) for c, chunks in zip(choices, answers, strict=True)]
        first = done[0]
        usage = Usage(len(tokens), sum(c.usage.completion_tokens for c in done))
        return Choices(first.text, first.finish_reason, usage, first.timings, first.tokens, first.logprobs,
                       tool_calls=first.tool_calls, parsed=first.parsed, choices=done)

    # --- scoring ---------------------------------------------------------------------------

    def perplexity(self, text: str, n_ctx: int = DEFAULT_WINDOW, windows: int | None = None,
                   progress: Any = None) -> Perplexity:
        """The model's perplexity over ``text`` as llama.cpp's ``llama-perplexity`` computes it: windows of
        ``n_ctx`` tokens, the second half of each scored (``slm.generation.perplexity``). The text is tokenized
        as llama.cpp does it (the model's beginning of text added, special tokens read as text)."""
        tokens = self.engine.tokenize(text, add_special=True, parse_special=False)
        return perplexity(self.engine, tokens, n_ctx, windows, progress, adapter=self.adapter)

    def embed(self, inputs: Any, truncate: bool = False) -> Any:
        """Refused: slm embeds with encoder models (load an embedding model such as ``minilm``); pooling a
        decoder's states is not offered."""
        raise InvalidParameter("model", f"{self.name} generates text and makes no embeddings; load an embedding "
                                        "model such as minilm")

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        adapter = f", adapter={self.adapter!r}" if self.adapter is not None else ""
        return f"Model({self.name!r}, engine={self.engine.name!r}, context={self.info.context_length}{adapter})"


def _answers(n: object) -> int:
    """The ``n`` of a call: how many answers, checked."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidParameter("n", f"must be an integer >= 1, got {n!r}")
    return n
