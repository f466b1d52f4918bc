"""A local model: an engine and the generation loop over it.

    model = slm.load("smollm2")
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)
    for chunk in model.stream("Once upon a time", max_tokens=50):
        print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from slm.engines import Engine, ModelInfo
from slm.errors import InvalidParameter
from slm.generation import builtin_templates, chat_template
from slm.generation.generator import Generator
from slm.generation.params import GenerationParams
from slm.generation.stream import Chunk, Completion, complete, fit_to_context, stream
from slm.model.contract import Messages
from slm.model.prompt import Prompt

TextOrIds = str | Sequence[int]


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

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        """The ids a prompt stands for: its context first, then the conversation, text or ids."""
        if prompt.messages is not None:
            ids = self.chat_tokens(prompt.messages)
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
        """A step-level generator (append tokens, generate one token at a time, rewind)."""
        return Generator(self.engine, GenerationParams.of(params, **overrides))

    def stream(self, prompt: TextOrIds, params: GenerationParams | None = None, **overrides: Any) -> Iterator[Chunk]:
        """Raw completion of ``prompt`` (text or ids), streamed chunk by chunk."""
        return self._stream(self._raw_tokens(prompt), GenerationParams.of(params, **overrides))

    def generate(self, prompt: TextOrIds, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """Raw completion of ``prompt`` (text or ids)."""
        return self._complete(self._raw_tokens(prompt), GenerationParams.of(params, **overrides))

    def chat_stream(
        self, messages: Messages, params: GenerationParams | None = None, **overrides: Any
    ) -> Iterator[Chunk]:
        """The assistant's next turn, streamed; it ends at the model's end-of-turn token."""
        return self._stream(self.chat_tokens(messages), GenerationParams.of(params, **overrides))

    def chat(self, messages: Messages, params: GenerationParams | None = None, **overrides: Any) -> Completion:
        """The assistant's next turn; it ends at the model's end-of-turn token."""
        return self._complete(self.chat_tokens(messages), GenerationParams.of(params, **overrides))

    def _stream(self, tokens: list[int], params: GenerationParams) -> Iterator[Chunk]:
        return stream(self.engine, fit_to_context(self.info, tokens, params), params)

    def _complete(self, tokens: list[int], params: GenerationParams) -> Completion:
        return complete(self.engine, fit_to_context(self.info, tokens, params), params)

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, engine={self.engine.name!r}, context={self.info.context_length})"
