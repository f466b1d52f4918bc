"""llama.cpp through llama-cpp-python's low-level ctypes API.

We use the C functions directly (batch decode, per-sequence memory ops) rather than the high-level
``Llama`` class, so the generation loop above stays ours and several sequences share one context.
The KV cache is unified: all sequences draw from one pool of ``kv_cells`` cells (default ``n_ctx``),
and each may grow to ``n_ctx`` positions.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc
import numpy as np
from llama_cpp import mtmd_cpp as mtmd

from slm.engines import media
from slm.engines.base import (
    DEFAULT_BATCH,
    DEFAULT_CONTEXT,
    DEFAULT_SEQUENCES,
    LlamaCppOptions,
    ModelInfo,
    SavedSequence,
    Sequences,
    SpecialTokens,
    check_adapter,
    check_adapter_folders,
    check_load_options,
    context_for,
    default_threads,
)
from slm.engines.llamacpp_lora import Adapters, by_adapter, converted_bytes
from slm.engines.llamacpp_mtmd import Projector
from slm.errors import EngineError, InvalidModelFile, InvalidParameter, KVCacheFull

# llama.cpp logs through a process-wide callback. We keep its last lines to explain a failed load,
# and print them only when asked (SLM_VERBOSE=1).
_log_tail: list[str] = []


@lc.llama_log_callback
def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace")
    _log_tail.append(line)
    del _log_tail[:-40]
    if os.environ.get("SLM_VERBOSE"):
        os.write(2, text)


lc.llama_log_set(_on_log, ctypes.c_void_p(0))
mtmd.mtmd_log_set(_on_log, ctypes.c_void_p(0))  # the image projector's library logs the same way
mtmd.mtmd_helper_log_set(_on_log, ctypes.c_void_p(0))
lc.llama_backend_init()


def logged_failure(default: str) -> str:
    """The first line llama.cpp logged lately that says what failed (``default`` when none does)."""
    errors = [line.strip() for line in _log_tail if "error" in line.lower() or "failed" in line.lower()]
    return errors[0] if errors else default


def clear_log() -> None:
    """Forget what llama.cpp logged so far (before a call whose failure ``logged_failure`` explains)."""
    _log_tail.clear()


def _load_failure(path: Path) -> str:
    return f"{path} could not be loaded: {logged_failure('llama.cpp could not load it')}"


def model_meta(model: lc.llama_model_p, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


def _kv_bytes_per_token(model: lc.llama_model_p) -> int:
    """f16 keys and values in every layer (an upper bound for models with sliding-window layers).
    From the file's metadata, which a vocabulary-only load has too."""

    def number(key: str, default: int = 0) -> int:
        value = model_meta(model, f"{architecture}.{key}")
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:  # a per-layer list (a few architectures): take the largest
            return max(int(v) for v in value.strip("[]").split(",") if v.strip())

    architecture = model_meta(model, "general.architecture") or "unknown"
    heads = max(1, number("attention.head_count", 1))
    key = number("attention.key_length") or number("embedding_length") // heads
    value = number("attention.value_length") or key
    return number("block_count") * number("attention.head_count_kv", heads) * (key + value) * 2


@contextlib.contextmanager
def header_only(path: Path) -> Iterator[lc.llama_model_p]:
    """The model of ``path`` loaded with its header and vocabulary only (no weights), freed on exit."""
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise InvalidModelFile(_load_failure(Path(path)))
    try:
        yield model
    finally:
        lc.llama_model_free(model)


def memory_needed(path: Path, options: LlamaCppOptions) -> int:
    """Bytes a load of ``path`` with these options will take: the weights, its adapters, the KV cache and a
    margin for compute buffers. Reads only the file's header and vocabulary (and the adapters' headers)."""
    with header_only(path) as model:
        per_token = _kv_bytes_per_token(model)
        cells = max(options.kv_cells or 0,
                    options.n_ctx or min(lc.llama_model_n_ctx_train(model), DEFAULT_CONTEXT))
    size = Path(path).stat().st_size + sum(converted_bytes(folder) for folder in (options.adapters or {}).values())
    return size + cells * per_token + size // 10 + (32 << 20)


def file_metadata(path: Path, *keys: str) -> dict[str, str | None]:
    """``keys`` of a GGUF file's metadata (``general.file_type``...), None for those it lacks; reads only its
    header and vocabulary."""
    with header_only(path) as model:
        return {key: model_meta(model, key) for key in keys}


def tokenize(vocab: lc.llama_vocab_p, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    """``text``'s ids by llama.cpp's tokenizer of ``vocab`` (with the model's special tokens if ``add_special``)."""
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buf = (lc.llama_token * capacity)()
    n = lc.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
    if n < 0:  # the buffer was too small; -n is the size needed
        capacity = -n
        buf = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, capacity, add_special, parse_special)
    return list(buf[:n])


Gap = tuple[int, int, int]
"""An image that takes fewer positions than tokens (M-RoPE): (its first token, the token after it, positions)."""


@dataclass
class _Slot:
    """A sequence's tokens in the context's KV cache (llama.cpp keeps the cache itself)."""

    length: int = 0
    gaps: tuple[Gap, ...] = ()
    adapter: str | None = None
    """The LoRA adapter its tokens run through (None: the model alone)."""

    def position(self, length: int) -> int:
        """Where the sequence's first ``length`` tokens end: the position of the token after them."""
        position = length
        for start, end, taken in self.gaps:
            if end <= length:
                position -= end - start - taken
            elif start < length:
                raise EngineError("a sequence cannot be cut inside an image")
        return position


class LlamaCppEngine:
    """A GGUF model in a llama.cpp context that holds up to ``max_sequences`` sequences."""

    name = "llama.cpp"

    def __init__(
        self,
        path: Path,
        n_ctx: int | None = None,
        threads: int | None = None,
        max_sequences: int = DEFAULT_SEQUENCES,
        n_batch: int = DEFAULT_BATCH,
        flash_attention: bool | None = None,
        kv_cells: int | None = None,
        mmproj: Path | None = None,
        adapters: Mapping[str, Path] | None = None,
    ) -> None:
        check_load_options(n_ctx, threads, max_sequences, kv_cells)
        check_adapter_folders(adapters or {})
        self.path = Path(path)
        clear_log()
        model_params = lc.llama_model_default_params()
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise InvalidModelFile(_load_failure(self.path))
        self._vocab = lc.llama_model_get_vocab(self._model)
        train_ctx = lc.llama_model_n_ctx_train(self._model)
        try:
            n_ctx = context_for(n_ctx, train_ctx, DEFAULT_CONTEXT)
        except InvalidParameter:
            lc.llama_model_free(self._model)
            raise
        threads = threads or default_threads()
        if kv_cells is not None and kv_cells < n_ctx:
            lc.llama_model_free(self._model)
            raise InvalidParameter("kv_cells", f"{kv_cells} is less than the context of one sequence ({n_ctx})")
        try:
            self._adapters = Adapters(self._model, self.path, adapters or {}, clear_log, logged_failure)
        except BaseException:
            lc.llama_model_free(self._model)
            raise
        cparams = lc.llama_context_default_params()
        # Beyond the training context only in total: no one sequence gets more than n_ctx positions.
        cparams.n_ctx = max(kv_cells or 0, n_ctx)
        cparams.n_batch = cparams.n_ubatch = min(n_batch, cparams.n_ctx)
        cparams.n_seq_max = max_sequences
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.no_perf = True
        cparams.flash_attn_type = {
            None: lc.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attention]
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self._adapters.close()
            lc.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens for {self.path}")
        self._memory = lc.llama_get_memory(self._ctx)
        self.threads = threads
        self.n_batch = lc.llama_n_batch(self._ctx)  # llama.cpp may lower it to fit the context
        self.max_sequences = max_sequences
        self._vocab_size = lc.llama_vocab_n_tokens(self._vocab)
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._sequences: Sequences[_Slot] = Sequences(max_sequences, "context")
        self._pieces: dict[int, bytes] = {}
        self.info = self._read_info(n_ctx, train_ctx, lc.llama_n_ctx(self._ctx))
        self._projector: Projector | None = None
        if mmproj is not None:
            try:
                self._projector = Projector(Path(mmproj), self._model, self._ctx, threads, self.n_batch,
                                            self.info.architecture)
            except Exception:
                self.close()
                raise
            self.image_marker = self._projector.marker  # with it, the engine is TakesImages

    # --- model facts ---------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        return model_meta(self._model, key)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return (lc.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")

    def _read_info(self, n_ctx: int, train_ctx: int, kv_cells: int) -> ModelInfo:
        bos, eos = lc.llama_vocab_bos(self._vocab), lc.llama_vocab_eos(self._vocab)
        eog = frozenset(t for t in range(self._vocab_size) if lc.llama_vocab_is_eog(self._vocab, t))
        template = lc.llama_model_chat_template(self._model, None)
        special = SpecialTokens(
            bos_id=bos if bos >= 0 else None,
            eos_id=eos if eos >= 0 else None,
            end_of_generation=eog,
            bos_text=self._token_text(bos),
            eos_text=self._token_text(eos),
            add_bos=bool(lc.llama_vocab_get_add_bos(self._vocab)),
        )
        keys = ("general.architecture", "general.name", "general.file_type", "tokenizer.ggml.model")
        metadata = {k: v for k in keys if (v := self._meta(k)) is not None}
        architecture = metadata.get("general.architecture", "unknown")
        return ModelInfo(
            architecture=architecture,
            vocab_size=self._vocab_size,
            context_length=min(n_ctx, kv_cells),
            train_context_length=train_ctx,
            parameters=lc.llama_model_n_params(self._model),
            size_bytes=self.path.stat().st_size,
            chat_template=template.decode("utf-8") if template else None,
            special=special,
            metadata=metadata,
            kv_cells=kv_cells,
            kv_bytes_per_token=_kv_bytes_per_token(self._model),
            adapters=self._adapters.names,
        )

    # --- text <-> ids --------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return tokenize(self._vocab, text, add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        ids = (lc.llama_token * len(tokens))(*tokens)
        capacity = 8 * len(tokens) + 16
        buf = ctypes.create_string_buffer(capacity)
        n = lc.llama_detokenize(self._vocab, ids, len(tokens), buf, capacity, False, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_detokenize(self._vocab, ids, len(tokens), buf, -n, False, special)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def tokenize_with_images(self, text: str, images: Sequence[media.Image], add_special: bool = True) -> list[int]:
        if self._projector is None:
            raise InvalidParameter("images", f"{self.path.name} was loaded without an image projector (mmproj)")
        return self._projector.tokenize(text, images, add_special)

    # --- sequences and the KV cache --------------------------------------------------------

    def new_sequence(self, adapter: str | None = None) -> int:
        check_adapter(adapter, self._adapters.names)
        return self._sequences.open(lambda: _Slot(adapter=adapter))

    def sequence_length(self, seq: int) -> int:
        return self._sequences[seq].length

    def rewind(self, seq: int, length: int) -> None:
        slot = self._sequences.check_rewind(seq, length)
        lc.llama_memory_seq_rm(self._memory, seq, slot.position(length), -1)
        slot.length = length
        slot.gaps = tuple(gap for gap in slot.gaps if gap[1] <= length)

    def fork(self, seq: int) -> int:
        parent = self._sequences[seq]
        child = self._sequences.open(lambda: _Slot(parent.length, parent.gaps, parent.adapter))
        lc.llama_memory_seq_cp(self._memory, seq, child, -1, -1)
        return child

    def save(self, seq: int) -> SavedSequence:
        size = lc.llama_state_seq_get_size(self._ctx, seq)
        # A mapping of its own, not the heap: a saved cache is megabytes, kept a while and dropped in any order,
        # and from malloc's heap those left the process's memory growing by what they fragmented.
        data = (ctypes.c_uint8 * size).from_buffer(mmap.mmap(-1, max(size, 1)))
        if lc.llama_state_seq_get_data(self._ctx, data, size, seq) != size:
            raise EngineError(f"llama.cpp could not copy out the KV cache of sequence {seq}")
        slot = self._sequences[seq]
        return SavedSequence(slot.length, size, (data, slot.gaps), slot.adapter)

    def restore(self, saved: SavedSequence) -> int:
        assert isinstance(saved.data, tuple)
        data, gaps = saved.data
        check_adapter(saved.adapter, self._adapters.names)
        seq = self._sequences.open(lambda: _Slot(saved.length, gaps, saved.adapter))
        if lc.llama_state_seq_set_data(self._ctx, data, saved.nbytes, seq) == 0:
            self.free(seq)
            raise KVCacheFull(f"no room in the KV cache to restore {saved.length} positions")
        return seq

    def free(self, seq: int) -> None:
        if self._sequences.release(seq) is not None:
            lc.llama_memory_seq_rm(self._memory, seq, -1, -1)

    # --- the forward pass ------------------------------------------------------------------

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]], keep: Sequence[int] | None = None) -> np.ndarray:
        """Append each sequence's tokens and decode, packing up to ``n_batch`` tokens per call: one group of
        calls per LoRA adapter (llama.cpp applies adapters to the whole context), the one in use first."""
        slots = self._sequences.check_evaluate(work, self.info.context_length, keep)
        counts = keep if keep is not None else [1] * len(work)
        out = np.empty((sum(counts), self._vocab_size), dtype=np.float32)  # (sum(keep), V)
        firsts = [0, *itertools.accumulate(counts)]  # each row's first row of `out`
        gaps: list[tuple[Gap, ...]] = [()] * len(work)  # each row's images that take fewer positions than tokens
        try:
            for adapter, rows in by_adapter([slot.adapter for slot in slots], self._adapters.active):
                self._adapters.use(self._ctx, adapter)
                entries: list[tuple[int, int, int, int, int]] = []
                for row in rows:
                    row_entries, gaps[row] = self._entries(row, work[row], slots[row], counts[row], firsts[row])
                    entries.extend(row_entries)
                for start in range(0, len(entries), self.n_batch):
                    chunk = entries[start : start + self.n_batch]
                    self._decode(chunk)
                    for i, (_row, _seq, _token, _pos, at) in enumerate(chunk):
                        if at >= 0:
                            logits = lc.llama_get_logits_ith(self._ctx, i)
                            out[at] = np.ctypeslib.as_array(logits, shape=(self._vocab_size,))
        except EngineError:
            # leave every sequence as it was, those of groups already decoded too
            for (seq, _tokens), slot in zip(work, slots, strict=True):
                lc.llama_memory_seq_rm(self._memory, seq, slot.position(slot.length), -1)
            raise
        for (_seq, tokens), slot, row_gaps in zip(work, slots, gaps, strict=True):
            slot.length += len(tokens)
            slot.gaps += row_gaps
        return out

    def _entries(self, row: int, work: tuple[int, Sequence[int]], slot: _Slot, count: int,
                 first: int) -> tuple[list[tuple[int, int, int, int, int]], tuple[Gap, ...]]:
        """One entry per token of row ``row`` left to decode with the others: (row, seq, token, position, row of
        ``out`` for its logits or -1), the last ``count`` giving logits from ``first`` on; and the row's images
        that take fewer positions than tokens (a row's images are decoded here, before its text)."""
        seq, tokens = work
        start, position = 0, slot.position(slot.length)
        gaps: tuple[Gap, ...] = ()
        if self._projector is not None and min(tokens) < 0:
            start, position, gaps = self._decode_images(seq, tokens, slot.length, position)
        kept_from = len(tokens) - count  # tokens from here on give logits, at first + (i - kept_from)
        offset = first - kept_from
        return [(row, seq, tokens[i], position + i - start, offset + i if i >= kept_from else -1)
                for i in range(start, len(tokens))], gaps

    def _decode_images(self, seq: int, tokens: Sequence[int], length: int,
                       position: int) -> tuple[int, int, tuple[Gap, ...]]:
        """Decode ``tokens`` (appended to ``seq`` at token ``length``, position ``position``) up to their last
        run of text, one run at a time: each image through the projector, the text between them as usual.
        Returns where the last run starts (it is decoded with the other sequences' tokens), its position,
        and the images that took fewer positions than tokens."""
        assert self._projector is not None
        parts = media.runs(tokens)
        if parts[-1][2] is not None:
            raise EngineError("a chunk of a prompt must end with text, not with an image")
        gaps: list[Gap] = []
        for start, end, image in parts[:-1]:
            if image is None:
                for at in range(start, end, self.n_batch):
                    stop = min(end, at + self.n_batch)
                    self._decode([(0, seq, tokens[i], position + i - start, -1) for i in range(at, stop)])
                position += end - start
            else:
                self._projector.decode(image, seq, position, tokens[start:end])
                taken = self._projector.positions(image)
                if taken != end - start:
                    gaps.append((length + start, length + end, taken))
                position += taken
        return parts[-1][0], position, tuple(gaps)

    def _decode(self, chunk: list[tuple[int, int, int, int, int]]) -> None:
        batch = self._batch
        batch.n_tokens = len(chunk)
        for i, (_row, seq, token, pos, at) in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = at >= 0
        status = lc.llama_decode(self._ctx, batch)
        if status == 1:
            raise KVCacheFull(f"the KV cache of {self.info.kv_cells} positions has no room for this batch")
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")

    def close(self) -> None:
        projector = getattr(self, "_projector", None)
        if projector is not None:
            projector.close()
            self._projector = None
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            self._adapters.close()
            lc.llama_model_free(self._model)
            self._ctx = self._model = None

    def __del__(self) -> None:
        self.close()
