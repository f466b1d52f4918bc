"""Embedding engines: batches of token ids -> one pooled vector per sequence.

The protocol is ``Embedder``; this module's adapter runs encoder models (BERT) on transformers,
``slm.engines.llamacpp_embedding``'s their GGUF on llama.cpp. How token states become one vector is read from
the model's own files, as sentence-transformers writes them: ``modules.json`` lists the modules (a ``Pooling``
module and, if listed, ``Normalize``) and the pooling module's ``config.json`` says which pooling;
``sentence_bert_config.json`` gives the longest input.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slm.engines.base import default_threads
from slm.errors import EngineUnavailable, InvalidModelFile, InvalidParameter

POOLINGS = ("mean", "cls", "max")


class Embedder(Protocol):
    """Token ids -> vectors. Inputs are whole (the caller truncates or refuses what is too long)."""

    dimensions: int
    max_length: int
    """The longest input, in tokens, the model was trained on."""
    vocab_size: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids with the model's special tokens ([CLS] ... [SEP]), not truncated."""
        ...

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One vector per sequence, ``(len(batch), dimensions)`` float32, in one forward pass."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Pooling:
    """How a sentence-transformers model turns its token states into one vector."""

    mode: str
    """``mean`` (over the attention mask), ``cls`` (the first token) or ``max``."""
    normalize: bool
    """Scaled to unit length (a ``Normalize`` module follows the pooling)."""
    max_length: int | None
    """``sentence_bert_config.json``'s ``max_seq_length``, when the folder has one."""


def read_pooling(folder: Path) -> Pooling:
    """The pooling a sentence-transformers folder declares; InvalidModelFile naming what is missing."""
    modules = _json(folder / "modules.json")
    if not isinstance(modules, list):
        raise InvalidModelFile(f"{folder}/modules.json is not a list of modules")
    types = {str(m.get("type", "")).rpartition(".")[2]: m for m in modules if isinstance(m, dict)}
    if "Pooling" not in types:
        raise InvalidModelFile(f"{folder}/modules.json lists no Pooling module")
    config = _json(folder / str(types["Pooling"].get("path", "")) / "config.json")
    modes = [mode for mode in POOLINGS if config.get(f"pooling_mode_{mode}_tokens" if mode != "cls"
                                                     else "pooling_mode_cls_token")]
    if len(modes) != 1 or any(config.get(k) for k in ("pooling_mode_mean_sqrt_len_tokens",
                                                      "pooling_mode_weightedmean_tokens",
                                                      "pooling_mode_lasttoken")):
        raise InvalidModelFile(f"{folder}: slm pools by exactly one of {', '.join(POOLINGS)}; the pooling "
                               f"config asks for {config}")
    bert = folder / "sentence_bert_config.json"
    limit = _json(bert).get("max_seq_length") if bert.is_file() else None
    return Pooling(modes[0], "Normalize" in types, int(limit) if limit else None)


class TransformersEmbedder:
    """An encoder (BERT and kin) through transformers' ``AutoModel``: padded batches with an attention mask."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        try:
            import torch
            from transformers import AutoConfig, AutoModel, AutoTokenizer

            from slm.engines.transformers import quiet
        except ImportError as e:
            raise EngineUnavailable(f"embeddings run on the transformers engine, which is not installed ({e}); "
                                    "pip install torch==2.13.0 'slm[torch]'") from None
        self.pooling = read_pooling(folder)
        config = AutoConfig.from_pretrained(folder)
        if getattr(config, "is_decoder", False) or config.model_type not in ("bert", "roberta", "xlm-roberta"):
            raise InvalidModelFile(f"{folder}: embeddings run encoder models (BERT, RoBERTa); this is "
                                   f"{config.model_type}")
        torch.set_num_threads(threads or default_threads())
        self._torch = torch
        with quiet():
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self._tokenizing = threading.Lock()
        self.dimensions = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.pad_id = int(config.pad_token_id or 0)
        self.max_length = min(self.pooling.max_length or config.max_position_embeddings,
                              config.max_position_embeddings)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        # one call: the fast tokenizer encodes a batch in Rust, in parallel. One at a time: each call sets the
        # Rust tokenizer's truncation, and two threads doing so at once fail with "Already borrowed".
        with self._tokenizing:
            encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        torch = self._torch
        longest = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)  # (B, T)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
            mask[row, : len(tokens)] = 1
        with torch.inference_mode():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        pooled = pool(states, mask, self.pooling.mode)  # (B, D)
        if self.pooling.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return np.asarray(pooled.float().numpy(), dtype=np.float32)

    def close(self) -> None:
        del self.model


def pool(states: Any, mask: Any, mode: str) -> Any:
    """Token states ``(B, T, D)`` -> ``(B, D)``, counting only the tokens the mask keeps."""
    if mode == "cls":
        return states[:, 0]
    keep = mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
    if mode == "max":
        return states.masked_fill(keep == 0, float("-inf")).max(dim=1).values
    return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


def open_embedder(path: Path, threads: int | None = None, engine: str | None = None) -> Embedder:
    """The embedding engine the model's files call for: a Hugging Face folder runs on transformers, a GGUF file
    on llama.cpp (``slm.engines.llamacpp_embedding``). ``engine`` (``transformers``, ``llamacpp``) is checked
    against the files, never used to guess them."""
    wanted = "llamacpp" if path.is_file() and path.suffix == ".gguf" else "transformers"
    if engine not in (None, "auto", wanted):
        kind = "a GGUF file" if wanted == "llamacpp" else "a Hugging Face folder"
        raise InvalidParameter("engine", f"{path.name} is {kind}: embeddings from it run on {wanted}, not {engine} "
                                         "(slm convert --to gguf makes a GGUF of a folder)")
    if wanted == "llamacpp":
        from slm.engines.llamacpp_embedding import LlamaCppEmbedder

        return LlamaCppEmbedder(path, threads)
    if not path.is_dir():
        raise InvalidParameter("model", f"{path} is not a model folder; embeddings need a Hugging Face "
                                        "folder of an encoder model with sentence-transformers' modules.json, or "
                                        "its GGUF (slm convert --to gguf)")
    return TransformersEmbedder(path, threads)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise InvalidModelFile(f"{path} is missing: it says how the model pools its token states") from None
    except ValueError as e:
        raise InvalidModelFile(f"{path} is not valid JSON: {e}") from None
