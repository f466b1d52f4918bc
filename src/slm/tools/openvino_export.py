"""A Hugging Face causal-LM folder -> an OpenVINO stateful LLM folder (the layout optimum-intel writes and
``openvino_genai.LLMPipeline`` runs):

    export(Path("smollm2-hf"), Path("smollm2-openvino-int4"), "int4")

``openvino_model.xml/.bin`` takes ``input_ids`` (i64 [B, T]), ``attention_mask`` (i64 [B, past + T]),
``position_ids`` (i64 [B, T]) and ``beam_idx`` (i32 [B]) and gives ``logits`` (f32 [B, T, V]); the KV cache
lives in state variables (ReadValue/Assign), one per layer's keys and values, reordered by ``beam_idx``
at the start of each call. The tokenizer becomes ``openvino_tokenizer.xml`` and ``openvino_detokenizer.xml``;
the folder's configuration and tokenizer files are copied beside them as they are.

The graph is traced by ``openvino.convert_model`` from a small torch module that takes the past keys and
values as plain tensors and returns the present ones, so the trace never sees a cache object; the past
inputs are then folded into state by OpenVINO's own make-stateful pass.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch
from openvino import opset13
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging as transformers_logging

PRECISIONS = ("int4", "int8", "fp16", "fp32")
"""fp32 keeps the weights; fp16 stores them as float16 (computed in float32 on a CPU); int8 and int4 are
NNCF's asymmetric weight compression (``compress``)."""
INT4_RATIO = 0.8
"""The share of the layers' weights int4 takes; the rest is int8."""
CALIBRATION = (
    "The river rises in the hills north of the town and winds for forty miles through farmland before it reaches "
    "the sea. In spring the water runs high and brown with snowmelt; by late summer children can wade across "
    "the shallows below the old mill, where the miller's family once ground wheat for half the county.",
    "def merge_sorted(left: list[int], right: list[int]) -> list[int]:\n    result = []\n    i = j = 0\n"
    "    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
    "            result.append(left[i])\n            i += 1\n        else:\n            result.append(right[j])\n"
    "            j += 1\n    return result + left[i:] + right[j:]\n",
    "Question: A shop sells pencils at 3 for 45 cents. How much do 12 pencils cost? Answer: 12 pencils are 4 "
    "groups of 3, and each group costs 45 cents, so they cost 4 x 45 = 180 cents, which is $1.80.",
)
"""A few hundred tokens of prose, code and arithmetic, built in (nothing is downloaded): int4's calibration,
which tells NNCF which layers' inputs vary most and so keep int8."""

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class _WithPast(torch.nn.Module):
    """The causal LM with its KV cache as flat tensors: (ids, mask, positions, k0, v0, k1, v1, ...) ->
    (logits, k0', v0', ...), each k/v (B, kv_heads, S, head_dim)."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # A plain cache (no config): every layer keeps all its positions, sliding-window layers included
        # (their window is applied by the mask), so each state variable grows the same way.
        cache = DynamicCache()
        cache.layers = [_filled(keys, values) for keys, values in zip(past[0::2], past[1::2], strict=True)]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits.float(), *present)  # logits (B, T, V)


def unsupported(source: Path) -> str | None:
    """Why the folder ``source`` cannot be exported (a sentence), or None: it must be a text-only causal LM
    that transformers knows, as its config.json declares."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"its config.json is unreadable ({e})"
    kind = config.get("model_type")
    if "vision_config" in config or kind == "phi3_v":
        return f"{kind} reads images; only text-only causal language models are exported"
    # the model type alone is not enough: a BERT folder is an encoder though transformers has a BERT LM head
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not causal.intersection(architectures)):
        return (f"model_type {kind!r} ({', '.join(architectures) or 'no architectures'}) is not a causal language "
                "model transformers knows")
    return None


def _filled(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    """A cache layer holding ``keys`` and ``values`` as they are: filling one through ``update`` would
    concatenate onto an empty 1-D tensor, which the trace records as a constant of the wrong rank."""
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def export(source: Path, out: Path, precision: str = "int4") -> None:
    """Write the OpenVINO folder for the Hugging Face folder ``source`` into ``out`` (created)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    model = _trace(source)
    _make_stateful(model)
    if precision in ("int4", "int8"):
        model = compress(model, precision, _group_size(config), source)
    ov.save_model(model, out / "openvino_model.xml", compress_to_fp16=precision == "fp16")
    _export_tokenizer(source, out)
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def _trace(source: Path) -> ov.Model:
    """convert_model over ``_WithPast`` with a small example (batch 2, 3 new tokens after 2 cached ones,
    so no dimension is traced as a constant 1); names the inputs and outputs as optimum-intel does."""
    # sdpa becomes OpenVINO's ScaledDotProductAttention, which the CPU plugin fuses with the state (its
    # fast KV-cache path); transformers' mask code materialises the mask while tracing, never a shortcut.
    with _quiet():
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa").eval()
    text = hf.config.get_text_config(decoder=True)
    layers = int(text.num_hidden_layers)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    batch, past_len, new = 2, 2, 3
    past = [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    example = (torch.ones(batch, new, dtype=torch.int64), torch.ones(batch, past_len + new, dtype=torch.int64),
               torch.arange(past_len, past_len + new, dtype=torch.int64).expand(batch, new).contiguous(), *past)
    with torch.no_grad(), _quiet():
        model = ov.convert_model(_WithPast(hf, layers), example_input=example)
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    for port, name in zip(model.inputs, (*MODEL_INPUTS, *past_names), strict=True):
        port.get_tensor().set_names({name})
    present_names = [name.replace("past_key_values", "present") for name in past_names]
    for port, name in zip(model.outputs, ("logits", *present_names), strict=True):
        port.get_tensor().set_names({name})
    # every dimension dynamic but the ones fixed by the weights (heads, head size)
    for port in model.inputs[:3]:
        port.get_node().set_partial_shape(ov.PartialShape([-1, -1]))
    for port in model.inputs[3:]:
        port.get_node().set_partial_shape(ov.PartialShape([-1, kv_heads, -1, head_dim]))
    model.validate_nodes_and_infer_types()
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings while loading and tracing the model: torch's TracerWarnings (a Python value frozen into the
    graph, as slm's example input intends) and transformers' deprecation notices are about code the user did not
    write and cannot change."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _make_stateful(model: ov.Model) -> None:
    """Fold each past input and its present output into one state variable. First each past input is
    gathered along the batch by a new ``beam_idx`` input, so a caller can reorder or fork sequences
    (beam search, LLMPipeline's batching) without reading the state out."""
    from openvino._offline_transformations import apply_make_stateful_transformation

    pasts = [port for port in model.inputs if port.get_any_name().startswith("past_key_values.")]
    beam_idx = opset13.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    model.add_parameters([beam_idx])
    for port in pasts:
        consumers = port.get_node().output(0).get_target_inputs()
        gathered = opset13.gather(port.get_node().output(0), beam_idx, opset13.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(gathered.output(0))
    model.validate_nodes_and_infer_types()
    names = {port.get_any_name(): port.get_any_name().replace("past_key_values", "present") for port in pasts}
    apply_make_stateful_transformation(model, names)
    _zero_initial_state(model)


def _zero_initial_state(model: ov.Model) -> None:
    """A fresh (or reset) state starts as zeros of shape (B, kv_heads, 0, head_dim), B read from
    ``input_ids``, so the first call sees an empty cache of the right batch."""
    batch = opset13.gather(opset13.shape_of(model.input("input_ids"), output_type="i64"),
                           opset13.constant(np.array([0], dtype=np.int64)), opset13.constant(0))
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims: list[Any] = [batch]
        for dim in list(op.get_output_partial_shape(0))[1:]:
            length = dim.get_length() if dim.is_static else 0  # the sequence axis starts empty
            dims.append(opset13.constant(np.array([length], dtype=np.int64)))
        zeros = opset13.broadcast(opset13.constant(0.0, dtype=op.get_output_element_type(0)),
                                  opset13.concat(dims, axis=0))
        op.set_arguments([zeros])
    model.validate_nodes_and_infer_types()


def _group_size(config: dict[str, Any]) -> int:
    """The largest of 128, 64, 32 that divides every matmul's input width (int4 groups run along it):
    SmolLM2-135M's 576 takes 64, not 128."""
    text = config.get("text_config", config)
    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    widths = [hidden, int(text.get("intermediate_size", hidden)), heads * int(text.get("head_dim") or hidden // heads)]
    # -1: none divides them all, so NNCF quantizes per output channel instead of in groups
    return next((size for size in (128, 64, 32) if all(width % size == 0 for width in widths)), -1)


def compress(model: ov.Model, precision: str, group_size: int, source: Path) -> ov.Model:
    """NNCF's weight compression (activations stay float). int8: asymmetric, per output channel, data-free.
    int4: asymmetric in groups of ``group_size``, on the ``INT4_RATIO`` share of the layers' weights; the layers
    whose inputs vary most on ``CALIBRATION`` (read with ``source``'s tokenizer) keep the rest in int8 per
    channel, as do the embedding and the output projection. On SmolLM2-135M this mixed recipe cuts int4's extra
    NLL over float32 about three-fold for 12% more bytes (benchmarks/results/openvino_int4.md)."""
    import nncf

    if precision == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size,
                                 ratio=INT4_RATIO, dataset=nncf.Dataset(calibration(source)),
                                 sensitivity_metric=nncf.SensitivityMetric.MAX_ACTIVATION_VARIANCE)


def calibration(source: Path) -> list[dict[str, np.ndarray]]:
    """The graph's inputs for one prefill (from an empty state) of each ``CALIBRATION`` text, and of each as
    an assistant's reply where the tokenizer has a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    sequences = [tokenizer(text)["input_ids"] for text in CALIBRATION]
    if tokenizer.chat_template:
        sequences += [list(tokenizer.apply_chat_template([{"role": "user", "content": "Go on."},
                                                          {"role": "assistant", "content": text}],
                                                         tokenize=True, return_dict=False))
                      for text in CALIBRATION]
    return [{"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
            for ids in sequences]


def _export_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer and detokenizer as OpenVINO models (LLMPipeline tokenizes through them)."""
    from openvino_tokenizers import convert_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, out / "openvino_tokenizer.xml")
    ov.save_model(decoder, out / "openvino_detokenizer.xml")
