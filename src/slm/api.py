"""The Python surface: ``slm.load(name)`` and the model's ``generate`` / ``stream`` / ``chat``.

    model = slm.load("smollm2")
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)
    for chunk in model.stream("Once upon a time", max_tokens=50):
        print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from slm.store import catalog
from slm.engines import Engine, ModelInfo, memory_needed, open_engine
from slm.errors import InvalidParameter
from slm.generation import builtin_templates, chat_template
from slm.generation.generator import Generator
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, complete, fit_prompt, stream

if TYPE_CHECKING:
    from slm.remote import RemoteModel, Router

Prompt = str | Sequence[int]
Messages = Sequence[chat_template.Message]


def load(name: str | None = None, **options: Any) -> Model | RemoteModel | Router:
    """Load a model by catalog alias or file path (default: the embedded SmolLM2), or open a remote
    model (``github:Phi-3.5-mini-instruct``, ``ollama:phi3.5``, a name from the configuration file) or a
    route: those have the same ``chat`` / ``chat_stream`` / ``generate`` / ``stream``.

    Options go to the engine: ``n_ctx`` (context to allocate), ``threads``, ``max_sequences``.
    """
    if name is not None and not catalog.looks_local(name):
        from slm.remote import open_remote

        remote = open_remote(name, **options)
        if remote is not None:
            return remote  # the same surface: chat, chat_stream, generate, stream
    resolved = catalog.resolve(name)
    instruct = resolved.entry.instruct if resolved.entry else True
    return Model(resolved.name, open_engine(resolved, **options), instruct=instruct)


def estimate_memory(name: str | None = None, **options: Any) -> int:
    """Bytes ``load(name, **options)`` would take (weights, KV cache, buffers), without loading it."""
    return memory_needed(catalog.resolve(name), **options)


class Model:
    """A loaded model and the generation loop over it."""

    def __init__(self, name: str, engine: Engine, instruct: bool = True) -> None:
        self.name = name
        self.engine = engine
        self.instruct = instruct
        """False for a pretrained base model: it continues text but was not tuned to end a turn."""

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    # --- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.engine.detokenize(tokens)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, from the model's own template."""
        info = self.info
        template = info.chat_template or builtin_templates.for_architecture(info.architecture)
        if not template:
            raise InvalidParameter("messages", f"{self.name} has no chat template; use raw completion")
        return chat_template.render(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=info.special.bos_text,
            eos_token=info.special.eos_text,
        )

    def chat_tokens(self, messages: Messages) -> list[int]:
        """The prompt ids for a conversation. BOS is added only if the template did not write it."""
        text = self.apply_chat_template(messages)
        special = self.info.special
        add_bos = special.add_bos and not (special.bos_text and text.startswith(special.bos_text))
        return self.engine.tokenize(text, add_special=add_bos, parse_special=True)

    def _prompt_tokens(self, prompt: Prompt) -> list[int]:
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
        """A step-level generator (append tokens, generate one token at a time, rewind)."""
        return Generator(self.engine, GenerationParams.of(params, **overrides))

    def stream(self, prompt: Prompt, params: GenerationParams | None = None, **overrides: Any) -> Iterator[Chunk]:
        """Raw completion of ``prompt`` (text or ids), streamed chunk by chunk."""
        return self._stream(self._prompt_tokens(prompt), GenerationParams.of(params, **overrides))

    def generate(self, prompt: Prompt, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """Raw completion of ``prompt`` (text or ids)."""
        return self._complete(self._prompt_tokens(prompt), GenerationParams.of(params, **overrides))

    def chat_stream(
        self, messages: Messages, params: GenerationParams | None = None, **overrides: Any
    ) -> Iterator[Chunk]:
        """The assistant's next turn, streamed; it ends at the model's end-of-turn token."""
        return self._stream(self.chat_tokens(messages), GenerationParams.of(params, **overrides))

    def chat(self, messages: Messages, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """The assistant's next turn; it ends at the model's end-of-turn token."""
        return self._complete(self.chat_tokens(messages), GenerationParams.of(params, **overrides))

    def _fit(self, tokens: list[int], params: GenerationParams) -> list[int]:
        special = self.info.special
        keep = 1 if tokens and special.bos_id is not None and tokens[0] == special.bos_id else 0
        return fit_prompt(tokens, params, self.info.context_length, keep_first=keep)

    def _stream(self, tokens: list[int], params: GenerationParams) -> Iterator[Chunk]:
        return stream(self.engine, self._fit(tokens, params), params)

    def _complete(self, tokens: list[int], params: GenerationParams) -> Completion:
        return complete(self.engine, self._fit(tokens, params), params)

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, engine={self.engine.name!r}, context={self.info.context_length})"
