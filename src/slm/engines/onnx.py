"""ONNX Runtime GenAI: the folders its model builder writes (``genai_config.json``, ``model.onnx``), the
layout of Microsoft's Phi-3/3.5 ONNX releases.

slm drives it step by step so that slm's own sampling applies: ``append_tokens`` runs the model over new
tokens, and the logits after them are read from the model's raw output when a chunk ends in the pad token
(``get_logits`` would pick the wrong row). ONNX Runtime GenAI cannot copy a KV cache, so ``fork`` and
``restore`` hand out a sequence whose tokens are computed again at its next evaluation. The tokenizer and
chat template are the folder's own, read with the tokenizers library. A ``phi3v`` folder (Phi-3/3.5-vision)
also takes images (``onnx_images``); other multimodal folders are refused by name.

Batching. A Generator of ``batch_size`` B takes its rows' tokens in one ``append_tokens`` only (right-padded
to the longest), and from then on exactly one token for every row a step; no row rewinds, leaves or
joins alone (0.18 raises "AppendTokens can only be called once for batch_size > 1" and "RewindToLength
must be called with new_length=0 when batch_size > 1"). Its next tokens are its own choice, so slm hands
it logits that leave one choice (``set_logits`` a one-hot row) before ``generate_next_token``, and reads
every row's logits with ``get_logits``: each row's logits are those of its sequence alone, up to float
rounding (measured on SmolLM2's float32 build: at most 3e-5). So the engine keeps each sequence in one of
three places:

- a *group*: a row of a batched Generator, read with the other sequences whose tokens were read in the
  same call (new prompts, or forks and restores about to decode), and stepped with them a token at a time;
- its own Generator (batch 1), which takes any run of tokens and rewinds: a sequence read alone, or one
  whose tokens were read before and that evaluates several at once (the next chunk of a prompt, a draft);
- nowhere yet: its tokens are computed again at its next evaluation (a fork, a restore, a sequence that
  left its group).

A sequence leaves its group when a step does not give it exactly one token (a draft, a rewind) or leaves
it out; a freed sequence's row is fed a filler token until the group is dropped (when none is left), or
taken apart once what its idle rows cost has reached what reading the others again would
("ski rental"). Rows never exceed ``max_sequences``, idle ones included.
"""

from __future__ import annotations

import json
import time
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
    check_adapter,
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
PADDING = 0.5, 32
"""Sequences read together each compute the longest one's length: a group takes a sequence while the
padding stays within this share of its tokens plus this many positions a row (short prompts cost little
more than a call)."""
READ_POSITIONS = 4096
"""Most positions (rows x the longest) in one batched read: the model returns logits for every one of
them (SmolLM2: 196 kB a position, 800 MB for all)."""


def _default_context(model: dict[str, Any]) -> int:
    return IMAGE_CONTEXT if model.get("type") in IMAGE_TYPES else GENERATOR_CONTEXT


@dataclass(eq=False)
class _Sequence:
    generator: Any = None
    """Its own Generator (batch 1), or None."""
    tokens: list[int] = field(default_factory=list)
    """Every token it holds, to compute again (``fork``, ``restore``, leaving a group)."""
    group: _Group | None = None
    """The batched Generator it is a row of, or None. Neither this nor ``generator``: it is computed at its
    next evaluation."""
    row: int = 0

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(eq=False)
class _Group:
    """Sequences read in one batched Generator and stepped a token each at a time."""

    generator: Any
    rows: list[_Sequence | None]
    """Its sequences by row; None for one that left (its row is fed a filler token)."""
    steps: int
    """Positions the Generator holds: the longest row's tokens when read, and one a step."""
    forced: np.ndarray
    """(B, V) zeros: the logits a step hands it, with a one at each row's token while it runs."""
    idle_cost: float = 0.0
    """Seconds its idle rows took since it was read."""

    def live(self) -> list[_Sequence]:
        return [s for s in self.rows if s is not None]


def packs(lengths: Sequence[int], limit: int) -> list[list[int]]:
    """Indices of sequences of ``lengths`` tokens in the groups they are read in, longest first: a group
    takes the next one while it holds at most ``limit`` rows, its padding stays within ``PADDING`` and its
    positions (rows x its longest) within ``READ_POSITIONS``. A group of one is read alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out:
            group = out[-1]
            positions = (len(group) + 1) * lengths[group[0]]
            tokens = sum(lengths[j] for j in group) + lengths[i]
            padding = positions - tokens
            share, per_row = PADDING
            if len(group) < limit and padding <= share * tokens + per_row * (len(group) + 1) \
                    and positions <= READ_POSITIONS:
                group.append(i)
                continue
        out.append([i])
    return out


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
        self._params: dict[int, Any] = {}  # batch size -> GeneratorParams
        self.threads = threads or 0
        self.max_sequences = max_sequences
        self._sequences: Sequences[_Sequence] = Sequences(max_sequences)
        self._groups: list[_Group] = []
        self._alone = 0  # sequences with a Generator of their own
        self._token_bytes = self.token_table()
        self._pad = settings.get("pad_token_id")
        eos = settings.get("eos_token_id")
        # A row fed one of these pads itself from then on (ONNX Runtime GenAI's search): it leaves its group.
        self._ends = {*(eos if isinstance(eos, list) else [eos]), self._pad} - {None}
        self._filler = min(set(range(len(self._ends) + 1)) - self._ends)
        self._read_seconds = self._read_positions = 0.0  # all reads so far: what reading a position costs
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

    def _generator(self, rows: int) -> Any:
        """A new Generator of ``rows`` rows, each with room for the context; its search picks the top logit,
        which is all that ``set_logits`` leaves it."""
        params = self._params.get(rows)
        if params is None:
            params = self._params[rows] = og.GeneratorParams(self._model)
            params.set_search_options(max_length=self.info.context_length, batch_size=rows, do_sample=False,
                                      min_length=0, repetition_penalty=1.0, no_repeat_ngram_size=0)
        return og.Generator(self._model, params)

    # --- sequences -------------------------------------------------------------------------

    def new_sequence(self, adapter: str | None = None) -> int:
        check_adapter(adapter, ())  # this engine loads no adapters
        return self._sequences.open(_Sequence)

    def sequence_length(self, seq: int) -> int:
        return self._sequences[seq].length

    def rewind(self, seq: int, length: int) -> None:
        s = self._sequences.check_rewind(seq, length)
        if length < s.length:
            # Reading logits right after a rewind would re-run a dropped token: the callers of this
            # protocol always append before they read.
            if s.group is not None:
                self._leave(s)
            elif s.generator is not None and self._images is None:
                s.generator.rewind_to(length)
            else:  # ONNX Runtime GenAI cannot rewind a phi3v Generator: the next append runs a new one
                self._own(s, None)
            del s.tokens[length:]

    fork_recomputes = True
    """A fork computes the sequence again (ONNX Runtime GenAI cannot copy a KV cache): sharing a running
    sequence's prefix by forking it saves nothing here."""

    def fork(self, seq: int) -> int:
        return self._unread(self._sequences[seq].tokens)

    def save(self, seq: int) -> SavedSequence:
        tokens = list(self._sequences[seq].tokens)
        return SavedSequence(len(tokens), 8 * len(tokens), tokens)

    def restore(self, saved: SavedSequence) -> int:
        assert isinstance(saved.data, list)
        return self._unread(saved.data)

    def _unread(self, tokens: list[int]) -> int:
        """A new sequence holding ``tokens``, computed at its next evaluation (with the others read then)."""
        seq = self.new_sequence()
        self._sequences[seq].tokens = list(tokens)
        return seq

    def free(self, seq: int) -> None:
        s = self._sequences.release(seq)
        if s is not None and s.group is not None:
            self._leave(s)
        elif s is not None:
            self._own(s, None)

    def _own(self, s: _Sequence, generator: Any) -> None:
        """Give ``s`` a Generator of its own (None: none), counted in ``_rows``."""
        self._alone += (generator is not None) - (s.generator is not None)
        s.generator = generator

    def _leave(self, s: _Sequence) -> None:
        """Take ``s`` out of its group (its tokens are computed again at its next evaluation); a group left
        with no sequence is dropped."""
        group = s.group
        assert group is not None
        group.rows[s.row] = None
        s.group = None
        if not group.live():
            self._groups.remove(group)

    def _rows(self) -> int:
        """Rows of KV cache allocated: one per sequence with a Generator of its own, and every row of every
        group, idle ones included."""
        return self._alone + sum(len(g.rows) for g in self._groups)

    # --- the forward pass ------------------------------------------------------------------

    def evaluate(self, work: Sequence[tuple[int, Sequence[int]]], keep: Sequence[int] | None = None) -> np.ndarray:
        states = self._sequences.check_evaluate(work, self.info.context_length, keep)
        counts = list(keep) if keep is not None else [1] * len(work)
        news = [list(tokens) for _, tokens in work]
        out = np.empty((sum(counts), self.info.vocab_size), dtype=np.float32)  # (sum(keep), V)
        firsts = np.cumsum([0, *counts[:-1]]).tolist()
        steps = self._plan_steps(states, news)
        unread = [i for i, s in enumerate(states) if s.group is None and s.generator is None]
        self._make_room(len(unread), steps, unread)
        for pack in self._packs(states, news, unread):
            if len(pack) == 1:
                i = pack[0]
                out[firsts[i] : firsts[i] + counts[i]] = self._first_run(states[i], news[i], counts[i])
                continue
            read = self._read_together([states[i] for i in pack], [news[i] for i in pack], [counts[i] for i in pack])
            for i, logits in zip(pack, read, strict=True):
                out[firsts[i] : firsts[i] + counts[i]] = logits
        stepping = {i for members in steps.values() for i in members}
        for i, s in enumerate(states):
            if s.generator is not None and i not in stepping and i not in unread:
                out[firsts[i] : firsts[i] + counts[i]] = self._append(s, news[i], counts[i])
        for group, members in steps.items():
            stepped = self._step(group, [states[i] for i in members], [news[i][0] for i in members])
            out[[firsts[i] for i in members]] = stepped
        return out

    def _plan_steps(self, states: list[_Sequence], news: list[list[int]]) -> dict[_Group, list[int]]:
        """The groups that step, with the indices of their sequences in the work; a sequence that cannot
        step with its group (several tokens, an end token, left out, a group at its length) leaves it."""
        steps: dict[_Group, list[int]] = {}
        for i, (s, tokens) in enumerate(zip(states, news, strict=True)):
            if s.group is None:
                continue
            if len(tokens) == 1 and tokens[0] not in self._ends and s.group.steps < self.info.context_length:
                steps.setdefault(s.group, []).append(i)
            else:
                self._leave(s)
        for group, rows in list(steps.items()):
            present = {id(states[i]) for i in rows}
            for s in group.live():
                if id(s) not in present:
                    self._leave(s)
        return steps

    def _make_room(self, reading: int, steps: dict[_Group, list[int]], unread: list[int]) -> None:
        """Take apart the groups with the most idle rows until the sequences read now fit in
        ``max_sequences`` rows (their sequences are then read now too)."""
        while self._rows() + reading > self.max_sequences:
            # Without idle rows, the rows are those of open sequences: never more than max_sequences.
            group = max(self._groups, key=lambda g: len(g.rows) - len(g.live()), default=None)
            assert group is not None and len(group.live()) < len(group.rows)
            moved = steps.pop(group, [])
            for s in group.live():
                self._leave(s)
            unread.extend(moved)
            reading += len(moved)

    def _packs(self, states: list[_Sequence], news: list[list[int]], unread: list[int]) -> list[list[int]]:
        """The sequences to read, in the groups they are read in (see ``packs``). Read alone: one that holds
        tokens and evaluates several (its next ones are likely several again: a prompt's chunks, drafts), one
        whose last token is the pad token (a batched read takes it for padding), and any with images."""
        together, alone = [], []
        for i in unread:
            whole = states[i].tokens + news[i]
            if self._images is None and whole[-1] != self._pad and (len(news[i]) == 1 or not states[i].tokens):
                together.append(i)
            else:
                alone.append(i)
        lengths = [states[i].length + len(news[i]) for i in together]
        return [[together[j] for j in pack] for pack in packs(lengths, self.max_sequences)] + [[i] for i in alone]

    def _read_together(self, states: list[_Sequence], news: list[list[int]], counts: list[int]) -> list[np.ndarray]:
        """Read the sequences' tokens and new tokens as the rows of a new group: each one's logits after its
        last ``counts`` new tokens, (count, V)."""
        wholes = [s.tokens + tokens for s, tokens in zip(states, news, strict=True)]
        width = max(len(w) for w in wholes)
        ids = np.full((len(wholes), width), self._pad, dtype=np.int32)  # (B, T), padded on the right
        for row, whole in enumerate(wholes):
            ids[row, : len(whole)] = whole
        start = time.perf_counter()
        try:
            generator = self._generator(len(wholes))
            generator.append_tokens(ids.reshape(-1))
            # (B, 1, V): each row's last token that is not padding; or (B, T, V)
            logits = generator.get_logits() if max(counts) == 1 else generator.get_output("logits")
        except Exception as e:
            raise EngineError(f"ONNX Runtime GenAI failed: {e}") from None
        self._read_seconds += time.perf_counter() - start
        self._read_positions += ids.size
        group = _Group(generator, list(states), width, np.zeros((len(states), self.info.vocab_size), np.float32))
        self._groups.append(group)
        rows = []
        for row, (s, tokens, count) in enumerate(zip(states, news, counts, strict=True)):
            s.group, s.row = group, row
            s.tokens.extend(tokens)
            end = len(wholes[row]) if logits.shape[1] > 1 else 1
            rows.append(np.asarray(logits[row, end - count : end], dtype=np.float32))
        return rows

    def _step(self, group: _Group, states: list[_Sequence], tokens: list[int]) -> np.ndarray:
        """One token for each of ``states`` (rows of ``group``) and the filler for its idle rows: the logits
        after each, (len(states), V). A group whose idle rows have cost what reading the others again would
        is taken apart after the step."""
        chosen = np.full(len(group.rows), self._filler, dtype=np.int32)
        chosen[[s.row for s in states]] = tokens
        everyone = np.arange(len(chosen))
        group.forced[everyone, chosen] = 1.0
        start = time.perf_counter()
        try:
            group.generator.set_logits(group.forced)
            group.generator.generate_next_token()
            if not np.array_equal(group.generator.get_next_tokens(), chosen):
                raise EngineError("the batched Generator took other tokens than the ones it was given")
            logits = group.generator.get_logits()  # (B, 1, V)
        except Exception as e:
            for s in group.live():  # its state is unknown: each is read again at its next evaluation
                self._leave(s)
            raise EngineError(f"ONNX Runtime GenAI failed: {e}") from None
        finally:
            group.forced[everyone, chosen] = 0.0
        group.steps += 1
        for s, token in zip(states, tokens, strict=True):
            s.tokens.append(token)
        idle = len(group.rows) - len(states)
        group.idle_cost += (time.perf_counter() - start) * idle / len(group.rows)
        rows = np.asarray(logits[[s.row for s in states], 0], dtype=np.float32)
        reread = self._read_seconds / max(self._read_positions, 1) * sum(s.length for s in states)
        if idle and group.idle_cost > reread:
            for s in states:
                self._leave(s)
        return rows

    def _append(self, s: _Sequence, tokens: list[int], keep: int = 1) -> np.ndarray:
        """The logits after the last ``keep`` of ``tokens``, appended to ``s``'s own Generator: (keep, V)."""
        if self._images is not None and any(t < 0 for t in tokens):
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
        """Run the sequence's tokens and ``tokens`` as the first run of a new Generator of its own: how a
        sequence is read alone, the only run in which ONNX Runtime GenAI reads images (see ``onnx_images``),
        and how a phi3v sequence is rewound."""
        whole = s.tokens + tokens
        inputs = self._images.inputs(whole) if self._images is not None and min(whole) < 0 else None
        start = time.perf_counter()
        try:
            generator = self._generator(1)
            if inputs is None:
                generator.append_tokens(np.asarray(whole, dtype=np.int32))
            else:
                generator.set_inputs(inputs)
            logits = generator.get_output("logits")  # (1, len(whole), V)
        except Exception as e:
            raise EngineError(f"ONNX Runtime GenAI failed: {e}") from None
        self._read_seconds += time.perf_counter() - start
        self._read_positions += len(whole)
        self._own(s, generator)
        s.tokens.extend(tokens)
        return np.asarray(logits[0, -keep:], dtype=np.float32)

    def close(self) -> None:
        self._sequences.release_all()
        self._groups.clear()
        self._alone = 0
        self._images = None
        self._model = None
