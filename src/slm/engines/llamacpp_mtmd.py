"""Images on llama.cpp: a model's ``mmproj`` GGUF through libmtmd, llama.cpp's multimodal library.

libmtmd splits a prompt holding media markers into text and image chunks, encodes an image chunk
into embeddings with the projector, and decodes embeddings into a sequence at given positions (with
non-causal attention over the image where the model wants it, as Gemma 3 does; M-RoPE positions, a
time, row and column for each of its tokens, where the model takes them, as Qwen2.5-VL does). slm keeps the rest:
the prompt's image chunks become placeholder ids (``media``), each image's chunk is kept by the
engine's number for it, and its embeddings are computed once and kept for the next prompt that holds
the same image.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as lc
import numpy as np
from llama_cpp import mtmd_cpp as mt

from slm.engines import media
from slm.errors import EngineError, InvalidModelFile, InvalidParameter

HELD_IMAGES = 64
"""Images whose chunk an engine keeps (a prompt that refers to one dropped since is refused)."""
ENCODED_IMAGES = 8
"""Images whose embeddings an engine keeps."""
AROUND_IMAGE = {"gemma3": ("\n\n", "\n\n")}
"""Text a model's own processor puts around each image, by architecture (transformers' Gemma3Processor
writes ``\n\n<start_of_image>...<end_of_image>\n\n``; libmtmd adds only the image markers)."""
_NO_CALLBACK = mt.mtmd_helper_post_decode_callback()


class Projector:
    """The ``mmproj`` of a loaded llama.cpp model: tokenizes prompts with images, and decodes images."""

    def __init__(self, path: Path, model: lc.llama_model_p, ctx: lc.llama_context_p, threads: int,
                 n_batch: int, architecture: str) -> None:
        params = mt.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        self._ctx = mt.mtmd_init_from_file(str(path).encode(), model, params)
        if not self._ctx:
            raise InvalidModelFile(f"{path} could not be loaded as the model's image projector (mmproj)")
        if not mt.mtmd_support_vision(self._ctx):
            self.close()
            raise InvalidModelFile(f"{path} is a projector without vision (audio only): slm takes images")
        self.path = Path(path)
        self.marker = (mt.mtmd_default_marker() or b"<__media__>").decode()
        self._around = AROUND_IMAGE.get(architecture, ("", ""))
        self.non_causal = bool(mt.mtmd_decode_use_non_causal(self._ctx, None))
        self.mrope = bool(mt.mtmd_decode_use_mrope(self._ctx))
        """Images take M-RoPE positions (Qwen2.5-VL): fewer than their tokens, ``positions()`` says how many."""
        self._lctx = ctx
        self._width = lc.llama_model_n_embd_inp(model)
        self._n_batch = n_batch
        self._next = 0
        self._numbers: dict[str, int] = {}  # image digest -> its number
        self._chunks: OrderedDict[int, ctypes.c_void_p] = OrderedDict()  # number -> a copy of its chunk
        self._encoded: OrderedDict[int, np.ndarray] = OrderedDict()  # number -> (tokens, n_embd) float32

    def tokenize(self, text: str, images: Sequence[media.Image], add_special: bool) -> list[int]:
        """The ids of ``text``, where each ``marker`` stands for the next of ``images``; each image is a run
        of placeholder ids."""
        if text.count(self.marker) != len(images):
            raise InvalidParameter("images", f"{len(images)} images for {text.count(self.marker)} places for them")
        bitmaps = (mt.mtmd_bitmap_p_ctypes * max(1, len(images)))()
        made = []
        chunks = mt.mtmd_input_chunks_init()
        try:
            for i, image in enumerate(images):
                pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
                bitmap = mt.mtmd_bitmap_init(image.width, image.height, pixels)
                if not bitmap:
                    raise EngineError(f"libmtmd could not take a {image.width}x{image.height} image")
                made.append(bitmap)
                mt.mtmd_bitmap_set_id(bitmap, image.digest.encode())
                bitmaps[i] = bitmap
            before, after = self._around
            data = text.replace(self.marker, f"{before}{self.marker}{after}").encode()
            prompt = mt.mtmd_input_text(data, len(data), add_special, True)
            status = mt.mtmd_tokenize(self._ctx, chunks, ctypes.byref(prompt), bitmaps, len(images))
            if status != 0:
                raise InvalidParameter("images", f"libmtmd could not read the prompt's images (status {status})")
            return self._ids(chunks)
        finally:
            mt.mtmd_input_chunks_free(chunks)
            for bitmap in made:
                mt.mtmd_bitmap_free(bitmap)

    def _ids(self, chunks: ctypes.c_void_p) -> list[int]:
        ids: list[int] = []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            kind = mt.mtmd_input_chunk_get_type(chunk)
            if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tokens = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids.extend(tokens[: n.value])
            elif kind == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                count = mt.mtmd_input_chunk_get_n_tokens(chunk)
                if self.non_causal and count > self._n_batch:
                    raise InvalidParameter("images", f"an image of {count} positions needs n_batch >= {count} "
                                           f"(this model attends over a whole image at once); it is {self._n_batch}")
                ids.extend(media.placeholders(self._hold(chunk), count))
            else:
                raise InvalidParameter("images", "this projector made a chunk that is not text or an image")
        return ids

    def _hold(self, chunk: ctypes.c_void_p) -> int:
        digest = (mt.mtmd_input_chunk_get_id(chunk) or b"").decode()
        number = self._numbers.get(digest)
        if number is not None and number in self._chunks:
            self._chunks.move_to_end(number)
            return number
        number = self._numbers[digest] = self._next
        self._next += 1
        self._chunks[number] = mt.mtmd_input_chunk_copy(chunk)
        while len(self._chunks) > HELD_IMAGES:
            old, held = self._chunks.popitem(last=False)
            mt.mtmd_input_chunk_free(held)
            self._encoded.pop(old, None)
        return number

    def _chunk(self, number: int) -> ctypes.c_void_p:
        chunk = self._chunks.get(number)
        if chunk is None:
            raise EngineError("the prompt refers to an image this engine no longer holds; send the image again")
        return chunk

    def positions(self, number: int) -> int:
        """How many positions image ``number`` takes in a sequence: one per token, or with M-RoPE the larger
        side of its grid (the text after it goes on from there)."""
        return int(mt.mtmd_input_chunk_get_n_pos(self._chunk(number)))

    def decode(self, number: int, seq: int, position: int, ids: Sequence[int]) -> None:
        """Decode image ``number`` (its placeholder ``ids``, checked whole) into ``seq`` from ``position`` on,
        encoding it first if its embeddings are not kept."""
        chunk = self._chunk(number)
        if list(ids) != media.placeholders(number, mt.mtmd_input_chunk_get_n_tokens(chunk)):
            raise EngineError("a chunk of a prompt holds only part of an image")
        embeddings = self._encoded.get(number)
        if embeddings is None:
            embeddings = self._encode(chunk)
            self._encoded[number] = embeddings
            while len(self._encoded) > ENCODED_IMAGES:
                self._encoded.popitem(last=False)
        self._encoded.move_to_end(number)
        end = lc.llama_pos(0)
        pointer = embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        status = mt.mtmd_helper_decode_image_chunk(self._ctx, self._lctx, chunk, pointer, position, seq,
                                                   self._n_batch, ctypes.byref(end), _NO_CALLBACK, None)
        if status != 0:
            raise EngineError(f"llama.cpp could not decode an image (status {status})")

    def _encode(self, chunk: ctypes.c_void_p) -> np.ndarray:
        status = mt.mtmd_encode_chunk(self._ctx, chunk)
        if status != 0:
            raise EngineError(f"the projector could not encode an image (status {status})")
        count = mt.mtmd_input_chunk_get_n_tokens(chunk)
        out = mt.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(out, shape=(count * self._width,)).copy()

    def close(self) -> None:
        for held in self._chunks.values():
            mt.mtmd_input_chunk_free(held)
        self._chunks.clear()
        self._encoded.clear()
        if getattr(self, "_ctx", None):
            mt.mtmd_free(self._ctx)
            self._ctx = None
