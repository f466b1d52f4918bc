"""PyTorch through Hugging Face transformers: the reference implementation of every architecture.

transformers' own ``generate()`` runs one request at a time and re-creates its state per call. Here the
KV cache belongs to us, and ``evaluate`` runs every sequence of a call in one forward pass. The keys and
values of the sequences of a step live in batch buffers, one row per sequence, ``(B, H_kv, capacity, D)``
per layer, left-aligned so that a key's column is its position; a 4-D mask says which keys each query
may see (its own row's, causally, and within the sliding window for layers that have one). While the
same sequences keep stepping together (decode), each step writes only its new keys in place: nothing is
copied. When the set changes or a row is full, the sequences move into new buffers (one copy).

Only a row's own sequence writes to it, and only past its length; ``fork`` and ``save`` take copies, so
anything handed out is never changed. Loads Hugging Face folders (safetensors, config, tokenizer) and
GGUF files (dequantized). A vision-language model's folder also takes images (``engines/vision.py``): a
step holding an image's placeholder ids feeds the decoder embeddings, the image's positions taking its
encoder's rows (and, for a bidirectional encoder, seeing each other both ways). A model with M-RoPE
(Qwen2.5-VL) parts a token's rotary position from its cache column: an image's positions follow its patch
grid and the text after it goes on from their largest plus one, so each of its sequences carries a ``Rope``
(the offset of its next position, and its images' positions so a rewind recomputes it); the mask stays by
column. The state of a sequence and the batch buffers are in ``transformers_kv``. LoRA adapters loaded beside
the model (``transformers_lora``) give each sequence its own: a step's rows go through theirs in one forward pass.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
from transformers.cache_utils import Cache
from transformers.utils import logging as hf_logging

from slm.engines import media, vision
from slm.engines.base import (
    DEFAULT_CONTEXT,
    DEFAULT_SEQUENCES,
    ModelInfo,
    SavedSequence,
    Sequences,
    SharedCacheOptions,
    check_adapter,
    check_adapter_folders,
    check_load_options,
    context_for,
    default_threads,
)
from slm.engines.hf_tokens import HFText, special_tokens
from slm.engines.transformers_kv import Rope, RowLayer, Rows, SeqState, Write
from slm.engines.transformers_lora import Adapters, adapter_bytes
from slm.engines.vision import ImageRun, Images, load_vision
from slm.errors import InvalidModelFile, InvalidParameter, KVCacheFull

ARCHITECTURES = {"gemma3_text": "gemma3", "phimoe": "phimoe", "phi3": "phi3", "llama": "llama", "qwen2": "qwen2"}
"""transformers' model_type -> the architecture name slm reports (llama.cpp's names)."""
IMAGE_MARKER = "<__media__>"
"""What stands for an image in a prompt's text (libmtmd's marker, so both engines read the same text)."""


def memory_needed(path: Path, options: SharedCacheOptions) -> int:
    """Weights in float32 (a GGUF is dequantized; a VLM's image side counted from its files; LoRA adapters) and
    the KV cache, with a margin."""
    folder, gguf = _locate(path)
    config = _text_config(folder, gguf)
    weights = max(_parameter_count(config) * 4, _stored_weights(folder) if gguf is None else 0)
    weights += sum(adapter_bytes(Path(adapter)) for adapter in (options.adapters or {}).values())
    cells = max(options.kv_cells or 0, options.n_ctx or min(config.max_position_embeddings, DEFAULT_CONTEXT))
    return weights + cells * _kv_bytes_per_token(config) + weights // 10 + (64 << 20)


def _text_config(folder: str, gguf: str | None) -> Any:
    """The text decoder's settings; those of a VLM whose model_type transformers lacks (Phi-3-vision: only its
    checkpoint's code knows it, never run) as its config.json writes them."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False).get_text_config(decoder=True)
    except ValueError:
        if gguf is not None:
            raise
        raw = _read_config(folder)
        return SimpleNamespace(**raw.get("text_config", raw))


def _stored_weights(folder: str) -> int:
    """A Hugging Face folder's safetensors (a VLM's vision tower too) in float32, when config.json names the
    dtype they are stored in; else 0."""
    raw = _read_config(folder)
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(raw.get("dtype") or raw.get("torch_dtype") or "")
    if width is None:
        return 0
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) * 4 // width


def _kv_bytes_per_token(config: Any) -> int:
    """float32 keys and values in every layer."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers * getattr(config, "num_key_value_heads", heads) * head_dim * 2 * 4)


def _parameter_count(config: Any) -> int:
    """About: embeddings, attention and MLP weights (experts included) per layer."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    experts = getattr(config, "num_local_experts", 1) or 1
    return config.vocab_size * h * 2 + layers * (4 * h * h + 3 * h * inter * experts)


def load_pretrained(path: Path) -> tuple[Any, Any]:
    """(tokenizer, float32 model) of a Hugging Face folder or a GGUF file (dequantized); a vision-language
    model transformers has no causal-LM class for (Qwen2.5-VL) in its image-text-to-text class."""
    folder, gguf = _locate(path)
    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
            causal = type(config) in AutoModelForCausalLM._model_mapping
            auto = AutoModelForCausalLM if causal else AutoModelForImageTextToText
            model = auto.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidModelFile(f"{path} could not be loaded by transformers: {e}") from None
    return tokenizer, model


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' loading without its narration (GGUF loading names every tensor) or progress bars."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _read_config(folder: str) -> dict[str, Any]:
    """A Hugging Face folder's config.json, as written (a VLM's model_type may be one transformers lacks)."""
    try:
        config: dict[str, Any] = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModelFile(f"{folder}/config.json could not be read: {e}") from None
    return config


def _locate(path: Path) -> tuple[str, str | None]:
    """(folder for from_pretrained, GGUF file name inside it or None)."""
    path = Path(path)
    if path.is_file():
        return str(path.parent), path.name
    if not (path / "config.json").exists():
        raise InvalidModelFile(f"{path} has no config.json: not a Hugging Face model folder")
    return str(path), None


class TransformersEngine(HFText):
    """A Hugging Face causal LM on CPU (or CUDA when present), ``max_sequences`` sequences at a time."""

    name = "transformers"
    image_marker: str
    """Set only when the model takes images: then the engine is ``TakesImages``."""

    def __init__(
        self,
        path: Path,
        n_ctx: int | None = None,
        threads: int | None = None,
        max_sequences: int = DEFAULT_SEQUENCES,
        kv_cells: int | None = None,
        adapters: Mapping[str, Path] | None = None,
    ) -> None:
        check_load_options(n_ctx, threads, max_sequences, kv_cells)
        check_adapter_folders(adapters or {})
        self.path = Path(path)
        folder, gguf = _locate(self.path)
        torch.set_num_threads(threads or default_threads())
        self.threads = torch.get_num_threads()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with quiet():
            parts = load_vision(Path(folder), _read_config(folder)) if gguf is None else None
        self._images: Images | None = None
        if parts is None:
            self.tokenizer, self.model = load_pretrained(self.path)
        else:  # a vision-language model: with its image encoder, the engine is TakesImages
            self.tokenizer, self.model, encoder = parts
            self._images = Images(encoder)
            self.image_marker = IMAGE_MARKER
        self._grid = self._images is not None and self._images.grid
        """M-RoPE: rotary positions apart from cache columns (``Rope``)."""
        self.model.to(self.device).eval()  # type: ignore[arg-type]
        config = self.model.config.get_text_config(decoder=True)
        self._layer_types = getattr(config, "layer_types", None)
        self._window = getattr(config, "sliding_window", None)
        self._eager = self.model.config._attn_implementation == "eager"
        train_ctx = int(getattr(config, "max_position_embeddings", DEFAULT_CONTEXT))
        n_ctx = context_for(n_ctx, train_ctx, DEFAULT_CONTEXT)
        self.max_sequences = max_sequences
        self._sequences: Sequences[SeqState] = Sequences(max_sequences)
        self._adapter_of: dict[int, str | None] = {}
        """Each open sequence's LoRA adapter (None: the model alone)."""
        self._rows: Rows | None = None
        self._layers = int(config.num_hidden_layers)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self._token_bytes = self.token_table()
        self._vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.info = self._read_info(config, n_ctx, train_ctx, kv_cells or n_ctx, tuple(adapters or {}))
        self._lora = self._load_adapters(adapters or {})

    def _load_adapters(self, folders: Mapping[str, Path]) -> Adapters | None:
        """peft's LoRA layers holding every adapter, or None without any (then peft is never imported)."""
        if not folders:
            return None
        if self._images is not None:
            raise InvalidParameter("adapters", f"{self.path.name} reads images; slm runs LoRA adapters over text "
                                               "models only")
        with quiet():
            return Adapters(self.model, folders)

    def _read_info(self, config: Any, n_ctx: int, train_ctx: int, kv_cells: int,
                   adapters: tuple[str, ...]) -> ModelInfo:
        tok = self.tokenizer
        model_type = getattr(config, "model_type", "unknown")
        files = [self.path] if self.path.is_file() else [p for p in self.path.iterdir() if p.suffix == ".safetensors"]
        return ModelInfo(
            architecture=ARCHITECTURES.get(model_type, model_type),
            vocab_size=self._vocab_size,
            context_length=n_ctx,
            train_context_length=train_ctx,
            parameters=sum(p.numel() for p in self.model.parameters()),
            size_bytes=sum(p.stat().st_size for p in files),
            chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
            special=special_tokens(tok, self.model.generation_config.eos_token_id),
            metadata={"general.architecture": ARCHITECTURES.get(model_type, model_type),
                      "general.name": getattr(config, "_name_or_path", "") or self.path.name},
            kv_cells=kv_cells,
            kv_bytes_per_token=_kv_bytes_per_token(config),
            adapters=adapters,
        )

    def tokenize_with_images(self, text: str, images: Sequence[media.Image], add_special: bool = True) -> list[int]:
        if self._images is None:
            raise InvalidParameter("images", f"{self.path.name} is a text-only model")
        return self._images.tokenize(text, IMAGE_MARKER, images, self.tokenize, add_special)

    # --- sequences -------------------------------------------------------------------------

    def new_sequence(self, adapter: str | None = None) -> int:
        check_adapter(adapter, self.info.adapters)
        return self._opened(self._sequences.open(lambda: SeqState(rope=Rope()) if self._grid else SeqState()),
                            adapter)

    def _opened(self, seq: int, adapter: str | None) -> int:
        self._adapter_of[seq] = adapter
        return seq

    def sequence_length(self, seq: int) -> int:
        return self._sequences[seq].length

    def rewind(self, seq: int, length: int) -> None:
        s = self._sequences.check_rewind(seq, length)
        if length < s.length and s.kv is not None:  # a row of the batch buffers needs no slicing: length says
            s.kv = [(k[:, :, :length], v[:, :, :length]) for k, v in s.kv] if length else None
        if s.rope is not None:
            s.rope = s.rope.rewound(length)
        s.length = length

    def fork(self, seq: int) -> int:
        parent = self._sequences[seq]
        kv = parent.frozen()
        return self._opened(self._sequences.open(lambda: SeqState(kv, parent.length, rope=parent.rope)),
                            self._adapter_of[seq])

    def save(self, seq: int) -> SavedSequence:
        s = self._sequences[seq]
        kv = s.frozen()
        size = sum(k.numel() * k.element_size() * 2 for k, _ in kv or [])
        return SavedSequence(s.length, size, kv if s.rope is None else (kv, s.rope), self._adapter_of[seq])

    def restore(self, saved: SavedSequence) -> int:
        check_adapter(saved.adapter, self.info.adapters)
        kv, rope = saved.data if isinstance(saved.data, tuple) else (saved.data, None)
        assert kv is None or isinstance(kv, list)
        seq = self._sequences.open(lambda: SeqState(None if kv is None else list(kv), saved.length, rope=rope))
        return self._opened(seq, saved.adapter)

    def free(self, seq: int) -> None:
        self._adapter_of.pop(seq, None)
        s = self._sequences.release(seq)
        if s is not None:
            s.kv, s.home = None, None  # its row and the batch buffers hold no cycle through it

    # --- the forward pass ------------------------------------------------------------------

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]], keep: Sequence[int] | None = None) -> np.ndarray:
        states = self._sequences.check_evaluate(work, self.info.context_length, keep)
        items = [(s, list(tokens)) for s, (_seq, tokens) in zip(states, work, strict=True)]
        # The batch buffers give every row the longest row's columns: that is what the cache holds.
        width = max(s.length + len(t) for s, t in items)
        if len(items) * width > self.info.kv_cells:
            raise KVCacheFull(f"the KV cache of {self.info.kv_cells} positions has no room for {len(items)} rows "
                              f"of {width}")
        # every row through its own adapter, in the same forward pass (peft's mixed adapter batches)
        routed = self._lora.routed([self._adapter_of[seq] for seq, _ in work]) if self._lora is not None \
            else contextlib.nullcontext()
        try:
            with torch.inference_mode(), routed:
                return self._forward(items, keep).numpy()
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise KVCacheFull(f"out of memory for this batch: {e}") from None
        except RuntimeError as e:  # a failed CPU allocation is a plain RuntimeError
            if "alloc" not in str(e).lower() and "memory" not in str(e).lower():
                raise
            raise KVCacheFull(f"out of memory for this batch: {e}") from None

    def _forward(self, items: list[tuple[SeqState, list[int]]], keep: Sequence[int] | None = None) -> torch.Tensor:
        """One forward pass over every sequence's new tokens; logits after each one's last, (B, V), or after
        each one's last ``keep[b]``, (sum(keep), V).

        Row b's keys are columns [0, past_b + new_b) of the batch buffers; its new tokens are the last
        new_b of the N query columns (left padding), written at columns [past_b, past_b + new_b)."""
        batch = len(items)
        past = [s.length for s, _ in items]
        new = [len(t) for _, t in items]
        N = max(new)  # noqa: N806
        T = max(p + n for p, n in zip(past, new, strict=True))  # noqa: N806 (key columns this step)
        images = self._image_runs([t for _, t in items])  # first: a bad image leaves every sequence as it was
        rows = self._rows_for([s for s, _ in items], T)
        ids = torch.full((batch, N), self._pad, dtype=torch.long)
        query_pos = torch.zeros(batch, N, dtype=torch.long)  # (B, N); padding queries at 0
        real = torch.zeros(batch, N, dtype=torch.bool)
        write_row: list[int] = []
        write_col: list[int] = []
        read_col: list[int] = []
        for b, ((_, tokens), p, n) in enumerate(zip(items, past, new, strict=True)):
            ids[b, N - n :] = torch.tensor(tokens)
            query_pos[b, N - n :] = torch.arange(p, p + n)
            real[b, N - n :] = True
            write_row += [b] * n
            write_col += range(p, p + n)
            read_col += range(N - n, N)
        valid = torch.arange(T)[None, :] < torch.tensor([p + n for p, n in zip(past, new, strict=True)])[:, None]
        write = Write(torch.tensor(write_row), torch.tensor(write_col), torch.tensor(read_col), T, max(past))
        cache = Cache(layers=[RowLayer(k, v, write) for k, v in zip(rows.keys, rows.values, strict=True)])
        together = None
        if images:
            inputs = {"inputs_embeds": self._embeddings(ids, images, N, new).to(self.device)}
            if self._images is not None and self._images.encoder.bidirectional:
                together = vision.together(images, past, new, N, T)
        else:
            inputs = {"input_ids": ids.to(self.device)}
        positions, ropes = self._grid_positions(items, query_pos, images) if self._grid else (query_pos, None)
        out = self.model(**inputs, attention_mask=self._mask(valid, query_pos, real, together),
                         position_ids=positions.to(self.device), cache=cache, use_cache=True,
                         logits_to_keep=max(keep) if keep is not None else 1)
        for (s, _), n in zip(items, new, strict=True):
            s.length += n
        if ropes is not None:
            for (s, _), rope in zip(items, ropes, strict=True):
                s.rope = rope
        if keep is None:
            logits: torch.Tensor = out.logits[:, -1, :].float().cpu()  # (B, V)
            return logits
        # left-padded rows: row b's last keep[b] tokens are its last keep[b] query columns
        return torch.cat([out.logits[b, out.logits.shape[1] - k :] for b, k in enumerate(keep)]).float().cpu()

    @staticmethod
    def _grid_positions(items: list[tuple[SeqState, list[int]]], query_pos: torch.Tensor,
                        images: list[ImageRun]) -> tuple[torch.Tensor, list[Rope]]:
        """M-RoPE: (3, B, N) rotary positions of the step's queries (a row's text at column + its delta, an
        image's by its grid from the position its first token would take), and each sequence's ``Rope`` after
        the step."""
        N = query_pos.shape[1]  # noqa: N806
        positions = query_pos[None].repeat(3, 1, 1)  # (3, B, N)
        ropes: list[Rope] = []
        for b, (s, tokens) in enumerate(items):
            rope = s.rope
            assert rope is not None
            first = N - len(tokens)
            positions[:, b, first:] += rope.delta
            for run in (r for r in images if r.row == b):  # in order along the row
                assert run.grid is not None
                at = s.length + run.start  # the image's first column
                grid = run.grid + (at + rope.delta)  # (3, end - start)
                positions[:, b, first + run.start : first + run.end] = grid
                delta = int(grid.max()) + 1 - (s.length + run.end)
                positions[:, b, first + run.end :] += delta - rope.delta
                rope = Rope(delta, (*rope.images, (at, grid)))
            ropes.append(rope)
        return positions, ropes

    def _image_runs(self, tokens: list[list[int]]) -> list[ImageRun]:
        """Each image among the step's new tokens, with its encoder rows."""
        if self._images is None:
            if any(min(t) < 0 for t in tokens):
                raise InvalidParameter("images", f"{self.path.name} is a text-only model")
            return []
        return self._images.runs(tokens)

    def _embeddings(self, ids: torch.Tensor, images: list[ImageRun], N: int,  # noqa: N803
                    new: list[int]) -> torch.Tensor:
        """(B, N, hidden): the decoder's own input embeddings of ``ids`` (Gemma 3's are scaled), each image's
        positions replaced by its encoder rows."""
        embed = self.model.get_input_embeddings()
        embeds: torch.Tensor = embed(ids.clamp(min=0).to(self.device))  # placeholders read as id 0, then replaced
        for b, start, end, image_rows, _ in images:
            first = N - new[b]  # the row's new tokens are its last new[b] query columns
            embeds[b, first + start : first + end] = image_rows.to(embeds.device, embeds.dtype)
        return embeds

    def _rows_for(self, seqs: list[SeqState], width: int) -> Rows:
        """The batch buffers of the last step when they hold exactly these sequences, in this order, with
        room for ``width`` columns; otherwise new buffers (with room to grow) that the sequences move into."""
        rows = self._rows
        if (rows is not None and width <= rows.capacity and len(rows.seqs) == len(seqs)
                and all(a is b and b.home == (rows, i) for i, (a, b) in enumerate(zip(rows.seqs, seqs, strict=True)))):
            return rows
        room = max(width, self.info.kv_cells // len(seqs))  # the headroom stays within the KV budget
        capacity = min(self.info.context_length, room, width + max(64, width // 2))
        shape = (len(seqs), self._kv_heads, capacity, self._head_dim)
        keys = [torch.zeros(shape, dtype=self.model.dtype, device=self.device) for _ in range(self._layers)]
        values = [torch.zeros(shape, dtype=self.model.dtype, device=self.device) for _ in range(self._layers)]
        for b, s in enumerate(seqs):
            for layer, (k, v) in enumerate(s.layers() or []):
                keys[layer][b, :, : s.length] = k[0]
                values[layer][b, :, : s.length] = v[0]
        rows = Rows(seqs, keys, values, capacity)
        for b, s in enumerate(seqs):
            s.kv, s.home = None, (rows, b)
        self._rows = rows
        return rows

    def _mask(self, valid: torch.Tensor, query_pos: torch.Tensor, real: torch.Tensor,
              together: torch.Tensor | None = None) -> Any:
        """(B, 1, N, T): a real query sees the valid keys of its own row at or before its position (key
        column = position), and those ``together`` with it (an image's other positions); a padding query sees
        only column 0 (no row without any key, which would give NaN). A sliding window limits both, as in
        transformers' Gemma 3: window AND (causal OR same image)."""
        N, T = query_pos.shape[1], valid.shape[1]  # noqa: N806
        real_query = real[:, None, :, None]  # (B, 1, N, 1)
        first = torch.zeros(N, T, dtype=torch.bool)
        first[:, 0] = True
        key_pos = torch.arange(T)[None, None, None, :]
        causal = valid[:, None, None, :] & (key_pos <= query_pos[:, None, :, None])
        if together is not None:
            causal = causal | (valid[:, None, None, :] & together)
        full = torch.where(real_query, causal, first)
        sliding = full
        if self._window:
            near = query_pos[:, None, :, None] - key_pos < self._window
            sliding = torch.where(real_query, causal & near, first)
        if self._layer_types is not None:
            mask: Any = {"full_attention": full}
            if "sliding_attention" in self._layer_types:
                mask["sliding_attention"] = sliding
        else:
            mask = sliding if self._window else full
        if self._eager:  # eager attention adds the mask: 0 where allowed, the dtype's minimum elsewhere
            low = torch.finfo(self.model.dtype).min

            def additive(m: torch.Tensor) -> torch.Tensor:
                return torch.zeros(m.shape, dtype=self.model.dtype).masked_fill(~m, low)

            mask = {k: additive(v) for k, v in mask.items()} if isinstance(mask, dict) else additive(mask)
        if isinstance(mask, dict):
            return {k: v.to(self.device) for k, v in mask.items()}
        return mask.to(self.device)

    def close(self) -> None:
        for s in self._sequences.release_all():
            s.kv, s.home = None, None
        self._adapter_of.clear()
        self._rows = None
        if self._lora is not None:
            self._lora.close()
        self.model = None  # type: ignore[assignment]
