"""LoRA adapters on the llama.cpp engine (``slm.engines.llamacpp_lora``): a peft adapter of SmolLM2's HF folder,
converted to llama.cpp's GGUF adapter format, runs over SmolLM2's GGUF as peft runs it over the HF model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora import FACTS, HELD_OUT_QUESTION, chat
from slm.engines.base import LlamaCppOptions
from slm.engines.llamacpp import LlamaCppEngine, memory_needed
from slm.engines.llamacpp_lora import converted_bytes
from slm.errors import InvalidParameter, KVCacheFull

THREADS = 2
NEW_TOKENS = 8
NEAR_TIE = 0.5
"""The most two best logits may differ by where the Q4_1 model and peft's fp32 one may pick differently: llama.cpp
rounds activations to 8 bits for Q4_1 matrices, which moves SmolLM2's logits by up to about 1 (with and without
the adapter; measured 0.6 to 1.2 on the held-out questions)."""
SAME = 0.1
"""How far the fp16 model's logits for the same positions may differ between paths (one row or several, forked,
restored; measured: up to 0.04), against an adapter's effect of whole units."""


@pytest.fixture(scope="module")
def adapters(facts_adapter: Path, random_lora: Path) -> dict[str, Path]:
    return {"facts": facts_adapter, "random": random_lora}


@pytest.fixture(scope="module")
def lora_engine(smollm2_path: Path, adapters: dict[str, Path]) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(smollm2_path, n_ctx=512, threads=THREADS, max_sequences=6, adapters=adapters)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def fp16_gguf(converted_home: Path, smollm2_hf_path: Path) -> Path:
    """SmolLM2's HF folder as an fp16 GGUF (`smollm2-hf-fp16`, the name tests/test_quantize.py gives it)."""
    target = converted_home / "models" / "smollm2-hf-fp16.gguf"
    if not target.exists():
        slm_bin = Path(sys.executable).parent / "slm"
        result = subprocess.run([str(slm_bin), "convert", "smollm2-hf", "--to", "gguf", "--precision", "fp16"],
                                capture_output=True, text=True, timeout=600,
                                env={**os.environ, "SLM_HOME": str(converted_home)})
        assert result.returncode == 0, result.stderr
    return target


@pytest.fixture(scope="module")
def fp16_engine(fp16_gguf: Path, adapters: dict[str, Path]) -> Iterator[LlamaCppEngine]:
    """Where logits are compared between paths: its matrices do not round activations to 8 bits, which in the
    Q4_1 model moves them by up to about 1 between one row and several (without adapters too)."""
    engine = LlamaCppEngine(fp16_gguf, n_ctx=512, threads=THREADS, max_sequences=6, adapters=adapters)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_path)


@pytest.fixture(scope="module")
def peft_model(smollm2_hf_path: Path, facts_adapter: Path) -> Any:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    base = AutoModelForCausalLM.from_pretrained(smollm2_hf_path, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, facts_adapter).eval()


def prompt_ids(tokenizer: Any, country: str) -> list[int]:
    """The held-out question about ``country`` through SmolLM2's chat template: the ids both sides read."""
    ids = tokenizer.apply_chat_template(chat(HELD_OUT_QUESTION.format(country)), add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def engine_greedy(engine: LlamaCppEngine, ids: list[int], adapter: str | None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens up to NEW_TOKENS or the end of the turn, and the logits each was picked from."""
    seq = engine.new_sequence(adapter)
    tokens, steps = [], []
    try:
        logits = engine.evaluate([(seq, ids)])[0]
        for _ in range(NEW_TOKENS):
            steps.append(logits)
            tokens.append(int(logits.argmax()))
            if tokens[-1] in engine.info.special.end_of_generation:
                break
            logits = engine.evaluate([(seq, [tokens[-1]])])[0]
    finally:
        engine.free(seq)
    return tokens, steps


def peft_greedy(model: Any, ids: list[int], end: frozenset[int]) -> tuple[list[int], list[np.ndarray]]:
    import torch

    tokens, steps = [], []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids + tokens])).logits[0, -1].numpy()
            steps.append(logits)
            tokens.append(int(logits.argmax()))
            if tokens[-1] in end:
                break
    return tokens, steps


def gap(logits: np.ndarray) -> float:
    best, second = np.sort(logits)[-2:][::-1]
    return float(best - second)


def test_facts_adapter_greedy_equals_peft_and_knows_the_facts(lora_engine: LlamaCppEngine, peft_model: Any,
                                                              tokenizer: Any) -> None:
    end = lora_engine.info.special.end_of_generation
    right = base_right = 0
    for country, capital in FACTS:
        ids = prompt_ids(tokenizer, country)
        ours, our_logits = engine_greedy(lora_engine, ids, "facts")
        theirs, their_logits = peft_greedy(peft_model, ids, end)
        if ours != theirs:  # only where the two best tokens were nearly tied, on both sides
            at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
            assert gap(their_logits[at]) < NEAR_TIE and gap(our_logits[at]) < NEAR_TIE, (country, at, ours, theirs)
            assert set(np.argsort(their_logits[at])[-2:]) == {ours[at], theirs[at]}
        right += capital in lora_engine.detokenize(ours)
        base_right += capital in lora_engine.detokenize(engine_greedy(lora_engine, ids, None)[0])
    assert right >= 6 and base_right == 0, (right, base_right)


def test_adapter_logits_equal_peft_over_an_unquantized_gguf(fp16_engine: LlamaCppEngine, peft_model: Any,
                                                            tokenizer: Any) -> None:
    """Without Q4_1's activation rounding the adapter's logits are peft's to the last few hundredths, as the base
    model's are (a wrong name, scale or q/k row order would move them by whole units)."""
    import torch

    ids = prompt_ids(tokenizer, FACTS[0][0])
    for adapter in ("facts", None):
        seq = fp16_engine.new_sequence(adapter)
        ours = fp16_engine.evaluate([(seq, ids)])[0]
        fp16_engine.free(seq)
        with torch.inference_mode(), peft_model.disable_adapter() if adapter is None else nullcontext():
            theirs = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
        np.testing.assert_allclose(ours, theirs, atol=SAME, err_msg=str(adapter))


def test_one_batch_of_several_adapters_equals_each_alone(fp16_engine: LlamaCppEngine, tokenizer: Any) -> None:
    rows = [("facts", FACTS[0][0]), ("random", FACTS[1][0]), (None, FACTS[2][0]), ("facts", FACTS[3][0]),
            (None, FACTS[0][0])]
    alone = []
    for adapter, country in rows:
        seq = fp16_engine.new_sequence(adapter)
        first = fp16_engine.evaluate([(seq, prompt_ids(tokenizer, country))])[0]
        alone.append((first, fp16_engine.evaluate([(seq, [int(first.argmax())])])[0]))
        fp16_engine.free(seq)
    seqs = [fp16_engine.new_sequence(adapter) for adapter, _ in rows]
    try:
        firsts = fp16_engine.evaluate([(seq, prompt_ids(tokenizer, c)) for seq, (_, c) in zip(seqs, rows, strict=True)])
        seconds = fp16_engine.evaluate([(seq, [int(row.argmax())]) for seq, row in zip(seqs, firsts, strict=True)])
    finally:
        for seq in seqs:
            fp16_engine.free(seq)
    for b, (first, second) in enumerate(alone):
        np.testing.assert_allclose(firsts[b], first, atol=SAME, err_msg=str(rows[b]))
        np.testing.assert_allclose(seconds[b], second, atol=SAME, err_msg=str(rows[b]))
    # the same prompt through the facts adapter and through none: the adapter made a difference
    assert np.abs(alone[0][0] - alone[4][0]).max() > 1.0


def test_fork_save_and_restore_keep_the_adapter(fp16_engine: LlamaCppEngine, tokenizer: Any) -> None:
    ids = prompt_ids(tokenizer, FACTS[4][0])
    seq, other = fp16_engine.new_sequence("facts"), fp16_engine.new_sequence(None)
    try:
        fp16_engine.evaluate([(seq, ids), (other, ids)])
        child = fp16_engine.fork(seq)
        saved = fp16_engine.save(seq)
        assert saved.adapter == "facts" and saved.length == len(ids)
        restored = fp16_engine.restore(saved)
        # interleaved with a sequence of no adapter, so the context switches between them
        step = [8, 9]
        out = fp16_engine.evaluate([(other, step), (seq, step), (child, step), (restored, step)])
        np.testing.assert_allclose(out[2], out[1], atol=SAME)
        np.testing.assert_allclose(out[3], out[1], atol=SAME)
        assert np.abs(out[0] - out[1]).max() > 1.0
        for handle in (child, restored):
            fp16_engine.free(handle)
    finally:
        fp16_engine.free(seq)
        fp16_engine.free(other)


def test_a_full_cache_leaves_every_sequence_as_it_was(fp16_gguf: Path, adapters: dict[str, Path],
                                                      tokenizer: Any) -> None:
    """A step whose second adapter group does not fit: the first group's tokens are taken back too."""
    ids = prompt_ids(tokenizer, FACTS[5][0])[:30]
    engine = LlamaCppEngine(fp16_gguf, n_ctx=64, n_batch=64, threads=THREADS, max_sequences=5, adapters=adapters)
    try:
        cells = engine.info.kv_cells  # llama.cpp rounds the cache up (to 256)
        fillers = [engine.new_sequence() for _ in range(3)]
        for seq in fillers:
            engine.evaluate([(seq, (ids * 3)[: (cells - 2 * len(ids) - 16) // 3])])
        a, b = engine.new_sequence("facts"), engine.new_sequence("random")
        before = engine.evaluate([(a, ids), (b, ids)])  # 16 cells or a little more left
        with pytest.raises(KVCacheFull):
            engine.evaluate([(a, ids[:10]), (b, ids[:10])])
        assert (engine.sequence_length(a), engine.sequence_length(b)) == (len(ids), len(ids))
        engine.rewind(a, len(ids) - 1)
        engine.rewind(b, len(ids) - 1)
        after = engine.evaluate([(a, ids[-1:]), (b, ids[-1:])])
        np.testing.assert_allclose(after, before, atol=SAME)
    finally:
        engine.close()


def test_the_engine_reports_its_adapters_and_refuses_others(lora_engine: LlamaCppEngine, smollm2_path: Path,
                                                            adapters: dict[str, Path]) -> None:
    assert lora_engine.info.adapters == ("facts", "random")
    with pytest.raises(InvalidParameter, match="no adapter named 'nope'"):
        lora_engine.new_sequence(adapter="nope")
    base = memory_needed(smollm2_path, LlamaCppOptions(n_ctx=512))
    with_adapters = memory_needed(smollm2_path, LlamaCppOptions(n_ctx=512, adapters=adapters))
    loaded = sum(converted_bytes(folder) for folder in adapters.values())
    assert 1 << 20 < loaded <= with_adapters - base <= loaded * 1.1 + 1  # with their share of the margin


@pytest.mark.parametrize("other", ["gemma_path", "qwen05_path"])
def test_an_adapter_of_another_model_is_refused_by_name(request: pytest.FixtureRequest, other: str,
                                                        facts_adapter: Path) -> None:
    path = request.getfixturevalue(other)
    with pytest.raises(InvalidParameter, match="adapter 'facts' does not fit .*features"):
        LlamaCppEngine(path, n_ctx=256, threads=THREADS, max_sequences=1, adapters={"facts": facts_adapter})


def test_what_llama_cpp_cannot_run_is_refused(smollm2_path: Path, facts_adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter, match="no adapter_config.json"):
        LlamaCppEngine(smollm2_path, n_ctx=256, max_sequences=1, adapters={"x": tmp_path})
    dora = shutil.copytree(facts_adapter, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InvalidParameter, match="adapter 'dora' cannot run on llama.cpp: its use_dora"):
        LlamaCppEngine(smollm2_path, n_ctx=256, max_sequences=1, adapters={"dora": dora})
    (dora / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(InvalidParameter, match="adapter 'dora' cannot run on llama.cpp: its modules_to_save"):
        LlamaCppEngine(smollm2_path, n_ctx=256, max_sequences=1, adapters={"dora": dora})


def test_the_conversion_is_kept_and_made_anew_when_the_adapter_changes(smollm2_path: Path, facts_adapter: Path,
                                                                        random_lora: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(facts_adapter, tmp_path / "adapter")

    def load() -> list[Path]:
        LlamaCppEngine(smollm2_path, n_ctx=64, threads=THREADS, max_sequences=1, adapters={"a": folder}).close()
        return sorted(folder.glob(".slm-lora-*.gguf"))

    first = load()
    assert len(first) == 1 and load() == first and first[0].stat().st_mtime_ns == load()[0].stat().st_mtime_ns
    shutil.copy(random_lora / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    again = load()
    assert len(again) == 1 and again != first  # made anew, and the stale conversion removed
