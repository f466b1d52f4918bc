"""Greedy decoding in slm is token-for-token llama-cpp-python's own greedy decoding.

Like is compared with like: the same GGUF, the same context size, the same threads and the same
attention kernel on both sides. Flash attention must match because it is a different kernel (other
summation order, f16 accumulation), so logits differ in the last bits and a near-tie between the two
best tokens can flip, after which the continuations diverge. ``repeat_penalty`` must be passed as 1.0
because ``Llama.generate`` defaults to 1.1 (it would penalise repeats that slm's default, 1.0, leaves
alone), and that changes greedy output.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

import slm
from slm.engines.llamacpp import LlamaCppEngine

N_CTX = 2048
THREADS = 2
NEW_TOKENS = 64

RAW_PROMPTS = {
    "story": "Once upon a time",
    "fact": "The capital of France is",
    "code": "def fibonacci(n):",
    "french": "Les fleurs du printemps",
    "numbers": "1, 2, 3, 4,",
}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_IDS = [*RAW_PROMPTS, "chat"]


def _slm(path: Path, flash_attention: bool | None) -> slm.Model:
    engine = LlamaCppEngine(path, n_ctx=N_CTX, max_sequences=1, flash_attention=flash_attention, threads=THREADS)
    return slm.Model("smollm2", engine)


def _llama(path: Path, flash_attn: bool) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=N_CTX, flash_attn=flash_attn, n_threads=THREADS, n_threads_batch=THREADS,
        verbose=False,
    )


@pytest.fixture(scope="module")
def pair_no_fa(smollm2_path: Path) -> Iterator[tuple[slm.Model, llama_cpp.Llama]]:
    """Both sides with flash attention off."""
    model, llm = _slm(smollm2_path, False), _llama(smollm2_path, False)
    yield model, llm
    model.close()
    llm.close()


@pytest.fixture(scope="module")
def pair_default_fa(smollm2_path: Path) -> Iterator[tuple[slm.Model, llama_cpp.Llama]]:
    """llama.cpp's default attention on both sides. slm leaves llama.cpp's default (AUTO), which on the CPU
    resolves to flash attention; ``Llama`` can only say on or off (and defaults to off), so its side of the
    same default is ``flash_attn=True``."""
    model, llm = _slm(smollm2_path, None), _llama(smollm2_path, True)
    yield model, llm
    model.close()
    llm.close()


def _prompt_text(model: slm.Model, name: str) -> str:
    return model.apply_chat_template(CHAT) if name == "chat" else RAW_PROMPTS[name]


def _llama_greedy(llm: llama_cpp.Llama, tokens: list[int], end_of_generation: frozenset[int]) -> list[int]:
    """``Llama.generate`` with temp=0 and no repeat penalty, up to NEW_TOKENS or the first end-of-generation token
    (slm stops there; ``generate`` itself would go on)."""
    llm.reset()  # no KV-cache prefix reuse from the previous prompt: every prompt is read from scratch
    out = []
    for token in itertools.islice(llm.generate(tokens, temp=0.0, repeat_penalty=1.0), NEW_TOKENS):
        out.append(token)
        if token in end_of_generation:
            break
    return out


def _assert_parity(model: slm.Model, llm: llama_cpp.Llama, name: str) -> None:
    text = _prompt_text(model, name)
    tokens = llm.tokenize(text.encode("utf-8"), special=True)
    assert tokens == model.tokenize(text), "both sides must read the same prompt ids"
    if name == "chat":
        assert tokens == model.chat_tokens(CHAT)
    ours = model.generate(tokens, temperature=0, max_tokens=NEW_TOKENS)
    theirs = _llama_greedy(llm, tokens, model.info.special.end_of_generation)
    assert ours.tokens == theirs
    if len(ours.tokens) < NEW_TOKENS:
        assert ours.finish_reason == "stop" and ours.tokens[-1] in model.info.special.end_of_generation
    else:
        assert ours.finish_reason == "length"
    assert ours.text == model.detokenize([t for t in ours.tokens if t not in model.info.special.end_of_generation])


@pytest.mark.parametrize("name", PROMPT_IDS)
def test_greedy_matches_llama_cpp_without_flash_attention(
    pair_no_fa: tuple[slm.Model, llama_cpp.Llama], name: str
) -> None:
    _assert_parity(*pair_no_fa, name)


@pytest.mark.parametrize("name", PROMPT_IDS)
def test_greedy_matches_llama_cpp_with_default_attention(
    pair_default_fa: tuple[slm.Model, llama_cpp.Llama], name: str
) -> None:
    _assert_parity(*pair_default_fa, name)
