"""A tiny random Phi-3.5-vision checkpoint for tests, in the published folder layout.

No Phi weights can be downloaded here, so the folder is microsoft/Phi-3.5-vision-instruct's in every way
but width: its config.json (model_type ``phi3_v``, the ``embd_layer`` and ``img_processor`` sections, the
"su" rope scaling) with a 2-layer, 64-wide text model and a 2-layer, 32-wide CLIP tower that keeps the
real 336-px image size and 14-px patches (so the 24x24 patch grid, the HD crops and the token counts are
the real ones); seeded random weights under the published tensor names, in two safetensors shards with
an index; preprocessor_config.json as published (4 crops); and a tokenizer: no Phi-3 tokenizer is here, so
SmolLM2's (the embedded model's) with Phi-3's special tokens added, a BOS added to every encoding as
Phi-3's Llama tokenizer does, and Phi-3.5-vision-instruct's chat template.

    folder = tiny_phi3v()   # built once, kept in the test cache directory

The tiny CLIP's widths travel in ``img_processor.clip_config``, the one key the published config lacks
(the published code hard-codes ViT-L/14-336; ``slm.engines.phi3v`` reads the override).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from slm.engines import phi3v
from slm.store.catalog import resolve

SEED = 0
CLIP_CONFIG: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2}
# microsoft/Phi-3.5-vision-instruct's config.json at small widths (hidden 3072 -> 64, 32 layers -> 2, 32 heads
# -> 4, intermediate 8192 -> 128, image_dim_out 1024 -> 32); token ids are filled in from the tokenizer. The
# rope factors are one per pair of a head's 16 channels (the published lists have 48, for 96 channels).
CONFIG: dict[str, Any] = {
    "_name_or_path": "Phi-3.5-vision-instruct",
    "architectures": ["Phi3VForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                 "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
    "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                   "use_hd_transform": True, "with_learnable_separator": True},
    "embd_pdrop": 0.0,
    "hidden_act": "silu",
    "hidden_size": 64,
    "img_processor": {"image_dim_out": CLIP_CONFIG["hidden_size"], "layer_idx": -2, "model_name": phi3v.CLIP_NAME,
                      "name": "clip_vision_model", "num_img_tokens": 144, "clip_config": CLIP_CONFIG},
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 131072,
    "model_type": "phi3_v",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "original_max_position_embeddings": 4096,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.03, 1.08, 1.45, 2.86, 9.09, 21.99, 53.84, 63.48],
                     "short_factor": [1.05, 1.1, 1.25, 1.55, 2.0, 2.0, 2.35, 2.95], "type": "su"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.38.1",
    "use_cache": True,
}
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "auto_map": {"AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
                 "AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
    "do_convert_rgb": None,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "num_crops": 4,
    "num_img_tokens": 144,
    "processor_class": "Phi3VProcessor",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)
"""Phi-3.5-vision-instruct's chat template (tokenizer_config.json); an image is written ``<|image_1|>\\n``
inside a message's text."""
BOS = "<s>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


def cache_dir() -> Path:
    """Where built test models are kept between runs: ``$SLM_TEST_CACHE``, or a folder in the temp dir."""
    return Path(os.environ.get("SLM_TEST_CACHE") or Path(tempfile.gettempdir()) / "slm-test-models")


def phi3_tokenizer() -> Any:
    """SmolLM2's tokenizer (from the embedded model's GGUF) with Phi-3's special tokens and chat template,
    adding ``<s>`` at the start of every encoding."""
    from tokenizers.processors import TemplateProcessing

    gguf = resolve("smollm2").path
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.convert_tokens_to_ids(BOS))])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _randomize(text: Any, vision: phi3v.VisionEmbedding) -> None:
    """Make every tensor count: norms off 1, biases and separators non-zero, logits spread wide enough that
    greedy choices are clear."""
    with torch.no_grad():
        for module in (text, vision):
            for name, param in module.named_parameters():
                if "norm" in name:
                    param.normal_(1.0, 0.1)
                elif name.endswith(".bias") or name.endswith("_GN"):
                    param.normal_(0.0, 0.5 if name.endswith("_GN") else 0.02)
        text.lm_head.weight.normal_(0.0, 1.0)


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def build_tiny_phi3v(folder: Path) -> Path:
    """Write the tiny random Phi-3.5-vision checkpoint folder to ``folder``."""
    folder.mkdir(parents=True)
    tokenizer = phi3_tokenizer()
    tokenizer.save_pretrained(folder)
    # Where the published folder has them too (readers other than transformers look there, not in
    # chat_template.jinja): the chat template, and that a BOS starts every encoding.
    settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings |= {"add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    bos, endoftext, end, assistant = _ids(tokenizer, BOS, "<|endoftext|>", "<|end|>", "<|assistant|>")
    config = CONFIG | {"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": endoftext,
                       "pad_token_id": endoftext}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2), encoding="utf-8")
    generation = {"bos_token_id": bos, "eos_token_id": [end, assistant, endoftext], "pad_token_id": endoftext}
    (folder / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    torch.manual_seed(SEED)
    text, vision = phi3v.build(phi3v.read_config(folder), empty=False)
    _randomize(text, vision)
    tensors = {k: v.contiguous() for k, v in phi3v.checkpoint_state(text, vision).items()}
    # Two shards and an index, as published: the image side, embeddings and first layer, then the rest.
    first = {k for k in tensors if k.startswith((phi3v.VISION_PREFIX, "model.embed_tokens.", "model.layers.0."))}
    shards = {"model-00001-of-00002.safetensors": sorted(first),
              "model-00002-of-00002.safetensors": sorted(set(tensors) - first)}
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: name for name, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def _build_key() -> str:
    """Changes with anything that changes the built model, so a cached one is never stale."""
    import transformers

    recipe = json.dumps([CONFIG, PREPROCESSOR_CONFIG, SEED, transformers.__version__, torch.__version__,
                         Path(__file__).read_text(encoding="utf-8"), Path(phi3v.__file__).read_text(encoding="utf-8")],
                        sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def tiny_phi3v() -> Path:
    """The tiny Phi-3.5-vision folder, built on first use and kept in ``cache_dir()``."""
    folder = cache_dir() / f"tiny-phi3v-{_build_key()}"
    if not folder.exists():
        partial = folder.with_name(folder.name + f".{os.getpid()}.part")
        shutil.rmtree(partial, ignore_errors=True)
        build_tiny_phi3v(partial)
        try:
            partial.rename(folder)
        except OSError:  # another test process built it first
            if not folder.exists():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    return folder
