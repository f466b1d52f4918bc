"""Hugging Face folder -> GGUF, for llama.cpp, with the ``gguf`` package's writer and tensor names.

llama.cpp's own converter (``convert_hf_to_gguf.py``) lives in its source tree, not in any wheel. This is
the part of it slm needs for the architectures it proves on llama.cpp: llama (SmolLM2), qwen2, phi3
(Phi-3/3.5-mini), phimoe (Phi-3.5-MoE), gemma3 (Gemma 3, alone or as the text part of the Gemma 3
vision-language model) and qwen2vl (Qwen2.5-VL's text part, a Qwen2 with M-RoPE sections); a vision-language
model's vision tower and projector are ``slm.tools.mmproj_export``'s, a sentence-transformers BERT
(all-MiniLM-L6-v2) is ``slm.tools.gguf_bert``'s. The weights
come from transformers (so a folder it loads is a folder we convert); names map through
``gguf.TensorNameMap``; the tokenizer is written as llama.cpp reads it, and its pre-tokenizer is chosen
by checking llama.cpp's tokens against the Hugging Face tokenizer's on sample texts, so a wrong choice
cannot pass silently.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slm.engines.llamacpp_lora import interleave_halves
from slm.errors import EngineError, EngineUnavailable, InvalidModelFile, InvalidParameter

ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2", "phi3": "PHI3", "phimoe": "PHIMOE", "gemma3_text": "GEMMA3",
                 "qwen2_5_vl_text": "QWEN2VL"}
"""transformers' model_type of a text model (or of a vision-language model's text part) -> gguf.MODEL_ARCH."""
PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe", "gpt-2", "default")
"""llama.cpp's pre-tokenizers tried, in this order, for a byte-level BPE tokenizer."""
PROBES = (
    "Hello world! How are you doing today?", "I'm sure you'll see: it's 3:45pm, isn't it?",
    "12345 678 3.14159 1000000", "   leading spaces\n\n\ttabs and\r\nnewlines  ", "def f(x):\n    return x**2 + 1",
    "Ünïcödé, emoji 🙂 and 漢字, русский текст.", "a  b   c    d", "don't STOP—ever... 'quoted' \"twice\"",
)


def export(source: Path, output: Path, precision: str, projector: Path) -> None:
    """Write the Hugging Face model at ``source`` as one GGUF file at ``output``; precision fp32, fp16 or
    q8_0 (checked by ``slm.tools.convert``). A vision-language model's text part goes to ``output``, its
    vision tower and projector to a second GGUF at ``projector`` (the ``mmproj`` llama.cpp's libmtmd reads);
    a text model writes nothing there."""
    try:
        import gguf
        import torch
        from transformers import AutoConfig

        from slm.engines.transformers import load_pretrained
        from slm.tools.mmproj_export import check_vision, write_projector
    except ImportError as e:
        raise EngineUnavailable(f"converting to GGUF needs gguf, transformers and torch ({e}); "
                                "pip install torch==2.13.0 && pip install 'slm[torch]'") from None
    folder = source if source.is_dir() else source.parent
    try:
        declared = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidModelFile(f"{source} has no configuration transformers reads: {e}") from None
    vision = check_vision(declared)  # refused from the configuration, before loading weights
    tokenizer, model = load_pretrained(source)
    config = model.config.get_text_config()
    kind = getattr(config, "model_type", "?")
    if kind not in ARCHITECTURES:
        raise InvalidParameter("to", f"converting {kind} to GGUF is not supported "
                               f"(slm converts {', '.join(ARCHITECTURES)})")
    _check_rope(config, kind)
    if kind == "gemma3_text":
        _check_gemma3(config)
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[kind])
    tokens = _Tokenizer(Path(source), tokenizer, int(model.get_output_embeddings().weight.shape[0]))
    pre = _choose_pre_tokenizer(config, arch, tokens, tokenizer)
    writer = gguf.GGUFWriter(str(output), gguf.MODEL_ARCH_NAMES[arch])
    _write_parameters(writer, config, kind, precision)
    tokens.write(writer, pre)
    with torch.inference_mode():
        for name, array in _tensors(model, config, kind, arch):
            add_tensor(writer, name, array, precision)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if vision:
        write_projector(model, folder, projector, precision)


# --- parameters --------------------------------------------------------------------------------

def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _rope(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs at the top level."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    # Gemma 3 has a set per attention type; llama.cpp's rope settings are the full-attention layers'
    params = dict(params.get("full_attention", params))
    scaling = getattr(config, "rope_scaling", None) or {}
    return {**scaling, **params, "rope_theta": params.get("rope_theta", getattr(config, "rope_theta", 10000.0))}


def _check_rope(config: Any, kind: str) -> None:
    """Refuse a rope scaling this converter does not write: llama.cpp would run plain rope instead."""
    rope = _rope(config)
    scaling = str(rope.get("rope_type") or rope.get("type") or "default")
    allowed = {"default"} | {"phi3": {"longrope", "su"}, "phimoe": {"longrope", "su"},
                             "gemma3_text": {"linear"}}.get(kind, set())
    if scaling not in allowed:
        raise InvalidParameter("to", f"this {kind} model's rope scaling ({scaling!r}) is not one slm's GGUF "
                                     "converter writes; llama.cpp's convert_hf_to_gguf.py does")
    sections = rope.get("mrope_section")
    if kind == "qwen2_5_vl_text" and (not sections or len(sections) > 4
                                       or 2 * sum(sections) != _head_dim(config)):
        raise InvalidParameter("to", f"this {kind} model's M-RoPE sections ({sections}) do not split its "
                                     f"{_head_dim(config)}-wide heads as llama.cpp's qwen2vl reads them")


def _check_gemma3(config: Any) -> None:
    """llama.cpp's gemma3 fixes what transformers reads from the config: refuse a model that differs."""
    head_dim = _head_dim(config)
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
               for i in range(int(config.num_hidden_layers))]
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
    # llama.cpp scales queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) for 62 layers (27B)
    scale = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
    refusals = {
        "layer_types": (list(config.layer_types) != pattern, "every sixth layer full attention, the rest sliding"),
        "query_pre_attn_scalar": (int(config.query_pre_attn_scalar) != scale, f"{scale}"),
        "rope_parameters.sliding_attention.rope_theta": (float(local.get("rope_theta", 10000.0)) != 10000.0,
                                                         "10000"),
        "attn_logit_softcapping": (config.attn_logit_softcapping is not None, "none"),
        "hidden_activation": (config.hidden_activation != "gelu_pytorch_tanh", "gelu_pytorch_tanh"),
        "use_bidirectional_attention": (bool(getattr(config, "use_bidirectional_attention", False)), "false"),
    }
    for field, (differs, wanted) in refusals.items():
        if differs:
            raise InvalidParameter("to", f"this Gemma 3 model's {field} is not what llama.cpp's gemma3 runs "
                                         f"({wanted}); slm does not convert it")


def _write_parameters(writer: Any, config: Any, kind: str, precision: str) -> None:
    import gguf

    rope = _rope(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(_head_dim(config) * rope.get("partial_rotary_factor", 1.0)))
    writer.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[precision])
    if kind == "qwen2_5_vl_text":  # time, height, width (and a fourth, unused) shares of each head's pairs
        sections = [int(v) for v in rope["mrope_section"]]
        writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    if kind in ("phi3", "phimoe"):
        original = int(rope.get("original_max_position_embeddings")
                       or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        if rope.get("long_factor"):
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    if kind == "phimoe":  # LayerNorm, not RMSNorm: llama.cpp reads this epsilon for it
        writer.add_layer_norm_eps(float(config.rms_norm_eps))
        writer.add_expert_count(int(config.num_local_experts))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
    if kind == "gemma3_text":
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
        writer.add_sliding_window(int(config.sliding_window))
        if rope.get("rope_type") == "linear":  # the full-attention layers only, in both
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


# --- tensors -----------------------------------------------------------------------------------

def _tensors(model: Any, config: Any, kind: str, arch: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, in llama.cpp's layout."""
    import gguf

    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.visual.")):
            continue  # a vision-language model's: the projector GGUF's
        hf_name = hf_name.replace("model.language_model.", "model.")
        data = tensor.float().numpy()
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the embeddings when there is no output matrix
        if kind == "gemma3_text" and hf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMS norms scale by (1 + weight), llama.cpp's by the weight
        if hf_name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
            continue
        if kind == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            # llama.cpp's llama rotates adjacent pairs, transformers the two halves of each head
            data = interleave_halves(data, heads if "q_proj" in hf_name else kv_heads)
        if hf_name.endswith("experts.gate_up_proj"):  # (experts, 2 x ff, hidden): gate rows, then up rows
            block = hf_name.split(".")[2]
            gate, up = np.split(data, 2, axis=1)
            yield f"blk.{block}.ffn_gate_exps.weight", np.ascontiguousarray(gate)
            yield f"blk.{block}.ffn_up_exps.weight", np.ascontiguousarray(up)
            continue
        if hf_name.endswith("experts.down_proj"):
            yield f"blk.{hf_name.split('.')[2]}.ffn_down_exps.weight", data
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EngineError(f"no GGUF name for the tensor {hf_name} of this {kind} model")
        yield name, data
    if kind == "phimoe":  # llama.cpp's phimoe needs the biases Phi-3.5-MoE has: zeros where a model has none
        state = model.state_dict()
        head_dim = _head_dim(config)
        sizes = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim, "o": config.hidden_size}
        for block in range(int(config.num_hidden_layers)):
            for proj, size in sizes.items():
                if f"model.layers.{block}.self_attn.{proj}_proj.bias" not in state:
                    name = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}[proj]
                    yield f"blk.{block}.{name}.bias", np.zeros(size, dtype=np.float32)
        if "lm_head.bias" not in state:
            yield "output.bias", np.zeros(int(config.vocab_size), dtype=np.float32)
    rope = _rope(config)
    if kind in ("phi3", "phimoe") and rope.get("long_factor"):
        yield "rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32)


def add_tensor(writer: Any, name: str, data: np.ndarray, precision: str) -> None:
    import gguf

    # The MoE router stays float32, as llama.cpp's converter keeps it: close expert scores must not flip.
    matrix = data.ndim >= 2 and not name.startswith("rope_factors") and "ffn_gate_inp" not in name
    if not matrix or precision == "fp32":
        writer.add_tensor(name, data.astype(np.float32))
    elif precision == "fp16" or data.shape[-1] % 32:  # Q8_0 works in blocks of 32 along a row
        writer.add_tensor(name, data.astype(np.float16))
    else:
        quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


# --- the tokenizer -----------------------------------------------------------------------------

class _Tokenizer:
    """The vocabulary as llama.cpp reads it: byte-level BPE ("gpt2") or SentencePiece-style ("llama")."""

    def __init__(self, source: Path, tokenizer: Any, rows: int) -> None:
        import gguf

        folder = source if source.is_dir() else source.parent
        path = folder / "tokenizer.json"
        if not path.exists():
            raise InvalidParameter("model", f"{folder} has no tokenizer.json, which a GGUF needs")
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec.get("model", {})
        self.folder, self.rows = folder, rows
        self.special = {a["id"]: bool(a.get("special")) for a in spec.get("added_tokens", [])}
        self.space_prefix = _adds_space_prefix(spec)
        if model.get("type") == "BPE" and not model.get("byte_fallback") \
                and (spec.get("decoder") or {}).get("type") == "ByteLevel":
            self.model = "gpt2"
            by_id = {i: t for t, i in model["vocab"].items()}
            by_id.update({a["id"]: a["content"] for a in spec.get("added_tokens", [])})
            self.tokens = [by_id.get(i, f"[PAD{i}]") for i in range(rows)]
            self.scores: list[float] | None = None
            self.types = [self._type(i, i in by_id) for i in range(rows)]
        else:
            self.model = "llama"
            try:
                vocab = gguf.LlamaHfVocab(folder)
                entries = list(vocab.all_tokens())
            except (FileNotFoundError, TypeError, KeyError, ValueError) as e:
                kind_of = model.get("type", "?")
                raise InvalidParameter("to", f"{folder}'s tokenizer ({kind_of}) is neither byte-level nor "
                                             f"byte-fallback BPE, which a GGUF converted here needs ({e})") from None
            # llama.cpp merges SentencePiece-style pieces by score: rank them by id (the merge order), not
            # the placeholder -1000 every token gets here.
            entries = [(text, -float(i) if kind == gguf.TokenType.NORMAL else score, kind)
                       for i, (text, score, kind) in enumerate(entries)]
            # gguf's reader leaves some special added tokens NORMAL (Gemma's <start_of_turn>): llama.cpp would
            # then not parse them in a chat prompt. tokenizer.json's "special" says what they are.
            entries = [(text, score, gguf.TokenType.CONTROL if kind == gguf.TokenType.NORMAL
                        and self.special.get(i) else kind) for i, (text, score, kind) in enumerate(entries)]
            entries += [(f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED) for i in range(len(entries), rows)]
            self.tokens = [text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
                           for text, _, _ in entries]
            self.scores = [score for _, score, _ in entries]
            self.types = [int(kind) for _, _, kind in entries]
        if len(self.tokens) != rows:
            raise EngineError(f"the tokenizer has {len(self.tokens)} tokens, the model {rows} embeddings")
        self.special_vocab = gguf.SpecialVocab(folder, load_merges=self.model == "gpt2", n_vocab=rows)

    def _type(self, token: int, known: bool) -> int:
        import gguf

        if not known:
            return int(gguf.TokenType.UNUSED)
        if token in self.special:
            return int(gguf.TokenType.CONTROL if self.special[token] else gguf.TokenType.USER_DEFINED)
        return int(gguf.TokenType.NORMAL)

    def write(self, writer: Any, pre: str) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
            writer.add_add_space_prefix(self.space_prefix)
        self.special_vocab.add_to_gguf(writer, quiet=True)


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" in front of the text, as Phi-3's does and Gemma's
    does not; llama.cpp assumes it does unless told."""
    steps: list[dict[str, Any]] = []
    for step in (spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}):
        steps += step.get("normalizers") or step.get("pretokenizers") or [step]
    return any((step.get("type") == "Prepend" and step.get("prepend") == "▁")
               or (step.get("type") == "Metaspace" and (step.get("prepend_scheme") in ("always", "first")
                                                         or bool(step.get("add_prefix_space"))))
               for step in steps)


def _choose_pre_tokenizer(config: Any, arch: Any, tokens: _Tokenizer, tokenizer: Any) -> str:
    """The first of llama.cpp's pre-tokenizers (for a SentencePiece-style vocabulary, its only one) with
    which llama.cpp splits the sample texts as the Hugging Face tokenizer does; an error if none does."""
    import gguf

    candidates = PRE_TOKENIZERS if tokens.model == "gpt2" else ("default",)
    try:
        from llama_cpp import Llama
    except ImportError:
        return candidates[0]  # nothing to check with: the engine that would read it is not here either
    wanted = [tokenizer.encode(text, add_special_tokens=False) for text in PROBES]
    with tempfile.TemporaryDirectory(prefix="slm-gguf-") as work:
        for pre in candidates:
            probe = Path(work) / f"{pre}.gguf"
            writer = gguf.GGUFWriter(str(probe), gguf.MODEL_ARCH_NAMES[arch])
            _write_parameters(writer, config, getattr(config, "model_type", ""), "fp32")
            tokens.write(writer, pre)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.close()
            vocab = Llama(str(probe), vocab_only=True, verbose=False)
            got = [vocab.tokenize(text.encode(), add_bos=False, special=False) for text in PROBES]
            vocab.close()
            if got == wanted:
                return pre
    raise EngineError(f"llama.cpp would split text differently from this model's tokenizer (tried the "
                      f"pre-tokenizers {', '.join(candidates)}); the GGUF would not read prompts as the model does")
