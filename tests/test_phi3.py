"""The Phi-3 family without its weights: tiny random models built from the published configurations (scaled
down), checked on each engine against transformers' reference forward pass and its `generate()`.

Phi-3-mini / Phi-3.5-mini (architecture phi3) and Phi-3.5-MoE (phimoe) keep their published settings (rope
theta, norm epsilon, sliding window, activation, experts per token) with small widths, few layers and
SmolLM2's tokenizer. They are saved as Hugging Face folders, the format Microsoft publishes them in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, PhimoeConfig

import slm

SMALL: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 4}
# From microsoft/Phi-3-mini-4k-instruct's config.json (Phi-3.5-mini shares them but for its long-rope scaling).
PHI3 = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 2047, "hidden_act": "silu",
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "tie_word_embeddings": False}
# From microsoft/Phi-3.5-MoE-instruct's config.json: 16 experts, 2 per token (here 4 experts, 2 per token).
PHIMOE = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 131072, "hidden_act": "silu",
          "max_position_embeddings": 4096, "num_local_experts": 4, "num_experts_per_tok": 2,
          "tie_word_embeddings": False}
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def build(kind: str, folder: Path, tokenizer_from: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = Phi3Config(**SMALL, **PHI3, **ids) if kind == "phi3" else PhimoeConfig(**SMALL, **PHIMOE, **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is nearly flat: spread the output so greedy choices are clear
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["phi3", "phimoe"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_hf_path: Path) -> Path:
    return build(request.param, tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}", smollm2_hf_path)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Iterator[Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    yield model


def reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()  # type: ignore[no-any-return]


def test_the_transformers_engine_matches_the_reference_forward_and_generate(tiny: Path, reference: Any) -> None:
    with slm.load(str(tiny), max_sequences=4) as model:
        assert model.info.architecture in ("phi3", "phimoe")
        engine = model.engine
        prompts = [model.tokenize(t) for t in TEXTS]
        seqs = [engine.new_sequence() for _ in prompts]
        batched = engine.evaluate(list(zip(seqs, prompts, strict=True)))  # three lengths in one forward
        for seq in seqs:
            engine.free(seq)
        for row, ids in zip(batched, prompts, strict=True):
            np.testing.assert_allclose(row, reference_logits(reference, ids), atol=1e-4)
        for ids in prompts:
            ours = model.generate(ids, temperature=0, max_tokens=16, logit_bias={}).tokens
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
            assert ours == theirs.tolist()[: len(ours)]


def test_the_onnx_engine_matches_the_reference_forward_on_phi3(tmp_path: Path, smollm2_hf_path: Path) -> None:
    """Phi-3 only: ONNX Runtime GenAI's model builder builds Phi-3.5-MoE for CUDA int4, never for the CPU."""
    from slm.catalog import resolve
    from slm.convert import convert

    tiny = build("phi3", tmp_path / "tiny-phi3", smollm2_hf_path)
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    built = convert(resolve(str(tiny)), "onnx", output=tmp_path / "onnx", precision="fp32")
    with slm.load(str(built), max_sequences=1) as model:
        assert model.info.architecture == "phi3"
        for text in TEXTS:
            ids = model.tokenize(text)
            seq = model.engine.new_sequence()
            logits = model.engine.evaluate([(seq, ids)])[0]
            model.engine.free(seq)
            np.testing.assert_allclose(logits, reference_logits(reference, ids), atol=1e-3)
            ours = model.generate(ids, temperature=0, max_tokens=16).tokens
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
            assert ours == theirs.tolist()[: len(ours)]
