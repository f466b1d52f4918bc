"""OpenVINO: the stateful LLM folders that ``slm convert --to openvino`` (and optimum-intel) write.

The model is one IR (``openvino_model.xml``) whose KV cache lives in the infer request's state variables
(inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``beam_idx``; output ``logits`` for every new
position). slm gives each sequence an infer request of its own, so a sequence's state is its KV cache:
``evaluate`` appends tokens by running its request, ``rewind`` cuts the state tensors along their position
axis, ``fork``, ``save`` and ``restore`` copy them. The sequences of a step run one request after the other
(each request already uses every thread). The tokenizer and chat template are the folder's own, read with
the tokenizers library.

The CPU plugin computes in float32 and keeps the KV cache in float32 here (its defaults on a CPU with bf16
support are bf16 and an 8-bit KV cache), so a float32 folder matches transformers' forward.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from slm.engines.base import (
    DEFAULT_CONTEXT,
    DEFAULT_SEQUENCES,
    LoadOptions,
    ModelInfo,
    SavedSequence,
    Sequences,
    check_load_options,
    context_for,
)
from slm.engines.hf_tokens import HFText, special_tokens
from slm.errors import EngineError, InvalidModelFile, InvalidParameter

MODEL_FILE = "openvino_model.xml"
INPUTS = ("input_ids", "attention_mask", "position_ids", "beam_idx")
"""What a stateful LLM IR takes; a folder whose model lacks one is refused by name."""
CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "PERFORMANCE_HINT": "LATENCY"}


def _read_config(path: Path) -> dict[str, Any]:
    if not (path / MODEL_FILE).exists():
        raise InvalidModelFile(f"{path} has no {MODEL_FILE}: not an OpenVINO model folder "
                               "(slm convert MODEL --to openvino makes one)")
    config = path / "config.json"
    if not config.exists():
        raise InvalidModelFile(f"{path} has no config.json beside {MODEL_FILE}")
    data: dict[str, Any] = json.loads(config.read_text())
    return data.get("text_config", data)


def _kv_bytes_per_token(config: dict[str, Any]) -> int:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * 2 * 4  # float32


def memory_needed(path: Path, options: LoadOptions) -> int:
    """The weights on disk, and a float32 KV cache of ``n_ctx`` positions per sequence, with a margin."""
    config = _read_config(Path(path))
    weights = (Path(path) / MODEL_FILE).with_suffix(".bin").stat().st_size
    own = min(int(config.get("max_position_embeddings", DEFAULT_CONTEXT)), DEFAULT_CONTEXT)
    cells = options.max_sequences * (options.n_ctx or own)
    return weights + cells * _kv_bytes_per_token(config) + weights // 10 + (64 << 20)


@dataclass
class _Sequence:
    """A sequence: its infer request, whose state holds the KV cache of ``length`` positions."""

    request: Any
    length: int = 0


class OpenVINOEngine(HFText):
    """An OpenVINO stateful LLM on the CPU, ``max_sequences`` sequences at a time."""

    name = "openvino"

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
        config = _read_config(self.path)
        train_ctx = int(config.get("max_position_embeddings", DEFAULT_CONTEXT))
        n_ctx = context_for(n_ctx, train_ctx, DEFAULT_CONTEXT)
        core = ov.Core()
        try:
            model = core.read_model(self.path / MODEL_FILE)
        except RuntimeError as e:
            raise InvalidModelFile(f"{self.path / MODEL_FILE} could not be read by OpenVINO: {e}") from None
        names = {name for port in model.inputs for name in port.get_names()}
        missing = [name for name in INPUTS if name not in names]
        if missing or not model.get_sinks():
            what = f"inputs {', '.join(missing)}" if missing else "a KV cache in its state (it is stateless)"
            raise InvalidModelFile(f"{self.path / MODEL_FILE} is not a stateful LLM as slm runs one: it lacks {what}")
        settings = dict(CPU_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
        self._compiled = core.compile_model(model, "CPU", settings)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self._token_bytes = self.token_table()
        self.threads = threads or 0
        self.max_sequences = max_sequences
        self._sequences: Sequences[_Sequence] = Sequences(max_sequences)
        self._idle: list[Any] = []  # infer requests of freed sequences, their state reset
        self._axes: list[int] | None = None  # each state tensor's position axis, found at the first read
        self.info = self._read_info(config, n_ctx, train_ctx)

    def _read_info(self, config: dict[str, Any], n_ctx: int, train_ctx: int) -> ModelInfo:
        tok = self.tokenizer
        generation = self.path / "generation_config.json"
        eos = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
        model_type = config.get("model_type", "unknown")
        return ModelInfo(
            architecture={"gemma3_text": "gemma3"}.get(model_type, model_type),
            vocab_size=int(config["vocab_size"]),
            context_length=n_ctx,
            train_context_length=train_ctx,
            parameters=0,  # not recorded in the folder
            size_bytes=(self.path / MODEL_FILE).with_suffix(".bin").stat().st_size,
            chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
            special=special_tokens(tok, eos, config.get("eos_token_id")),
            metadata={"general.architecture": model_type, "general.name": self.path.name},
            kv_cells=n_ctx * self.max_sequences,
            kv_bytes_per_token=_kv_bytes_per_token(config),
        )

    # --- sequences -------------------------------------------------------------------------

    def _request(self) -> Any:
        return self._idle.pop() if self._idle else self._compiled.create_infer_request()

    def new_sequence(self) -> int:
        return self._sequences.open(lambda: _Sequence(self._request()))

    def sequence_length(self, seq: int) -> int:
        return self._sequences[seq].length

    def _states(self, s: _Sequence) -> list[np.ndarray]:
        """Copies of the sequence's state tensors (its KV cache), in the request's order."""
        return [np.array(state.state.data, copy=True) for state in s.request.query_state()]

    def _set_states(self, s: _Sequence, arrays: Sequence[np.ndarray]) -> None:
        for state, array in zip(s.request.query_state(), arrays, strict=True):
            state.state = ov.Tensor(np.ascontiguousarray(array))

    def rewind(self, seq: int, length: int) -> None:
        s = self._sequences.check_rewind(seq, length)
        if length == s.length:
            return
        if length == 0:
            s.request.reset_state()
        else:
            assert self._axes is not None  # a sequence with positions has been read
            for state, axis in zip(s.request.query_state(), self._axes, strict=True):
                state.state = ov.Tensor(np.take(state.state.data, range(length), axis=axis))  # one copy, kept
        s.length = length

    def fork(self, seq: int) -> int:
        return self.restore(self.save(seq))

    def save(self, seq: int) -> SavedSequence:
        s = self._sequences[seq]
        arrays = self._states(s) if s.length else []
        return SavedSequence(s.length, sum(a.nbytes for a in arrays), arrays)

    def restore(self, saved: SavedSequence) -> int:
        assert isinstance(saved.data, list)
        seq = self._sequences.open(lambda: _Sequence(self._request(), saved.length))
        if saved.length:
            self._set_states(self._sequences[seq], saved.data)
        return seq

    def free(self, seq: int) -> None:
        s = self._sequences.release(seq)
        if s is not None:
            s.request.reset_state()
            self._idle.append(s.request)

    # --- the forward pass ------------------------------------------------------------------

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]], keep: Sequence[int] | None = None) -> np.ndarray:
        """Each sequence's tokens through its own infer request, one after the other."""
        states = self._sequences.check_evaluate(work, self.info.context_length, keep)
        counts = keep if keep is not None else [1] * len(work)
        if any(t < 0 for _, tokens in work for t in tokens):
            raise InvalidParameter("images", f"{self.path.name} is a text-only OpenVINO model; it does not take images")
        rows = [self._run(s, list(tokens))[-count:] for s, (_, tokens), count in zip(states, work, counts, strict=True)]
        return np.concatenate(rows, axis=0)  # (sum(keep), V)

    def _run(self, s: _Sequence, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` to ``s``: the logits after each of them, (T, V)."""
        start, end = s.length, s.length + len(tokens)
        inputs = {
            "input_ids": np.array([tokens], dtype=np.int64),  # (1, T)
            "attention_mask": np.ones((1, end), dtype=np.int64),  # (1, past + T)
            "position_ids": np.arange(start, end, dtype=np.int64)[None],  # (1, T)
            "beam_idx": np.zeros(1, dtype=np.int32),
        }
        try:
            s.request.infer(inputs)
        except RuntimeError as e:
            raise EngineError(f"OpenVINO failed to run {self.path.name}: {e}") from None
        s.length = end
        if self._axes is None:
            self._axes = [self._position_axis(state.state.shape, end) for state in s.request.query_state()]
        logits = s.request.get_tensor("logits").data  # (1, T, V)
        return np.array(logits[0, -len(tokens):], dtype=np.float32)

    @staticmethod
    def _position_axis(shape: Sequence[int], length: int) -> int:
        """The axis of a KV state tensor that counts positions: of size ``length`` (the batch axis is 1)."""
        axes = [i for i, size in enumerate(shape) if size == length and i > 0]
        if not axes:
            raise EngineError(f"a state tensor of shape {tuple(shape)} has no axis of {length} positions")
        return 2 if 2 in axes else axes[0]

    def close(self) -> None:
        self._sequences.release_all()
        self._idle.clear()
        self._compiled = None
