"""OpenVINO: the stateful LLM folders that ``slm convert --to openvino`` (and optimum-intel) write.

The model is one IR (``openvino_model.xml``) whose KV cache lives in the infer request's state variables
(inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``beam_idx``; output ``logits`` for every new
position; each state tensor [batch, kv heads, positions, head size]). The tokenizer and chat template are the
folder's own, read with the tokenizers library.

Batching. An infer request runs a *group* of sequences, one batch row each, whose KV caches are the rows of
its state. Rows need not be equally long: ``attention_mask`` says which positions of its state each row
attends to, and ``position_ids`` give each row its own positions, so a row that takes fewer tokens in a call
(or none) is padded with positions it never attends to afterwards (a hole), and a rewind in a shared group
only masks positions out. A row leaves for free: ``beam_idx`` of the next call gathers the rows that stay.
A sequence starts in a group of its own (its prompt is read alone); groups that decode side by side are
merged into one (their states read, their holes dropped, written as one state) once the calls that merging
would have saved have cost as much time as the merge is expected to take ("ski rental"); a sequence that
takes many tokens at once, is forked or saved is read out of its group. A model whose sliding window a
row could outgrow (Gemma 3's 512 positions, Phi-3-mini-4k's 2,047) keeps every sequence in a group of its
own: a hole would shift the window.

The CPU plugin computes in float32 and keeps the KV cache in float32 here (its defaults on a CPU with bf16
support are bf16 and an 8-bit KV cache), so a float32 folder matches transformers' forward.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    check_adapter,
    check_load_options,
    context_for,
)
from slm.engines.hf_tokens import HFText, special_tokens
from slm.errors import EngineError, InvalidModelFile, InvalidParameter
from slm.store.describe import decoder_parameters

MODEL_FILE = "openvino_model.xml"
INPUTS = ("input_ids", "attention_mask", "position_ids", "beam_idx")
"""What a stateful LLM IR takes; a folder whose model lacks one is refused by name."""
CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "PERFORMANCE_HINT": "LATENCY"}
POSITIONS = 2
"""The axis of a state tensor that counts positions (0 is the batch row)."""
SPLIT_TOKENS = 16
"""A sequence that takes more tokens than this in one call leaves a shared group first: the other rows would
compute as many padding positions."""
SECONDS_PER_BYTE = 2e-9
"""What merging groups costs per byte of state read and written, until a merge has been timed (measured
here: 0.33 s for SmolLM2's 189 MB of 8 rows x 512 positions)."""


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


def _windowed(config: dict[str, Any], n_ctx: int) -> bool:
    """Whether some layer attends to a sliding window of positions that a row's holes could shift: one shorter
    than the span a shared row can reach (holes are dropped before they outnumber the positions in use, so
    a row spans less than three contexts)."""
    window = config.get("sliding_window")
    return window is not None and bool(config.get("use_sliding_window", True)) and window < 3 * n_ctx + 128


def memory_needed(path: Path, options: LoadOptions) -> int:
    """The weights on disk, and a float32 KV cache of ``n_ctx`` positions per sequence, with a margin."""
    config = _read_config(Path(path))
    weights = (Path(path) / MODEL_FILE).with_suffix(".bin").stat().st_size
    own = min(int(config.get("max_position_embeddings", DEFAULT_CONTEXT)), DEFAULT_CONTEXT)
    cells = options.max_sequences * (options.n_ctx or own)
    return weights + cells * _kv_bytes_per_token(config) + weights // 10 + (64 << 20)


@dataclass(eq=False)
class _Group:
    """An infer request and the sequences whose KV caches are the rows of its state."""

    request: Any
    rows: list[_Sequence] = field(default_factory=list)
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    """(rows, span): the state positions each row attends to."""
    source: list[int] = field(default_factory=list)
    """The state's batch row of each of ``rows`` (the next call's ``beam_idx`` gathers them)."""
    snapshot: list[np.ndarray] | None = None
    """The state tensors as read since the last call."""

    @property
    def span(self) -> int:
        return int(self.mask.shape[1])


def _decodes(reads: dict[_Sequence, list[int]]) -> bool:
    """Whether a group's call is a decoding step: one token for each of its rows that reads."""
    return all(len(tokens) == 1 for tokens in reads.values())


@dataclass(eq=False)
class _Sequence:
    length: int = 0
    group: _Group = field(init=False)


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
        self._check_stateful(model)
        settings = dict(CPU_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
        self._compiled = core.compile_model(model, "CPU", settings)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self._token_bytes = self.token_table()
        self.threads = threads or 0
        self.max_sequences = max_sequences
        self._sequences: Sequences[_Sequence] = Sequences(max_sequences)
        self._idle: list[Any] = []  # infer requests of dropped groups, their state reset
        self.batching = not _windowed(config, n_ctx)
        """Whether groups merge; off, each sequence keeps an infer request of its own (for measurement)."""
        self.seconds_per_byte = SECONDS_PER_BYTE
        """What a merge costs per byte, updated by each merge timed."""
        self._waste = 0.0  # seconds of calls that a merge of the decoding groups would have saved
        self.info = self._read_info(config, n_ctx, train_ctx)

    def _check_stateful(self, model: Any) -> None:
        names = {name for port in model.inputs for name in port.get_names()}
        missing = [name for name in INPUTS if name not in names]
        if missing or not model.get_sinks():
            what = f"inputs {', '.join(missing)}" if missing else "a KV cache in its state (it is stateless)"
            raise InvalidModelFile(f"{self.path / MODEL_FILE} is not a stateful LLM as slm runs one: it lacks {what}")
        for op in model.get_ops():
            shape = op.get_output_partial_shape(0) if op.get_type_name() == "ReadValue" else None
            if shape is not None and (shape.rank.get_length() != 4 or not shape[1].is_static or not shape[3].is_static):
                raise InvalidModelFile(f"{self.path / MODEL_FILE} keeps a KV state of shape {shape}, not "
                                       "[batch, kv heads, positions, head size]")

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
            parameters=decoder_parameters(config) or 0,  # counted from config.json where its layout is known
            size_bytes=(self.path / MODEL_FILE).with_suffix(".bin").stat().st_size,
            chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
            special=special_tokens(tok, eos, config.get("eos_token_id")),
            metadata={"general.architecture": model_type, "general.name": self.path.name},
            kv_cells=n_ctx * self.max_sequences,
            kv_bytes_per_token=_kv_bytes_per_token(config),
        )

    # --- groups ----------------------------------------------------------------------------

    def _group(self, rows: Sequence[_Sequence] = (), arrays: Sequence[np.ndarray] | None = None) -> _Group:
        """A group of ``rows`` on a fresh infer request, its state ``arrays`` (rows, heads, span, size) with
        the rows' positions first (none when not given)."""
        group = _Group(self._idle.pop() if self._idle else self._compiled.create_infer_request())
        group.rows = list(rows)
        group.source = list(range(len(rows)))
        span = arrays[0].shape[POSITIONS] if arrays else 0
        group.mask = (np.arange(span)[None] < np.array([[s.length] for s in rows])).astype(np.int64)
        for s in rows:
            s.group = group
        if arrays is not None and span:
            for state, array in zip(group.request.query_state(), arrays, strict=True):
                state.state = ov.Tensor(np.ascontiguousarray(array))
        return group

    def _drop(self, group: _Group) -> None:
        group.request.reset_state()
        self._idle.append(group.request)

    def _leave(self, s: _Sequence) -> int:
        """Take ``s`` out of its group (dropped when it was the last row); the state row it had."""
        group = s.group
        row = group.rows.index(s)
        source = group.source.pop(row)
        group.rows.pop(row)
        group.mask = np.delete(group.mask, row, axis=0)
        if not group.rows:
            self._drop(group)
        return source

    def _snapshot(self, group: _Group) -> list[np.ndarray]:
        """``group``'s state tensors, read once between two calls."""
        if group.snapshot is None:
            group.snapshot = [np.array(state.state.data, copy=True) for state in group.request.query_state()]
        return group.snapshot

    def _kv(self, rows: Sequence[_Sequence]) -> list[np.ndarray]:
        """The KV caches of ``rows`` (of any groups) as state arrays of (rows, heads, longest, size): each
        row's positions first, its holes dropped."""
        longest = max(s.length for s in rows)
        out: list[np.ndarray] = []
        for i, s in enumerate(rows):
            group = s.group
            row = group.rows.index(s)
            kept, source = np.flatnonzero(group.mask[row]), group.source[row]
            snapshot = self._snapshot(group)
            if not out:
                out = [np.zeros((len(rows), a.shape[1], longest, a.shape[3]), dtype=a.dtype) for a in snapshot]
            for array, layer in zip(out, snapshot, strict=True):
                array[i, :, : s.length] = layer[source][:, kept]
        return out

    def _merge(self, groups: Sequence[_Group]) -> _Group:
        """One group of all the rows of ``groups``, without holes (timed, to price the next merge)."""
        start = time.perf_counter()
        rows = [s for group in groups for s in group.rows]
        arrays = self._kv(rows)
        moved = sum(a.nbytes for group in groups for a in self._snapshot(group)) + sum(a.nbytes for a in arrays)
        for group in groups:
            self._drop(group)
        merged = self._group(rows, arrays)
        self.seconds_per_byte = (time.perf_counter() - start) / max(moved, 1)
        return merged

    def _merge_cost(self, groups: Sequence[_Group]) -> float:
        """Seconds a merge of ``groups`` should take: their states read, the merged one written."""
        per_row = self.info.kv_bytes_per_token
        read = sum(len(g.source) * g.span for g in groups) * per_row
        written = sum(len(g.rows) for g in groups) * max(s.length for g in groups for s in g.rows) * per_row
        return (read + written) * self.seconds_per_byte

    # --- sequences -------------------------------------------------------------------------

    def _own(self, s: _Sequence, arrays: Sequence[np.ndarray] | None = None) -> _Sequence:
        """``s`` in a group of its own, its KV cache ``arrays`` (none when not given)."""
        self._group([s], arrays)
        return s

    def new_sequence(self, adapter: str | None = None) -> int:
        check_adapter(adapter, ())  # this engine loads no adapters
        return self._sequences.open(lambda: self._own(_Sequence()))

    def sequence_length(self, seq: int) -> int:
        return self._sequences[seq].length

    def rewind(self, seq: int, length: int) -> None:
        s = self._sequences.check_rewind(seq, length)
        if length == s.length:
            return
        group = s.group
        row = group.rows.index(s)
        if len(group.rows) > 1:  # shared: its later positions become holes
            group.mask[row, np.flatnonzero(group.mask[row])[length:]] = 0
        elif length == 0:
            group.request.reset_state()
            group.mask, group.source, group.snapshot = np.zeros((1, 0), dtype=np.int64), [0], None
        else:  # alone: the state keeps its positions up to the last one kept
            end = int(np.flatnonzero(group.mask[row])[length - 1]) + 1
            for state in group.request.query_state():
                kept = np.take(state.state.data, [group.source[row]], axis=0)
                state.state = ov.Tensor(np.ascontiguousarray(kept[:, :, :end]))
            group.mask, group.source, group.snapshot = group.mask[:, :end].copy(), [0], None
            group.mask[row, np.flatnonzero(group.mask[row])[length:]] = 0
        s.length = length

    def fork(self, seq: int) -> int:
        return self.restore(self.save(seq))

    def save(self, seq: int) -> SavedSequence:
        s = self._sequences[seq]
        arrays = self._kv([s]) if s.length else []
        return SavedSequence(s.length, sum(a.nbytes for a in arrays), arrays)

    def restore(self, saved: SavedSequence) -> int:
        arrays = saved.data
        assert isinstance(arrays, list)
        return self._sequences.open(lambda: self._own(_Sequence(saved.length), arrays or None))

    def free(self, seq: int) -> None:
        s = self._sequences.release(seq)
        if s is not None:
            self._leave(s)

    # --- the forward pass ------------------------------------------------------------------

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]], keep: Sequence[int] | None = None) -> np.ndarray:
        """The work's tokens through their groups, one call a group: the logits after the last ``keep`` of
        each sequence's new tokens (one each by default), in the work's order."""
        states = self._sequences.check_evaluate(work, self.info.context_length, keep)
        counts = keep if keep is not None else [1] * len(work)
        if any(t < 0 for _, tokens in work for t in tokens):
            raise InvalidParameter("images", f"{self.path.name} is a text-only OpenVINO model; it does not take images")
        for s, (_, tokens) in zip(states, work, strict=True):
            if len(tokens) > SPLIT_TOKENS and len(s.group.rows) > 1:
                self._alone(s)
        calls: dict[_Group, dict[_Sequence, list[int]]] = {}
        for s, (_, tokens) in zip(states, work, strict=True):
            calls.setdefault(s.group, {})[s] = list(tokens)
        calls = self._regroup(calls)
        times = {}
        logits: dict[_Sequence, np.ndarray] = {}
        for group, reads in calls.items():
            start = time.perf_counter()
            logits.update(self._call(group, reads))
            times[group] = time.perf_counter() - start
        decoding = [times[g] for g, reads in calls.items() if _decodes(reads)]
        if len(decoding) > 1:
            self._waste += sum(decoding) - max(decoding)
        rows = [logits[s][-count:] for s, count in zip(states, counts, strict=True)]
        return np.concatenate(rows, axis=0)  # (sum(keep), V)

    def _alone(self, s: _Sequence) -> None:
        """Move ``s`` out of a shared group into one of its own."""
        arrays = self._kv([s])
        self._leave(s)
        self._own(s, arrays)

    def _regroup(self, calls: dict[_Group, dict[_Sequence, list[int]]]) -> dict[_Group, dict[_Sequence, list[int]]]:
        """The calls to make: the groups that decode (one token for each row that reads) merged into one once
        their separate calls have wasted what the merge costs; a group whose holes have come to outnumber its
        positions in use, rewritten without them."""
        decoding = [g for g, tokens in calls.items() if _decodes(tokens) and g.rows]
        if self.batching and len(decoding) > 1 and self._waste >= self._merge_cost(decoding):
            merged = self._merge(decoding)
            self._waste = 0.0
            joined = {s: t for g in decoding for s, t in calls.pop(g).items()}
            calls[merged] = joined
        for group in list(calls):
            longest = max(s.length for s in group.rows)
            if len(group.rows) > 1 and group.span > 2 * longest + 64:
                calls[self._merge([group])] = calls.pop(group)
        return calls

    def _call(self, group: _Group, tokens: dict[_Sequence, list[int]]) -> dict[_Sequence, np.ndarray]:
        """One call of ``group``'s request: each row's tokens (none for a row not in ``tokens``), right-padded
        to the longest; the logits after each row's tokens, (T_row, V)."""
        width = max(len(t) for t in tokens.values())
        rows = len(group.rows)
        ids = np.zeros((rows, width), dtype=np.int64)
        taken = np.zeros((rows, width), dtype=np.int64)  # 1 where a row's own token is, 0 in its padding
        positions = np.empty((rows, width), dtype=np.int64)
        for row, s in enumerate(group.rows):
            mine = tokens.get(s, [])
            ids[row, : len(mine)] = mine
            taken[row, : len(mine)] = 1
            positions[row] = np.arange(s.length, s.length + width)
        # In the call every new position attends to itself, so a padding position never attends to nothing;
        # a row's own tokens come first, so they never see its padding.
        inputs = {"input_ids": ids, "attention_mask": np.concatenate([group.mask, np.ones_like(taken)], axis=1),
                  "position_ids": positions, "beam_idx": np.array(group.source, dtype=np.int32)}
        try:
            group.request.infer(inputs)
        except RuntimeError as e:
            raise EngineError(f"OpenVINO failed to run {self.path.name}: {e}") from None
        group.mask = np.concatenate([group.mask, taken], axis=1)
        group.source, group.snapshot = list(range(rows)), None
        logits = group.request.get_tensor("logits").data  # (rows, width, V)
        out = {}
        for row, s in enumerate(group.rows):
            if s in tokens:
                n = len(tokens[s])
                s.length += n
                out[s] = np.array(logits[row, :n], dtype=np.float32)
        return out

    def close(self) -> None:
        for s in self._sequences.release_all():
            if s.group.rows:
                self._leave(s)
        self._idle.clear()
        self._compiled = None
