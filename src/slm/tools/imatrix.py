"""An importance matrix for llama.cpp's quantizer, computed as ``llama-imatrix`` does: for each weight matrix of
a GGUF model, the mean square of each input column's activations while the model reads a calibration text.
``slm quantize --imatrix TEXT`` passes it to ``llama_model_quantize``, which then keeps more precision where
the activations are large (and without which the 1- to 3-bit ``iq`` types cannot be made at all).

    matrix = importance(resolve("smollm2-hf-fp16").path, text)        # {"blk.0.attn_q.weight": (576,) ...}

llama.cpp shows each node of its graph to an evaluation callback (``cb_eval``). For a matrix multiplication by
a weight, the callback reads the activations (the second operand, float32 in host memory on the CPU) and adds
up their squares per column. llama-cpp-python has no ``ggml_tensor`` type, so the callback reads the few fields
it needs at their offsets in ggml's struct (``ggml.h``), checked at the first call against ggml's own accessors.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from slm.engines.llamacpp import clear_log, logged_failure
from slm.errors import EngineError, EngineUnavailable, InvalidModelFile, InvalidParameter

_ggml = ctypes.CDLL(str(Path(lc.__file__).parent / "lib" / "libggml-base.so"))
for _function in (_ggml.ggml_op_desc, _ggml.ggml_get_name):
    _function.restype = ctypes.c_char_p
    _function.argtypes = [ctypes.c_void_p]
_ggml.ggml_get_data.restype = ctypes.c_void_p
_ggml.ggml_get_data.argtypes = [ctypes.c_void_p]

# Offsets in struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10): type, buffer, ne[4],
# nb[4], op, op_params, flags, src[10], view_src, view_offs, data, name[64].
_TYPE, _NE, _NB, _SRC, _DATA, _NAME = 0, 16, 48, 152, 248, 256
_F32 = 0


class _Collector:
    """The evaluation callback's state: per weight, the sum of squared activations per column and the rows seen."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}
        self.checked = False
        self.error: Exception | None = None

    def __call__(self, node: int, ask: bool, _user_data: int) -> bool:
        try:
            if not self.checked:
                self._check_layout(node)
            if _ggml.ggml_op_desc(node) != b"MUL_MAT":
                return not ask  # not one to look at; an observed node must return True for the graph to go on
            weight = _pointer(node, _SRC)
            name = (_ggml.ggml_get_name(weight) or b"").decode()
            if ask:
                return name.endswith(".weight")
            self._add(name, _pointer(node, _SRC + 8))
        except Exception as e:  # raised through C it would be lost: kept, and the computation stopped
            self.error = e
            return False
        return True

    def _check_layout(self, node: int) -> None:
        if (ctypes.string_at(node + _NAME) != _ggml.ggml_get_name(node)
                or _pointer(node, _DATA) != (_ggml.ggml_get_data(node) or 0)):
            raise EngineUnavailable("this llama.cpp build lays out ggml_tensor otherwise than slm reads it: "
                                    "an importance matrix cannot be computed with it")
        self.checked = True

    def _add(self, name: str, activations: int) -> None:
        if ctypes.c_int.from_address(activations + _TYPE).value != _F32:
            return
        ne = (ctypes.c_int64 * 4).from_address(activations + _NE)
        nb = (ctypes.c_size_t * 4).from_address(activations + _NB)
        columns, rows = int(ne[0]), int(ne[1]) * int(ne[2]) * int(ne[3])
        if ne[2] * ne[3] != 1 and nb[2] != nb[1] * ne[1]:
            return  # a batched product over non-contiguous planes: not a weight's input
        size = (rows - 1) * int(nb[1]) + columns * 4
        buffer = (ctypes.c_char * size).from_address(_pointer(activations, _DATA))
        x = np.ndarray((rows, columns), dtype=np.float32, buffer=memoryview(buffer), strides=(int(nb[1]), 4))  # (T, in)
        squares = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        if name in self.sums:
            self.sums[name] += squares
            self.rows[name] += rows
        else:
            self.sums[name], self.rows[name] = squares, rows


def _pointer(address: int, offset: int) -> int:
    return ctypes.c_void_p.from_address(address + offset).value or 0


def importance(path: Path, text: str, n_ctx: int = 512, threads: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Per weight matrix of the GGUF model ``path``, the mean square of each input column's activations over
    ``text``, read in windows of ``n_ctx`` tokens (each starting afresh, as llama-imatrix does); float32 vectors
    of the matrix's input size, by tensor name. ``progress(done, total)`` is called after each window."""
    collector = _Collector()
    callback = lc.ggml_backend_sched_eval_callback(collector)  # kept alive until the context is freed
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    if not model:
        raise InvalidModelFile(f"{path} could not be loaded: {logged_failure('llama.cpp could not load it')}")
    ctx = batch = None
    try:
        tokens = _tokens(model, text)
        windows = len(tokens) // n_ctx
        if windows < 1:
            raise InvalidParameter("imatrix", f"the calibration text has {len(tokens)} tokens, fewer than one "
                                              f"window of {n_ctx}: give a longer text")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        if threads:
            cparams.n_threads = cparams.n_threads_batch = threads
        cparams.cb_eval = callback
        clear_log()
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            raise EngineError(f"llama.cpp could not create a context for {path}: {logged_failure('no reason given')}")
        batch = lc.llama_batch_init(n_ctx, 0, 1)
        for w in range(windows):
            _fill(batch, tokens[w * n_ctx : (w + 1) * n_ctx])
            status = lc.llama_decode(ctx, batch)
            if collector.error is not None:
                raise collector.error
            if status != 0:
                raise EngineError(f"llama.cpp could not read window {w} of the calibration text (status {status})")
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            if progress is not None:
                progress(w + 1, windows)
    finally:
        if batch is not None:
            lc.llama_batch_free(batch)
        if ctx:
            lc.llama_free(ctx)
        lc.llama_model_free(model)
    return {name: (sums / collector.rows[name]).astype(np.float32) for name, sums in collector.sums.items()}


def _fill(batch: Any, window: list[int]) -> None:
    """One sequence of ``window``'s tokens from position 0, each asking for its logits: as llama-imatrix does, so
    that the last layer's feed-forward and the output matrix see every token (llama.cpp computes them only for
    the tokens whose logits are asked for)."""
    batch.n_tokens = len(window)
    for i, token in enumerate(window):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
        batch.seq_id[i][0] = 0


def _tokens(model: lc.llama_model_p, text: str) -> list[int]:
    vocab = lc.llama_model_get_vocab(model)
    data = text.encode("utf-8")
    room = len(data) + 2
    ids = (lc.llama_token * room)()
    n = lc.llama_tokenize(vocab, data, len(data), ids, room, True, False)
    return list(ids[:n])


def as_quantize_parameter(matrix: Mapping[str, np.ndarray]) -> tuple[ctypes.Array[Any], list[np.ndarray]]:
    """``matrix`` as ``llama_model_quantize_params.imatrix`` takes it: an array of (name, data, size) ended by a
    null name; and the float32 arrays it points into, which the caller keeps alive while quantizing."""
    entries = (lc.llama_model_imatrix_data * (len(matrix) + 1))()
    kept = []
    for entry, (name, values) in zip(entries, matrix.items(), strict=False):
        data = np.ascontiguousarray(values, dtype=np.float32)
        kept.append(data)
        entry.name = name.encode()
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    return entries, kept
