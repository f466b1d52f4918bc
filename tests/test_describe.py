"""store/describe: what a model's files say about it, checked against what loading it says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PhimoeConfig,
    PretrainedConfig,
    Qwen2Config,
)

from slm.store.catalog import resolve
from slm.store.describe import describe, human_count
from slm.tools.convert import convert

SMALL: dict[str, Any] = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
# One of each layout describe counts, with the options that change the count (biases, tied embeddings,
# Gemma 3's four norms a layer and its q/k norms, a head_dim that is not hidden / heads).
CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama-biases": LlamaConfig(**SMALL, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "mistral": MistralConfig(**SMALL, tie_word_embeddings=False, head_dim=32),
    "phi3": Phi3Config(**SMALL, tie_word_embeddings=False, pad_token_id=0),
    "qwen2": Qwen2Config(**SMALL, tie_word_embeddings=True),
    "gemma3_text": Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=4, query_pre_attn_scalar=32,
                                    layer_types=["sliding_attention", "full_attention"]),
}


def saved(config: PretrainedConfig, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_count_from_config_json_is_transformers_count_of_the_weights(kind: str, tmp_path: Path) -> None:
    model = saved(CONFIGS[kind], tmp_path / kind)
    facts = describe(resolve(str(tmp_path / kind)))
    assert facts.parameters == sum(p.numel() for p in model.parameters())
    assert facts.architecture == CONFIGS[kind].model_type
    assert facts.context_length == 512 and facts.precision == "float32"


def test_a_layout_it_does_not_know_is_unknown_not_a_guess(tmp_path: Path) -> None:
    saved(PhimoeConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2), tmp_path / "moe")
    facts = describe(resolve(str(tmp_path / "moe")))
    assert facts.parameters is None and facts.architecture == "phimoe"


def test_the_real_smollm2_count_is_llamacpps(smollm2_hf_path: Path, model: Any) -> None:
    assert describe(resolve(str(smollm2_hf_path))).parameters == model.info.parameters == 134_515_008
    assert human_count(134_515_008) == "135M" and human_count(494_032_768) == "494M"
    assert human_count(1_543_714_304) == "1.5B"


@pytest.mark.parametrize("precision", ["int4", "int8", "fp16", "fp32"])
def test_an_openvino_folder_says_the_precision_it_was_converted_at(precision: str, tmp_path: Path,
                                                                   smollm2_hf_path: Path) -> None:
    folder = tmp_path / "tiny"
    saved(LlamaConfig(**SMALL | {"vocab_size": 49152}, tie_word_embeddings=True), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the export writes OpenVINO tokenizers from it
        (folder / name).write_bytes((smollm2_hf_path / name).read_bytes())
    built = convert(resolve(str(folder)), "openvino", output=tmp_path / "ov", precision=precision)
    facts = describe(resolve(str(built)))
    assert (facts.precision, facts.architecture, facts.context_length) == (precision, "llama", 512)
    assert facts.parameters == describe(resolve(str(folder))).parameters
