"""LoRA adapters on the transformers engine: greedy through an adapter equals peft's own ``generate()``; one
``evaluate`` mixing adapters equals each alone; fork, save and restore keep a sequence's adapter; an adapter
of another model fails at load, naming it and the mismatch.

The adapters are those of ``tests/lora.py`` (SmolLM2's HF folder trained on made-up facts, and one of random
weights); the mismatched models are tiny random ones built from real configurations.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig

from lora import FACTS, HELD_OUT_QUESTION, chat
from slm.engines import registry
from slm.engines.base import SavedSequence
from slm.engines.transformers import TransformersEngine
from slm.engines.transformers_lora import adapter_bytes
from slm.errors import InvalidParameter
from slm.store import catalog

pytestmark = pytest.mark.filterwarnings(  # peft on transformers 5
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

STEPS = 8
"""Greedy tokens per answer: the capital, a full stop and the end of the turn fit."""
SMALL: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def prompt_ids(tokenizer: Any, country: str) -> list[int]:
    ids: list[int] = tokenizer.apply_chat_template(chat(HELD_OUT_QUESTION.format(country)),
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
    return ids


def engine_greedy(engine: TransformersEngine, adapter: str | None, ids: list[int]) -> list[int]:
    """``STEPS`` greedy tokens through slm's engine, one sequence opened with ``adapter``."""
    seq = engine.new_sequence(adapter)
    try:
        logits = engine.evaluate([(seq, ids)])[0]
        out: list[int] = []
        while len(out) < STEPS:
            out.append(int(np.argmax(logits)))
            logits = engine.evaluate([(seq, [out[-1]])])[0]
        return out
    finally:
        engine.free(seq)


def peft_greedy(model: Any, ids: list[int]) -> list[int]:
    """peft's own greedy ``generate()`` (it stops at the end of the turn)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=STEPS, do_sample=False)
    return [int(t) for t in out[0, len(ids):]]


@pytest.fixture(scope="module")
def adapters(facts_adapter: Path, random_lora: Path) -> dict[str, Path]:
    return {"facts-lora": facts_adapter, "random-lora": random_lora}


@pytest.fixture(scope="module")
def engine(smollm2_hf_path: Path, adapters: dict[str, Path]) -> Iterator[TransformersEngine]:
    e = TransformersEngine(smollm2_hf_path, n_ctx=512, threads=1, max_sequences=4, adapters=adapters)
    yield e
    e.close()


@pytest.fixture(scope="module")
def peft_model(smollm2_hf_path: Path, facts_adapter: Path) -> Any:
    import peft

    base = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_path), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, str(facts_adapter)).eval()


def test_greedy_through_the_adapter_equals_peft_generate(engine: TransformersEngine, peft_model: Any) -> None:
    """Token for token on every held-out question, through the facts adapter and through none (peft with its
    adapter disabled); the adapter answers the made-up facts and the model alone does not."""
    right = {"facts-lora": 0, None: 0}
    for country, capital in FACTS:
        ids = prompt_ids(engine.tokenizer, country)
        for adapter in right:
            ours = engine_greedy(engine, adapter, ids)
            if adapter is None:
                with peft_model.disable_adapter():
                    theirs = peft_greedy(peft_model, ids)
            else:
                theirs = peft_greedy(peft_model, ids)
            assert len(theirs) >= 3 and ours[: len(theirs)] == theirs, (country, adapter)
            right[adapter] += capital in engine.detokenize(ours)
    # measured: 7 of 8 through the adapter, 0 without
    assert right["facts-lora"] >= 6 and right[None] <= 1, right


def test_one_evaluate_mixing_adapters_equals_each_alone(engine: TransformersEngine) -> None:
    """Rows of prompts of different lengths through the facts adapter, the random one, none, and the facts
    adapter again, in one forward pass (and a decode step of all four): each row's logits as if it ran alone."""
    rows = [("facts-lora", "Zorbia"), ("random-lora", "Mirandel"), (None, "Palundra"), ("facts-lora", "Yrrith")]
    prompts = [prompt_ids(engine.tokenizer, country) + [engine.tokenize(country, add_special=False)[0]] * i
               for i, (_, country) in enumerate(rows)]  # lengths differ: the rows are padded
    alone = []
    for (adapter, _), ids in zip(rows, prompts, strict=True):
        seq = engine.new_sequence(adapter)
        first = engine.evaluate([(seq, ids)])[0]
        alone.append((first, engine.evaluate([(seq, [int(np.argmax(first))])])[0]))
        engine.free(seq)
    seqs = [engine.new_sequence(adapter) for adapter, _ in rows]
    try:
        first = engine.evaluate(list(zip(seqs, prompts, strict=True)))
        then = engine.evaluate([(seq, [int(np.argmax(row))]) for seq, row in zip(seqs, first, strict=True)])
    finally:
        for seq in seqs:
            engine.free(seq)
    for b, (one, two) in enumerate(alone):
        np.testing.assert_allclose(first[b], one, atol=1e-4, err_msg=str(rows[b]))
        np.testing.assert_allclose(then[b], two, atol=1e-4, err_msg=str(rows[b]))
    # the adapters do change the logits (the test above would pass with none applied otherwise)
    assert np.abs(first[0] - first[3]).max() > 1 and np.abs(alone[1][0] - alone[2][0]).max() > 1


def test_fork_save_and_restore_keep_the_adapter(engine: TransformersEngine, tmp_path: Path,
                                                smollm2_hf_path: Path) -> None:
    ids = prompt_ids(engine.tokenizer, "Vexmoor")
    seq = engine.new_sequence("facts-lora")
    base = engine.new_sequence()
    opened = [seq, base]
    try:
        token = int(np.argmax(engine.evaluate([(seq, ids), (base, ids)])[0]))
        child = engine.fork(seq)
        opened.append(child)
        saved = engine.save(seq)
        assert saved.adapter == "facts-lora"
        restored = engine.restore(saved)
        opened.append(restored)
        step = engine.evaluate([(s, [token]) for s in opened])
        for b in (2, 3):  # the fork and the restored copy continue as the sequence itself
            np.testing.assert_allclose(step[b], step[0], atol=1e-4)
        assert np.abs(step[0] - step[1]).max() > 1  # ... and not as the model alone
        assert engine.save(base).adapter is None
    finally:
        for s in opened:
            engine.free(s)
    with pytest.raises(InvalidParameter, match="no adapter named 'nope' is loaded \\(loaded: facts-lora, random-lora"):
        engine.new_sequence("nope")
    with pytest.raises(InvalidParameter, match="no adapter named 'nope'"):
        engine.restore(SavedSequence(0, 0, None, adapter="nope"))


def test_info_and_memory_count_the_adapters(engine: TransformersEngine, converted_home: Path,
                                            adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine.info.adapters == ("facts-lora", "random-lora")
    monkeypatch.setenv("SLM_HOME", str(converted_home))
    model = catalog.resolve("smollm2-hf")
    more = registry.memory_needed(model, "transformers", adapters=adapters) \
        - registry.memory_needed(model, "transformers")
    stored = sum((folder / "adapter_model.safetensors").stat().st_size for folder in adapters.values())
    weights = sum(adapter_bytes(folder) for folder in adapters.values())
    assert weights <= more <= weights * 1.1 + 1  # with the margin the engine keeps over weights
    assert 0 < stored - weights < stored // 100  # float32 weights, as stored (the file adds its header)


def tiny(folder: Path, config: Any, tokenizer_from: Path) -> Path:
    """A tiny random model of ``config``'s architecture with SmolLM2's tokenizer, saved to ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_adapter_of_another_model_fails_at_load_naming_both(tmp_path: Path, smollm2_hf_path: Path,
                                                                 facts_adapter: Path) -> None:
    """A Llama of other widths (a weight of another shape), Gemma 3 (another architecture, which slm_adapter.json
    names), and Gemma 3 under a peft adapter that names no architecture (its weights do not fit)."""
    llama = tiny(tmp_path / "tiny-llama", LlamaConfig(**SMALL), smollm2_hf_path)
    gemma = tiny(tmp_path / "tiny-gemma3", Gemma3TextConfig(**SMALL, sliding_window=64), smollm2_hf_path)
    foreign = Path(shutil.copytree(facts_adapter, tmp_path / "foreign"))
    (foreign / catalog.ADAPTER_INFO).unlink()
    cases = [(llama, facts_adapter, "does not fit tiny-llama: size mismatch for .*q_proj.lora_A"),
             (gemma, facts_adapter, "does not fit tiny-gemma3: it was trained on LlamaForCausalLM and this model "
                                    "is Gemma3ForCausalLM"),
             (gemma, foreign, "the LoRA adapter in .*foreign\\) does not fit tiny-gemma3: size mismatch")]
    for model, adapter, message in cases:
        with pytest.raises(InvalidParameter, match=f"adapters: mine \\(.*{message}"):
            TransformersEngine(model, n_ctx=64, threads=1, adapters={"mine": adapter})
    with pytest.raises(InvalidParameter, match="not a LoRA adapter folder"):
        TransformersEngine(llama, n_ctx=64, threads=1, adapters={"mine": tmp_path})
    # without adapters, a saved sequence of one cannot come back
    plain = TransformersEngine(llama, n_ctx=64, threads=1)
    with pytest.raises(InvalidParameter, match="no adapter named 'facts-lora' is loaded \\(none is loaded\\)"):
        plain.restore(SavedSequence(1, 0, None, adapter="facts-lora"))
    assert plain.info.adapters == ()
    plain.close()
