"""A sentence-transformers BERT folder (all-MiniLM-L6-v2) -> GGUF, as llama.cpp's ``bert`` architecture reads it.

llama.cpp runs BERT as an encoder: no causal mask, no KV cache, and the pooling it applies to the token states
read from ``bert.pooling_type`` (mean 1, cls 2), which comes from the folder's sentence-transformers Pooling
module. llama.cpp does not normalize the pooled vector itself; the folder's ``Normalize`` module and its
``max_seq_length`` are written as ``sentence_transformers.*`` keys so that slm's llama.cpp embedder does what
sentence-transformers does. The WordPiece vocabulary is written in llama.cpp's form (``tokenizer.ggml.model``
"bert": "##" continuations bare, word starts behind "▁"), with the normalizer's lowercasing, and checked by
tokenizing sample texts with llama.cpp against the Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from slm.engines.embedding import read_pooling
from slm.errors import EngineError, InvalidParameter
from slm.tools.gguf_export import PROBES, add_tensor

POOLING_TYPES = {"mean": 1, "cls": 2}
"""slm's pooling -> llama.cpp's ``LLAMA_POOLING_TYPE`` (``gguf.PoolingType``)."""
NORMALIZE_KEY = "sentence_transformers.normalize"
MAX_LENGTH_KEY = "sentence_transformers.max_seq_length"
SKIPPED = ("pooler.", "embeddings.position_ids")
"""BERT's next-sentence pooler is not the sentence-transformers pooling: llama.cpp does that itself."""
ADDED = ("position_embd.weight", "token_types.weight")
"""Tables llama.cpp adds whole to the token embeddings (not rows it looks up): float32, as its add needs."""


def export(folder: Path, output: Path, precision: str) -> None:
    """Write the sentence-transformers BERT model in ``folder`` as one GGUF file at ``output``."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from slm.engines.transformers import quiet

    pooling = read_pooling(folder)
    if pooling.mode not in POOLING_TYPES:
        raise InvalidParameter("to", f"{folder} pools by {pooling.mode}; llama.cpp's BERT pools by "
                                     f"{' or '.join(POOLING_TYPES)}")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise InvalidParameter("to", f"{folder}'s positions are {config.position_embedding_type}; llama.cpp's "
                                     "BERT reads absolute position embeddings")
    with quiet():
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    arch = gguf.MODEL_ARCH.BERT
    writer = gguf.GGUFWriter(str(output), gguf.MODEL_ARCH_NAMES[arch])
    _write_parameters(writer, config, precision)
    writer.add_pooling_type(gguf.PoolingType(POOLING_TYPES[pooling.mode]))
    writer.add_bool(NORMALIZE_KEY, pooling.normalize)
    if pooling.max_length:
        writer.add_uint32(MAX_LENGTH_KEY, min(pooling.max_length, int(config.max_position_embeddings)))
    vocab = _vocabulary(folder, tokenizer, int(config.vocab_size))
    _write_vocabulary(writer, vocab, int(config.type_vocab_size))
    _check_tokens(config, vocab, tokenizer)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    with torch.inference_mode():
        for hf_name, tensor in model.state_dict().items():
            if hf_name.startswith(SKIPPED):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise EngineError(f"no GGUF name for the tensor {hf_name} of this BERT model")
            add_tensor(writer, name, tensor.float().numpy(), "fp32" if name in ADDED else precision)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_parameters(writer: Any, config: Any, precision: str) -> None:
    import gguf

    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    writer.add_causal_attention(False)
    writer.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[precision])


def _vocabulary(folder: Path, tokenizer: Any, rows: int) -> dict[str, Any]:
    """The WordPiece vocabulary as llama.cpp's "bert" tokenizer reads it, and the ids of its special tokens."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if (spec.get("model") or {}).get("type") != "WordPiece":
        raise InvalidParameter("to", f"{folder}'s tokenizer is {(spec.get('model') or {}).get('type')}; a BERT "
                                     "GGUF converted here needs WordPiece")
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(rows):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in special:
            tokens.append(text)
            types.append(int(gguf.TokenType.CONTROL))
        else:  # llama.cpp marks word starts, not continuations: "##ing" -> "ing", "play" -> "▁play"
            tokens.append(text[2:] if text.startswith("##") else "\u2581" + text)
            types.append(int(gguf.TokenType.NORMAL))
    norm = _bert_normalizer(spec.get("normalizer") or {})
    ids = {role: getattr(tokenizer, f"{role}_token_id", None) for role in ("cls", "sep", "pad", "unk", "mask")}
    if ids["cls"] is None or ids["sep"] is None:
        raise InvalidParameter("to", f"{folder}'s tokenizer has no [CLS] and [SEP] tokens, which BERT inputs need")
    return {"tokens": tokens, "types": types, "lowercase": bool(norm.get("lowercase")),
            "strip_accents": norm.get("strip_accents"), **ids}


def _bert_normalizer(normalizer: dict[str, Any]) -> dict[str, Any]:
    """The BertNormalizer's options, alone or in a Sequence (llama.cpp always cleans text and splits CJK)."""
    if normalizer.get("type") == "Sequence":
        for step in normalizer.get("normalizers") or []:
            if step.get("type") == "BertNormalizer":
                return dict(step)
        return {}
    return dict(normalizer) if normalizer.get("type") == "BertNormalizer" else {}


def _write_vocabulary(writer: Any, vocab: dict[str, Any], token_types: int) -> None:
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_type_count(token_types)
    # [CLS] is what llama.cpp calls BOS for WordPiece: added in front, [SEP] at the end
    writer.add_bos_token_id(int(vocab["cls"]))
    writer.add_sep_token_id(int(vocab["sep"]))
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    for role, add in (("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id),
                      ("mask", writer.add_mask_token_id)):
        if vocab[role] is not None:
            add(int(vocab[role]))
    # llama.cpp 0.3.36 reads these (gguf 0.19's writer has no method for them yet); unset, it does not lowercase
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", vocab["lowercase"])
    if vocab["strip_accents"] is not None:  # None: as lowercase, in llama.cpp as in the Hugging Face tokenizer
        writer.add_bool("tokenizer.ggml.normalizer.strip_accents", bool(vocab["strip_accents"]))


def _check_tokens(config: Any, vocab: dict[str, Any], tokenizer: Any) -> None:
    """llama.cpp must split the sample texts as the Hugging Face tokenizer does, special tokens included."""
    import gguf
    import llama_cpp as lc

    from slm.engines.llamacpp import header_only, tokenize

    wanted = [tokenizer(text)["input_ids"] for text in PROBES]
    with tempfile.TemporaryDirectory(prefix="slm-gguf-") as work:
        probe = Path(work) / "vocab.gguf"
        writer = gguf.GGUFWriter(str(probe), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
        _write_parameters(writer, config, "fp32")
        _write_vocabulary(writer, vocab, int(config.type_vocab_size))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        with header_only(probe) as model:
            ids_of = lc.llama_model_get_vocab(model)
            got = [tokenize(ids_of, text, parse_special=False) for text in PROBES]
    for text, ours, theirs in zip(PROBES, got, wanted, strict=True):
        if list(ours) != list(theirs):
            raise EngineError(f"llama.cpp would split {text!r} as {ours}, the model's tokenizer as {theirs}; "
                              "the GGUF would not read text as the model does")

