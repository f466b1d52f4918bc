"""A vision-language model's vision tower and projector -> the ``mmproj`` GGUF llama.cpp's libmtmd reads.

libmtmd (``mtmd_init_from_file``) builds an image encoder from a GGUF of architecture ``clip``: ``clip.*``
keys give the projector type and the tower's shape and preprocessing, tensors are named ``v.*`` (the
vision tower, through ``gguf.TensorNameMap``) and ``mm.*`` (the projector). slm writes the two it proves:
- Gemma 3's (projector type ``gemma3``): a SigLIP tower whose patch outputs are average-pooled to
  ``mm_tokens_per_image``, RMS-normed and projected to the text model's width;
- Qwen2.5-VL's (``qwen2.5vl_merger``): a ViT over 14-px patches (its 3-D patch convolution split into two
  2-D ones, as llama.cpp reads a still image), windowed attention in all but every ``n_wa_pattern``-th block,
  and a merger of 2 x 2 patches; the text model that reads it takes M-RoPE positions.
The text model itself is ``slm.tools.gguf_export``'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slm.errors import EngineError, InvalidParameter

VISION_ARCHITECTURES = {"gemma3": "siglip_vision_model", "qwen2_5_vl": "qwen2_5_vl_vision"}
"""transformers' model_type of a vision-language model -> that of the vision tower slm converts with it."""
QWEN_WINDOW = 112
"""The attention window (pixels) llama.cpp's Qwen2.5-VL encoder uses; it reads no setting for it."""


def check_vision(config: Any) -> bool:
    """Whether ``config`` is a vision-language model's; an error naming it if slm does not convert its
    vision tower and projector."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return False
    kind, tower = getattr(config, "model_type", "?"), getattr(vision, "model_type", "?")
    if VISION_ARCHITECTURES.get(kind) != tower:
        known = ", ".join(f"{k} (with {v})" for k, v in VISION_ARCHITECTURES.items())
        raise InvalidParameter("to", f"converting the vision tower ({tower}) and projector of {kind} to an mmproj "
                                     f"GGUF is not supported (slm converts those of {known})")
    refusals = _gemma3_refusals(config) if kind == "gemma3" else _qwen_refusals(vision)
    for field, (differs, wanted) in refusals.items():
        if differs:
            raise InvalidParameter("to", f"this {kind} vision tower's {field} is not what llama.cpp's encoder "
                                         f"runs ({wanted}); slm does not convert it")
    return True


def _gemma3_refusals(config: Any) -> dict[str, tuple[bool, str]]:
    vision = config.vision_config
    side = math.isqrt(int(config.mm_tokens_per_image))
    patches = int(vision.image_size) // int(vision.patch_size)
    return {
        "hidden_act": (vision.hidden_act != "gelu_pytorch_tanh", "gelu_pytorch_tanh"),  # ggml's gelu is tanh's
        "mm_tokens_per_image": (side * side != config.mm_tokens_per_image or patches % side,
                                f"a square grid the {patches} x {patches} patches pool to"),
    }


def _qwen_refusals(vision: Any) -> dict[str, tuple[bool, str]]:
    full = list(vision.fullatt_block_indexes)
    pattern = full[0] + 1 if full else 0
    return {
        "hidden_act": (vision.hidden_act != "silu", "silu"),
        "spatial_merge_size": (int(vision.spatial_merge_size) != 2, "2"),
        "temporal_patch_size": (int(vision.temporal_patch_size) != 2, "2"),
        "window_size": (int(vision.window_size) != QWEN_WINDOW, f"{QWEN_WINDOW}"),
        "fullatt_block_indexes": (not full or full != list(range(pattern - 1, int(vision.depth), pattern)),
                                  "every n-th block, the last among them"),
    }


def write_projector(model: Any, folder: Path, output: Path, precision: str) -> None:
    """Write the vision tower and projector of ``model`` (a vision-language model ``check_vision`` passed,
    loaded from ``folder``, whose image processor gives the pixel normalisation) as an mmproj GGUF at
    ``output``."""
    import gguf
    import torch
    from transformers import AutoImageProcessor

    config = model.config
    try:
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidParameter("model", f"{folder} has no image processor configuration, which an mmproj "
                                        f"needs for its pixel normalisation ({e})") from None
    writer = gguf.GGUFWriter(str(output), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[precision])
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(int(config.text_config.hidden_size))
    writer.add_vision_image_mean([float(v) for v in processor.image_mean])
    writer.add_vision_image_std([float(v) for v in processor.image_std])
    if config.model_type == "gemma3":
        _gemma3_keys(writer, config)
        tensors = _gemma3_tensors(model)
    else:
        _qwen_keys(writer, config)
        tensors = _qwen_tensors(model)
    with torch.inference_mode():
        for name, data in tensors:
            _add_tensor(writer, name, data, precision)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tower_keys(writer: Any, image_size: int, patch_size: int, width: int, ff: int, depth: int, heads: int,
                eps: float) -> None:
    writer.add_vision_image_size(image_size)
    writer.add_vision_patch_size(patch_size)
    writer.add_vision_embedding_length(width)
    writer.add_vision_feed_forward_length(ff)
    writer.add_vision_block_count(depth)
    writer.add_vision_head_count(heads)
    writer.add_vision_attention_layernorm_eps(eps)


def _gemma3_keys(writer: Any, config: Any) -> None:
    import gguf

    vision = config.vision_config
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    _tower_keys(writer, int(vision.image_size), int(vision.patch_size), int(vision.hidden_size),
                int(vision.intermediate_size), int(vision.num_hidden_layers), int(vision.num_attention_heads),
                float(vision.layer_norm_eps))
    writer.add_vision_use_gelu(True)
    # the pooling kernel: llama.cpp assumes 4 (896 / 14 = 64 patches a side to 16) unless told
    patches = int(vision.image_size) // int(vision.patch_size)
    writer.add_vision_projector_scale_factor(patches // math.isqrt(int(config.mm_tokens_per_image)))


def _qwen_keys(writer: Any, config: Any) -> None:
    import gguf

    vision = config.vision_config
    writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN25VL)
    # image_size is no limit here (images keep their aspect, 8 to 4096 positions); 560 as llama.cpp writes it
    _tower_keys(writer, 560, int(vision.patch_size), int(vision.hidden_size), int(vision.intermediate_size),
                int(vision.depth), int(vision.num_heads), float(config.text_config.rms_norm_eps))
    writer.add_vision_use_silu(True)
    writer.add_vision_n_wa_pattern(int(vision.fullatt_block_indexes[0]) + 1)


def _mapped(names: Any, name: str, hf_name: str) -> str:
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise EngineError(f"no GGUF name for the tensor {hf_name} of this vision tower")
    return str(mapped)


def _gemma3_tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for the vision tower's and projector's weights, in llama.cpp's layout."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(model.config.vision_config.num_hidden_layers))
    for hf_name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if hf_name.startswith("model.vision_tower."):
            if ".head." in hf_name:
                continue  # SigLIP's pooling head: Gemma 3 reads the patch outputs, not it
            # gguf's names are those of checkpoints before transformers 5, with the tower's own prefix
            name = "vision_tower.vision_model." + hf_name.removeprefix("model.vision_tower.").removeprefix(
                "vision_model.")
        elif hf_name.startswith("model.multi_modal_projector."):
            name = hf_name.removeprefix("model.").replace("_projection_weight", "_projection.weight")
            if name.endswith("soft_emb_norm.weight"):
                data = data + 1.0  # Gemma's RMS norm scales by (1 + weight), llama.cpp's by the weight
            # (vision width, text width) as it is: llama.cpp transposes it in its graph
        else:
            continue  # the text model's: slm.tools.gguf_export writes it
        yield _mapped(names, name, hf_name), data


def _qwen_tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for Qwen2.5-VL's vision tower and merger, in llama.cpp's layout."""
    import gguf

    # the merger's second linear is mm.2: the map knows "merger.mlp.{bid}" only for bid < its block count
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(3, int(model.config.vision_config.depth)))
    for hf_name, tensor in model.state_dict().items():
        if not hf_name.startswith("model.visual."):
            continue  # the text model's: slm.tools.gguf_export writes it
        name, data = hf_name.removeprefix("model."), tensor.float().numpy()
        if ".qkv." in name:  # one (3 x width, ...) projection -> three
            for part, piece in zip("qkv", np.split(data, 3, axis=0), strict=True):
                yield _mapped(names, name.replace(".qkv.", f".{part}."), hf_name), np.ascontiguousarray(piece)
        elif name.endswith("patch_embed.proj.weight"):  # (width, 3, 2 frames, p, p): one 2-D kernel per frame
            base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH]
            yield f"{base}.weight", np.ascontiguousarray(data[:, :, 0])
            yield f"{base}.weight.1", np.ascontiguousarray(data[:, :, 1])
        else:
            yield _mapped(names, name, hf_name), data


def _add_tensor(writer: Any, name: str, data: np.ndarray, precision: str) -> None:
    import gguf

    # As llama.cpp's converter writes them: the patch and position embeddings float32, the input projection
    # (which the graph transposes) float16 at most; Q8_0 works in blocks of 32 along a row.
    if data.ndim < 2 or precision == "fp32" or name.startswith(("v.patch_embd", "v.position_embd")):
        writer.add_tensor(name, data.astype(np.float32))
    elif precision == "fp16" or name.startswith("mm.input_projection") or data.shape[-1] % 32:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
