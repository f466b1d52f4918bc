"""The Phi-3 family and Qwen2 without their weights: tiny random models built from the published
configurations (scaled down), checked on each engine against transformers' reference forward pass and its
`generate()`, after the conversions users run (`slm convert --to onnx`, `slm convert --to gguf`).

Phi-3-mini / Phi-3.5-mini (architecture phi3), Phi-3.5-MoE (phimoe) and Qwen2.5 (qwen2) keep their
published settings (rope theta, norm epsilon, sliding window, activation, experts per token, biases, tied
embeddings, grouped KV heads) with small widths, few layers and SmolLM2's tokenizer. They are saved as
Hugging Face folders, the format Microsoft and Qwen publish them in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, PhimoeConfig, Qwen2Config

import slm
from slm.store.catalog import resolve
from slm.tools.convert import convert

SMALL: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 4}
# From microsoft/Phi-3-mini-4k-instruct's config.json (Phi-3.5-mini shares them but for its long-rope scaling).
PHI3 = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 2047, "hidden_act": "silu",
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "tie_word_embeddings": False}
# From microsoft/Phi-3.5-MoE-instruct's config.json: 16 experts, 2 per token (here 4 experts, 2 per token),
# biases on the attention projections and the output layer.
PHIMOE = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 131072, "hidden_act": "silu",
          "max_position_embeddings": 4096, "num_local_experts": 4, "num_experts_per_tok": 2,
          "attention_bias": True, "lm_head_bias": True, "tie_word_embeddings": False}
# From Qwen/Qwen2.5-0.5B-Instruct's config.json: 14 query heads over 2 KV heads (here 4 over 2), biases on
# q/k/v, tied embeddings, rope theta 1e6, no sliding window.
QWEN2 = {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 32768,
         "use_sliding_window": False, "tie_word_embeddings": True, "num_key_value_heads": 2}
CONFIGS = {"phi3": (Phi3Config, PHI3), "phimoe": (PhimoeConfig, PHIMOE), "qwen2": (Qwen2Config, QWEN2)}
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def build(kind: str, folder: Path, tokenizer_from: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    kind_of, published = CONFIGS[kind]
    config = kind_of(**(SMALL | published), **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is nearly flat: spread the output so greedy choices are clear
        model.get_output_embeddings().weight.mul_(8.0)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # zero-initialised: make them count
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_hf_path: Path) -> Path:
    return build(request.param, tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}", smollm2_hf_path)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Iterator[Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    yield model


def reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()  # type: ignore[no-any-return]


def assert_matches_reference(model: slm.Model, reference: Any, atol: float) -> None:
    """Logits after each text equal the reference forward's; greedy tokens equal its ``generate()``."""
    for text in TEXTS:
        ids = model.tokenize(text)
        seq = model.engine.new_sequence()
        logits = model.engine.evaluate([(seq, ids)])[0]
        model.engine.free(seq)
        np.testing.assert_allclose(logits, reference_logits(reference, ids), atol=atol)
        ours = model.generate(ids, temperature=0, max_tokens=16).tokens
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
        assert ours == theirs.tolist()[: len(ours)]


def test_the_transformers_engine_matches_the_reference_forward_and_generate(tiny: Path, reference: Any) -> None:
    with slm.load(str(tiny), max_sequences=4) as model:
        assert model.info.architecture == reference.config.model_type
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


def test_the_onnx_engine_matches_the_reference(tiny: Path, reference: Any, tmp_path: Path) -> None:
    """ONNX Runtime GenAI's model builder builds Phi-3.5-MoE for CUDA int4 only, never for the CPU."""
    kind = reference.config.model_type
    if kind == "phimoe":
        with pytest.raises(slm.SlmError, match="model builder"):
            convert(resolve(str(tiny)), "onnx", output=tmp_path / "onnx", precision="fp32")
        assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx.part").exists()
        return
    built = convert(resolve(str(tiny)), "onnx", output=tmp_path / "onnx", precision="fp32")
    with slm.load(str(built), max_sequences=1) as model:
        assert model.info.architecture == kind
        assert_matches_reference(model, reference, atol=1e-3)


def test_the_llamacpp_engine_matches_the_reference(tiny: Path, reference: Any, tmp_path: Path) -> None:
    """Phi-3.5-MoE is the exception: llama.cpp builds it with RMS norms (plus the bias) where the reference
    has LayerNorm, and routes by a softmax over the experts, top 2 renormalised, where the reference has
    sparsemixer. Its logits match the reference only with both changes made to the reference."""
    kind = reference.config.model_type
    built = convert(resolve(str(tiny)), "gguf", output=tmp_path / "tiny.gguf", precision="fp32")
    with slm.load(str(built), max_sequences=1, flash_attention=False) as model:
        assert model.engine.name == "llama.cpp" and model.info.architecture == kind
        if kind != "phimoe":
            assert_matches_reference(model, reference, atol=5e-3)
            return
        ids = model.tokenize(TEXTS[0])
        seq = model.engine.new_sequence()
        ours = model.engine.evaluate([(seq, ids)])[0]
        assert np.abs(ours - reference_logits(reference, ids)).max() > 0.1  # not the reference model
        as_llamacpp_builds_it = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
        with pytest.MonkeyPatch.context() as patch:
            _rms_norms_and_softmax_routing(as_llamacpp_builds_it, patch)
            np.testing.assert_allclose(ours, reference_logits(as_llamacpp_builds_it, ids), atol=5e-3)


def _rms_norms_and_softmax_routing(model: Any, patch: pytest.MonkeyPatch) -> None:
    import transformers.models.phimoe.modeling_phimoe as phimoe

    class RMSNormWithBias(torch.nn.Module):
        def __init__(self, norm: torch.nn.LayerNorm) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm.eps) * self.norm.weight + self.norm.bias

    def softmax_top_k(scores: torch.Tensor, jitter_eps: float, training: bool, top_k: int = 2) -> Any:
        weights, chosen = torch.softmax(scores, -1).topk(top_k, -1)
        return weights / weights.sum(-1, keepdim=True), chosen

    for layer in model.model.layers:
        layer.input_layernorm = RMSNormWithBias(layer.input_layernorm)
        layer.post_attention_layernorm = RMSNormWithBias(layer.post_attention_layernorm)
    model.model.norm = RMSNormWithBias(model.model.norm)
    patch.setattr(phimoe, "sparsemixer", softmax_top_k)


def test_smollm2_converted_back_to_gguf_matches_transformers(smollm2_hf_path: Path, tmp_path: Path) -> None:
    """The round trip users run: the GGUF dequantized to a Hugging Face folder, written back as a float32
    GGUF (llama's rotary layout permuted back, tied embeddings), read by llama.cpp."""
    built = convert(resolve(str(smollm2_hf_path)), "gguf", output=tmp_path / "smollm2.gguf", precision="fp32")
    reference = AutoModelForCausalLM.from_pretrained(smollm2_hf_path, dtype=torch.float32).eval()
    with slm.load(str(built), max_sequences=1, flash_attention=False) as model:
        assert model.info.architecture == "llama"
        for text in TEXTS:  # logits around 20
            ids = model.tokenize(text)
            seq = model.engine.new_sequence()
            logits = model.engine.evaluate([(seq, ids)])[0]
            model.engine.free(seq)
            np.testing.assert_allclose(logits, reference_logits(reference, ids), atol=5e-2)


def test_gemma3_cannot_be_built_for_onnx_runtime_genai_here(gemma_path: Path, tmp_path: Path) -> None:
    """The coverage table's Gemma 3 / ONNX cell: onnxruntime-genai 0.18's model builder reads Gemma 3's rope
    settings in the layout before transformers 5 and stops; slm says so and leaves nothing behind. When a
    builder reads them, this test fails and the cell can be filled."""
    hf = convert(resolve(str(gemma_path)), "hf", output=tmp_path / "gemma-hf")
    with pytest.raises(slm.SlmError, match="model builder failed.*rope_type"):
        convert(resolve(str(hf)), "onnx", output=tmp_path / "gemma-onnx", precision="fp32")
    assert not (tmp_path / "gemma-onnx").exists() and not (tmp_path / "gemma-onnx.part").exists()


def test_a_sentencepiece_style_tokenizer_converts_for_llamacpp(tmp_path: Path) -> None:
    """Phi-3's tokenizer is byte-fallback BPE over "▁"-marked pieces (SentencePiece's scheme), not SmolLM2's
    byte-level BPE. A tiny one of that kind, trained here, on a tiny Phi-3 with padding rows beyond it:
    llama.cpp must split text as the Hugging Face tokenizer does, and compute as the reference."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [p.read_text(encoding="utf-8") for p in sorted(Path(__file__).parent.glob("*.py"))]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1500, special_tokens=special, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    folder = tmp_path / "tiny-phi3-spm"
    config = Phi3Config(**(SMALL | PHI3), vocab_size=len(fast) + 13, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        hf_model.get_output_embeddings().weight.mul_(8.0)
    hf_model.save_pretrained(folder)
    fast.save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    built = convert(resolve(str(folder)), "gguf", output=tmp_path / "tiny.gguf", precision="fp32")
    with slm.load(str(built), max_sequences=1, flash_attention=False) as model:
        for text in [*TEXTS, "   leading spaces\n\tand tabs", "a  b   c    d", "Ünïcödé 🙂"]:
            assert model.tokenize(text, add_special=False) == fast.encode(text, add_special_tokens=False), text
        assert_matches_reference(model, reference, atol=5e-3)


def test_llama_with_attention_biases_converts_and_unknown_rope_scaling_is_refused(tmp_path: Path,
                                                                                 smollm2_hf_path: Path) -> None:
    """llama's rotary layout is permuted for llama.cpp: the q/k biases with the weights. A rope scaling the
    converter does not write is refused, not silently dropped."""
    from transformers import LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_path)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    for name, extra in (("biased", {}), ("scaled", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}})):
        config = LlamaConfig(**SMALL, **ids, attention_bias=True, rope_theta=10000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=4096, tie_word_embeddings=False, **extra)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
            for param_name, param in model.named_parameters():
                if param_name.endswith(".bias"):
                    param.normal_(0, 0.5)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "biased", dtype=torch.float32).eval()
    built = convert(resolve(str(tmp_path / "biased")), "gguf", output=tmp_path / "biased.gguf", precision="fp32")
    with slm.load(str(built), max_sequences=1, flash_attention=False) as loaded:
        assert_matches_reference(loaded, reference, atol=5e-3)
    with pytest.raises(slm.InvalidParameter, match="rope scaling .'linear'. is not one"):
        convert(resolve(str(tmp_path / "scaled")), "gguf", output=tmp_path / "scaled.gguf", precision="fp32")
    assert not (tmp_path / "scaled.gguf").exists() and not (tmp_path / "scaled.gguf.part").exists()


def test_a_tokenizer_a_gguf_cannot_hold_is_refused_by_name(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "cat", "sat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(**SMALL, vocab_size=len(words), bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "words")
    fast.save_pretrained(tmp_path / "words")
    with pytest.raises(slm.InvalidParameter, match=r"tokenizer \(WordLevel\) is neither byte-level"):
        convert(resolve(str(tmp_path / "words")), "gguf", output=tmp_path / "words.gguf", precision="fp32")
    assert not (tmp_path / "words.gguf").exists() and not (tmp_path / "words.gguf.part").exists()
