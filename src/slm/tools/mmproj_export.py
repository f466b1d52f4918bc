"""A vision-language model's vision tower and projector -> the ``mmproj`` GGUF llama.cpp's libmtmd reads.

libmtmd (``mtmd_init_from_file``) builds an image encoder from a GGUF of architecture ``clip``: ``clip.*``
keys give the projector type and the tower's shape and preprocessing, tensors are named ``v.*`` (the
vision tower, through ``gguf.TensorNameMap``) and ``mm.*`` (the projector). slm writes the one it proves,
Gemma 3's (projector type ``gemma3``): a SigLIP tower whose patch outputs are average-pooled to
``mm_tokens_per_image``, RMS-normed and projected to the text model's width. The text model itself is
``slm.tools.gguf_export``'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slm.errors import EngineError, InvalidParameter

VISION_ARCHITECTURES = {"gemma3": "siglip_vision_model"}
"""transformers' model_type of a vision-language model -> that of the vision tower slm converts with it."""


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
    if vision.hidden_act != "gelu_pytorch_tanh":  # ggml's gelu is the tanh approximation
        raise InvalidParameter("to", f"this {kind} vision tower's activation {vision.hidden_act!r} is not the "
                                     "gelu_pytorch_tanh llama.cpp's gemma3 projector runs")
    side = math.isqrt(int(config.mm_tokens_per_image))
    patches = int(vision.image_size) // int(vision.patch_size)
    if side * side != config.mm_tokens_per_image or patches % side:
        raise InvalidParameter("to", f"this {kind} model pools {patches} x {patches} patches to "
                                     f"{config.mm_tokens_per_image} tokens, not a square grid llama.cpp can pool to")
    return True


def write_projector(model: Any, folder: Path, output: Path, precision: str) -> None:
    """Write the vision tower and projector of ``model`` (a Gemma 3 VLM, loaded from ``folder``, whose
    image processor gives the pixel normalisation) as an mmproj GGUF at ``output``."""
    import gguf
    import torch
    from transformers import AutoImageProcessor

    config, vision = model.config, model.config.vision_config
    try:
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidParameter("model", f"{folder} has no image processor configuration, which an mmproj "
                                        f"needs for its pixel normalisation ({e})") from None
    patches = int(vision.image_size) // int(vision.patch_size)
    writer = gguf.GGUFWriter(str(output), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[precision])
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_projection_dim(int(config.text_config.hidden_size))
    writer.add_vision_image_size(int(vision.image_size))
    writer.add_vision_patch_size(int(vision.patch_size))
    writer.add_vision_embedding_length(int(vision.hidden_size))
    writer.add_vision_feed_forward_length(int(vision.intermediate_size))
    writer.add_vision_block_count(int(vision.num_hidden_layers))
    writer.add_vision_head_count(int(vision.num_attention_heads))
    writer.add_vision_attention_layernorm_eps(float(vision.layer_norm_eps))
    writer.add_vision_use_gelu(True)
    # the pooling kernel: llama.cpp assumes 4 (896 / 14 = 64 patches a side to 16) unless told
    writer.add_vision_projector_scale_factor(patches // math.isqrt(int(config.mm_tokens_per_image)))
    writer.add_vision_image_mean([float(v) for v in processor.image_mean])
    writer.add_vision_image_std([float(v) for v in processor.image_std])
    with torch.inference_mode():
        for name, data in _tensors(model):
            _add_tensor(writer, name, data, precision)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for the vision tower's and projector's weights, in llama.cpp's layout."""
    import gguf

    vision = model.config.vision_config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(vision.num_hidden_layers))
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
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise EngineError(f"no GGUF name for the tensor {hf_name} of this vision tower")
        yield mapped, data


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
