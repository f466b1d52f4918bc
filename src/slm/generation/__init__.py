"""Logits -> tokens -> text: sampling, the step generator, detokenizing, streaming."""

from slm.generation.generator import Generator, TokenLogprob, TokenText
from slm.generation.params import GenerationParams, LogitsProcessor
from slm.generation.stream import Chunk, Completion, Timings, Usage

__all__ = [
    "Chunk", "Completion", "GenerationParams", "Generator", "LogitsProcessor", "Timings", "TokenLogprob", "TokenText",
    "Usage",
]
