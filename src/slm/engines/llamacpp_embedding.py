"""Sentence embeddings on llama.cpp: a GGUF encoder (BERT and kin) -> one pooled vector per sequence.

llama.cpp pools the token states itself, as the file's ``{architecture}.pooling_type`` says (mean, cls, last),
when the context is made with ``embeddings`` on; it does not normalize. Whether to (and the longest input)
come from the ``sentence_transformers.*`` keys ``slm convert`` writes (``slm.tools.gguf_bert``); a GGUF
without them is normalized, as llama.cpp's own server does by default, and takes its training context.

Several sequences share one ``llama_decode``, each with its own ``seq_id``; an encoder attends across the
whole batch under a mask, so its cost grows with the square of the batch's tokens: a batch is cut into passes
of at most ``n_batch`` tokens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from slm.engines.base import default_threads
from slm.engines.llamacpp import clear_log, logged_failure, model_meta, tokenize
from slm.errors import EngineError, InvalidModelFile, InvalidParameter

POOLINGS = {lc.LLAMA_POOLING_TYPE_MEAN: "mean", lc.LLAMA_POOLING_TYPE_CLS: "cls",
            lc.LLAMA_POOLING_TYPE_LAST: "last"}
TOKENS_PER_PASS = 512
"""Tokens in one llama_decode (the ``n_batch`` and ``n_ubatch`` of the context): long enough for two inputs at
all-MiniLM-L6-v2's limit, short enough that attention across the pass stays cheap."""
MAX_SEQUENCES = 64
"""Sequences in one llama_decode (``n_seq_max``)."""


class LlamaCppEmbedder:
    """A GGUF embedding model in a llama.cpp context made for pooled embeddings."""

    _batch: Any  # lc.llama_batch, whose ctypes fields mypy types too narrowly
    _memory: lc.llama_memory_t | None

    def __init__(self, path: Path, threads: int | None = None, tokens_per_pass: int = TOKENS_PER_PASS) -> None:
        self.path = Path(path)
        clear_log()
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), lc.llama_model_default_params())
        if not self._model:
            raise InvalidModelFile(f"{self.path} could not be loaded: {logged_failure('llama.cpp could not load it')}")
        self._ctx = None
        try:
            self._open(threads or default_threads(), tokens_per_pass)
        except BaseException:
            self.close()
            raise

    def _open(self, threads: int, tokens_per_pass: int) -> None:
        architecture = model_meta(self._model, "general.architecture") or "unknown"
        pooling = int(model_meta(self._model, f"{architecture}.pooling_type") or lc.LLAMA_POOLING_TYPE_UNSPECIFIED)
        if pooling not in POOLINGS:
            raise InvalidModelFile(f"{self.path} ({architecture}) is not an embedding model: it declares no pooling "
                                   f"of its token states ({architecture}.pooling_type is {pooling})")
        if lc.llama_model_has_decoder(self._model) and not lc.llama_model_has_encoder(self._model) \
                and model_meta(self._model, f"{architecture}.attention.causal") != "false":
            raise InvalidModelFile(f"{self.path} ({architecture}) generates text; embeddings here need an encoder")
        self.pooling = POOLINGS[pooling]
        self.normalize = model_meta(self._model, "sentence_transformers.normalize") != "false"
        train_ctx = lc.llama_model_n_ctx_train(self._model)
        self.max_length = int(model_meta(self._model, "sentence_transformers.max_seq_length") or train_ctx)
        self.dimensions = lc.llama_model_n_embd(self._model)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.vocab_size = lc.llama_vocab_n_tokens(self._vocab)
        self.tokens_per_pass = max(tokens_per_pass, self.max_length)  # one whole input fits any pass
        params = lc.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = pooling
        params.n_ctx = params.n_batch = params.n_ubatch = self.tokens_per_pass
        params.n_seq_max = MAX_SEQUENCES
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not make an embedding context for {self.path}: "
                              f"{logged_failure('no reason given')}")
        self._memory = lc.llama_get_memory(self._ctx)  # None for an encoder: it keeps no cache
        self._batch = lc.llama_batch_init(self.tokens_per_pass, 0, 1)
        self.threads = threads

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids by llama.cpp's own tokenizer ([CLS] ... [SEP] for BERT), not truncated."""
        return [tokenize(self._vocab, text, add_special=True, parse_special=False) for text in texts]

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One vector per sequence, ``(len(batch), dimensions)`` float32: as many sequences per llama_decode as
        fit ``tokens_per_pass`` tokens and ``MAX_SEQUENCES``."""
        out = np.empty((len(batch), self.dimensions), dtype=np.float32)  # (B, D)
        start = 0
        while start < len(batch):
            end, tokens = start, 0
            while end < len(batch) and end - start < MAX_SEQUENCES \
                    and tokens + len(batch[end]) <= self.tokens_per_pass:
                tokens += len(batch[end])
                end += 1
            if end == start:
                raise InvalidParameter("input", f"{len(batch[start])} tokens, more than this model's "
                                                f"{self.tokens_per_pass} per pass")
            out[start:end] = self._pass(batch[start:end])
            start = end
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _pass(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """The pooled vectors of ``sequences``, decoded together (sequence ``i`` is llama.cpp's ``seq_id`` i)."""
        batch = self._batch
        i = 0
        for seq, ids in enumerate(sequences):
            for position, token in enumerate(ids):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = True  # pooling reads every token's state
                i += 1
        batch.n_tokens = i
        if self._memory:  # a model with a cache (a decoder used for embeddings) starts each pass empty
            lc.llama_memory_clear(self._memory, True)
        clear_log()
        status = lc.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}: {logged_failure('no reason given')}")
        out = np.empty((len(sequences), self.dimensions), dtype=np.float32)
        for seq in range(len(sequences)):
            pooled = lc.llama_get_embeddings_seq(self._ctx, seq)
            if not pooled:
                raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq}")
            out[seq] = np.ctypeslib.as_array(ctypes.cast(pooled, ctypes.POINTER(ctypes.c_float)),
                                             shape=(self.dimensions,))
        return out

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lc.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()
