"""ONNX Runtime GenAI: the folders its model builder writes (``genai_config.json``, ``model.onnx``), the
layout of Microsoft's Phi-3/3.5 ONNX releases.

slm drives it step by step so that slm's own sampling applies: each sequence is one ``og.Generator``,
``append_tokens`` runs the model over new tokens, and the logits after the last one are read from the
model's raw output when a chunk ends in the pad token (``get_logits`` would pick the wrong row). A
Generator holds exactly one sequence of its own, so the sequences of a call are evaluated one after
the other, and ``fork`` and ``restore`` replay the tokens into a new Generator (ONNX Runtime GenAI
cannot copy a KV cache). Each Generator allocates its KV cache for ``n_ctx`` positions up front.
The tokenizer and chat template are the folder's own, read with the tokenizers library. A ``phi3v``
folder (Phi-3/3.5-vision) also takes images (``onnx_images``); other multimodal folders are refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og

from slm.engines import media
from slm.engines.base import (
    DEFAULT_SEQUENCES,
    LoadOptions,
    ModelInfo,
    SavedSequence,
    Sequences,
    check_load_options,
    context_for,
)
from slm.engines.hf_tokens import HFText, special_tokens
from slm.engines.onnx_images import IMAGE_TYPES, Phi3VImages, check_type
from slm.errors import EngineError, InvalidModelFile, InvalidParameter

GENERATOR_CONTEXT = 2048
"""Positions per sequence when none are asked for: each Generator allocates all of them at once."""
IMAGE_CONTEXT = 4096
"""The same for a folder that takes images: one Phi-3-vision image alone takes up to 2,653 positions."""


def _default_context(model: dict[str, Any]) -> int:
    return IMAGE_CONTEXT if model.get("type") in IMAGE_TYPES else GENERATOR_CONTEXT


@dataclass
class _Sequence:
    generator: Any
    """Its Generator; None when none holds ``tokens`` yet (they are run with the next ones)."""
    tokens: list[int] = field(default_factory=list)
    """Every token it holds, to replay into a new Generator (``fork``, ``restore``)."""

    @property
    def length(self) -> int:
        return len(self.tokens)


def _read_config(path: Path) -> dict[str, Any]:
    config = path / "genai_config.json"
    if not config.exists():
        raise InvalidModelFile(f"{path} has no genai_config.json: not an ONNX Runtime GenAI model folder")
    data: dict[str, Any] = json.loads(config.read_text())
    return data


def memory_needed(path: Path, options: LoadOptions) -> int:
    """The weights on disk, and a KV cache of ``n_ctx`` positions per sequence (float32), with a margin."""
    model = _read_config(Path(path))["model"]
    decoder = model["decoder"]
    per_token = decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * 2 * 4
    weights = sum(p.stat().st_size for p in Path(path).iterdir() if p.suffix in (".onnx", ".data"))
    cap = _default_context(model)
    own = min(model.get("context_length", cap), cap)
    cells = options.max_sequences * (options.n_ctx or own)
    return weights + cells * per_token + weights // 10 + (64 << 20)


class OnnxGenAIEngine(HFText):
    """An ONNX Runtime GenAI model on the CPU, ``max_sequences`` sequences at a time."""

    name = "onnxruntime-genai"

    def __init__(
        self,
        path: Path,
        n_ctx: int | None = None,
        threads: int | None = None,
        max_sequences: int = DEFAULT_SEQUENCES,
    ) -> None:
        check_load_options(n_ctx, threads, max_sequences)
        from transformers import AutoTokenizer

        self.path = Path(path)
        settings = _read_config(self.path)["model"]
        check_type(settings.get("type", ""), str(self.path))
        train_ctx = int(settings.get("context_length", GENERATOR_CONTEXT))
        n_ctx = context_for(n_ctx, train_ctx, _default_context(settings))
        try:
            config = og.Config(str(self.path))
            config.clear_providers()  # the CPU
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
            self._model = og.Model(config)
        except Exception as e:  # onnxruntime_genai raises plain exceptions
            raise InvalidModelFile(f"{self.path} could not be loaded by ONNX Runtime GenAI: {e}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self._params = og.GeneratorParams(self._model)
        self._params.set_search_options(max_length=n_ctx)
        self.threads = threads or 0
        self.max_sequences = max_sequences
        self._sequences: Sequences[_Sequence] = Sequences(max_sequences)
        self._token_bytes = self.token_table()
        self._pad = settings.get("pad_token_id")
        self.info = self._read_info(settings, n_ctx, train_ctx)
        self._images: Phi3VImages | None = None
        if settings.get("type") in IMAGE_TYPES:
            self._images = Phi3VImages(self._model)
            self.image_marker = self._images.marker  # with it, the engine is TakesImages

    def tokenize_with_images(self, text: str, images: Sequence[media.Image], add_special: bool = True) -> list[int]:
        """Ids of ``text`` with each ``image_marker`` replaced by the next image's placeholder ids; the text
        between images is tokenized piece by piece, as Phi-3-vision's processor does."""
        if self._images is None:
            raise InvalidParameter("images", f"{self.path.name} is a text-only ONNX Runtime GenAI model "
                                   f"({self.info.architecture}); it does not take images")
        return self._images.tokenize(text, images, lambda piece, special: self.tokenize(piece, special), add_special)

    def _read_info(self, settings: dict[str, Any], n_ctx: int, train_ctx: int) -> ModelInfo:
        tok = self.tokenizer
        decoder = settings["decoder"]
        files = [p for p in self.path.iterdir() if p.suffix in (".onnx", ".data")]
        model_type = settings.get("type", "unknown")
        return ModelInfo(
            architecture={"gemma3_text": "gemma3"}.get(model_type, model_type),
            vocab_size=int(settings["vocab_size"]),
            context_length=n_ctx,
            train_context_length=train_ctx,
            parameters=0,  # not recorded in the folder
            size_bytes=sum(p.stat().st_size for p in files),
            chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
            special=special_tokens(tok, settings.get("eos_token_id")),
            metadata={"general.architecture": model_type, "general.name": self.path.name},
            kv_cells=n_ctx * self.max_sequences,
            kv_bytes_per_token=decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * 8,
        )

    # --- sequences -------------------------------------------------------------------------

    def new_sequence(self) -> int:
        return self._sequences.open(lambda: _Sequence(og.Generator(self._model, self._params)))

    def sequence_length(self, seq: int) -> int:
        return self._sequences[seq].length

    def rewind(self, seq: int, length: int) -> None:
        s = self._sequences.check_rewind(seq, length)
        if length < s.length:
            # Reading logits right after a rewind would re-run a dropped token: the callers of this
            # protocol always append before they read.
            if self._images is None:
                s.generator.rewind_to(length)
            else:  # ONNX Runtime GenAI cannot rewind a phi3v Generator: the next append runs a new one
                s.generator = None
            del s.tokens[length:]

    fork_recomputes = True
    """A fork computes the sequence again (ONNX Runtime GenAI cannot copy a KV cache): sharing a running
    sequence's prefix by forking it saves nothing here."""

    def fork(self, seq: int) -> int:
        return self._replay(list(self._sequences[seq].tokens))

    def save(self, seq: int) -> SavedSequence:
        tokens = list(self._sequences[seq].tokens)
        return SavedSequence(len(tokens), 8 * len(tokens), tokens)

    def restore(self, saved: SavedSequence) -> int:
        assert isinstance(saved.data, list)
        return self._replay(saved.data)

    def _replay(self, tokens: list[int]) -> int:
        """A new sequence holding ``tokens``, computed again (no KV copy in ONNX Runtime GenAI)."""
        seq = self.new_sequence()
        if tokens:
            try:
                self._append(self._sequences[seq], tokens)
            except BaseException:
                self.free(seq)
                raise
        return seq

    def free(self, seq: int) -> None:
        self._sequences.release(seq)

    # --- the forward pass ------------------------------------------------------------------

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]], keep: Sequence[int] | None = None) -> np.ndarray:
        states = self._sequences.check_evaluate(work, self.info.context_length, keep)
        counts = keep if keep is not None else [1] * len(work)
        out = np.empty((sum(counts), self.info.vocab_size), dtype=np.float32)  # (sum(keep), V)
        first = 0
        for s, (_seq, tokens), count in zip(states, work, counts, strict=True):
            out[first : first + count] = self._append(s, list(tokens), count)
            first += count
        return out

    def _append(self, s: _Sequence, tokens: list[int], keep: int = 1) -> np.ndarray:
        """The logits after the last ``keep`` of ``tokens``, appended to ``s``: (keep, V)."""
        if s.generator is None or (self._images is not None and any(t < 0 for t in tokens)):
            return self._first_run(s, tokens, keep)
        try:
            s.generator.append_tokens(np.asarray(tokens, dtype=np.int32))
            if len(tokens) == 1 and tokens[0] != self._pad:
                logits = s.generator.get_logits()  # (1, 1, V); a quarter of get_output's cost
            else:  # get_logits looks for the last token that is not the pad token: the raw output instead
                logits = s.generator.get_output("logits")  # (1, new tokens, V)
        except Exception as e:
            raise EngineError(f"ONNX Runtime GenAI failed: {e}") from None
        s.tokens.extend(tokens)
        return np.asarray(logits[0, -keep:], dtype=np.float32)

    def _first_run(self, s: _Sequence, tokens: list[int], keep: int = 1) -> np.ndarray:
        """Run the sequence's tokens and ``tokens`` as the first run of a new Generator: the only run in which
        ONNX Runtime GenAI reads images (see ``onnx_images``), and how a phi3v sequence is rewound."""
        whole = s.tokens + tokens
        inputs = self._images.inputs(whole) if self._images is not None and min(whole) < 0 else None
        try:
            generator = og.Generator(self._model, self._params)
            if inputs is None:
                generator.append_tokens(np.asarray(whole, dtype=np.int32))
            else:
                generator.set_inputs(inputs)
            logits = generator.get_output("logits")  # (1, len(whole), V)
        except Exception as e:
            raise EngineError(f"ONNX Runtime GenAI failed: {e}") from None
        s.generator = generator
        s.tokens.extend(tokens)
        return np.asarray(logits[0, -keep:], dtype=np.float32)

    def close(self) -> None:
        self._sequences.release_all()
        self._images = None
        self._model = None
