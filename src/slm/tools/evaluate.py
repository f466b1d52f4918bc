"""``slm eval``: the trade-off a user makes when compressing a model, measured — for each model its size,
bits per weight, perplexity over one text (``Model.perplexity``: llama.cpp's method) and decode speed.

    rows = [evaluate("smollm2-hf-q4_k_m", text), evaluate("smollm2-hf-fp16", text)]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from slm.api import Model, load
from slm.errors import InvalidParameter
from slm.generation import GenerationParams
from slm.generation.generator import Generator
from slm.generation.perplexity import DEFAULT_WINDOW
from slm.remote import is_remote
from slm.store.catalog import resolve
from slm.store.describe import describe
from slm.tools.bench import model_size, no_end_bias

DECODE_TOKENS = 64


@dataclass(frozen=True)
class Evaluation:
    model: str
    engine: str
    precision: str | None
    size_bytes: int
    parameters: int | None
    bits_per_weight: float | None
    """The file's bits over the parameter count (embeddings and norms included, as llama.cpp counts)."""
    perplexity: float
    error: float
    scored: int
    decode_tps: float
    """Greedy tokens/s after a prompt of one window's first half, one sequence."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_rate(model: Model, prompt: list[int], tokens: int = DECODE_TOKENS) -> float:
    """Tokens/s of greedy decoding after ``prompt``, one sequence, through the model's adapter if it has one (the
    end of text barred, so it runs the whole way; reading the prompt not counted)."""
    params = GenerationParams(temperature=0, max_tokens=tokens + 1, logit_bias=no_end_bias(model.info),
                              adapter=model.adapter)
    with Generator(model.engine, params) as gen:
        gen.append_tokens(prompt)
        gen.generate_next_token()  # reads the prompt
        start = time.perf_counter()
        for _ in range(tokens):
            gen.generate_next_token()
        return tokens / (time.perf_counter() - start)


def evaluate(name: str, text: str, n_ctx: int = DEFAULT_WINDOW, windows: int | None = None,
             engine: str | None = None, threads: int | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> Evaluation:
    """Load ``name`` and measure it on ``text`` (see the module's docstring)."""
    if is_remote(name):
        raise InvalidParameter("MODEL", f"{name} is remote: slm eval needs a local model's logits")
    resolved = resolve(name)
    options: dict[str, Any] = {"n_ctx": n_ctx, "max_sequences": 1, "engine": engine, "threads": threads}
    model = load(name, **{k: v for k, v in options.items() if v is not None})
    assert isinstance(model, Model)
    with model:
        result = model.perplexity(text, n_ctx, windows, progress)
        prompt = model.engine.tokenize(text, add_special=True, parse_special=False)[: n_ctx // 2]
        decode = decode_rate(model, prompt)
        engine_name, parameters = model.engine.name, model.info.parameters or None
    facts = describe(resolved)
    precision = facts.precision
    if precision is None and resolved.format == "gguf":
        from slm.tools.quantize import source_type

        precision = source_type(resolved.path)
    size = model_size(resolved.path)
    parameters = parameters or facts.parameters
    return Evaluation(model=name, engine=engine_name, precision=precision, size_bytes=size, parameters=parameters,
                      bits_per_weight=size * 8 / parameters if parameters else None, perplexity=result.value,
                      error=result.error, scored=result.scored, decode_tps=decode)
