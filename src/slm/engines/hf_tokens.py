"""The raw bytes of a Hugging Face tokenizer's tokens, for the streaming detokenizer.

A tokenizer decodes whole texts; the detokenizer needs each token's bytes (a token may be part of a
UTF-8 character). Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) writes bytes as printable characters
(``Ġ`` for a space); SentencePiece-style vocabularies (Gemma, Phi-3) write ``▁`` for a space and
``<0xNN>`` for raw bytes. Control tokens render as nothing, as llama.cpp renders them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from slm.engines.base import SpecialTokens

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, reversed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


class TokenBytes:
    """``token id -> bytes`` for one tokenizer, computed on first use."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._byte_level = is_byte_level(tokenizer)
        self._control = set(tokenizer.all_special_ids)
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                self._control.add(int(token_id))
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._cache.get(token)
        if piece is None:
            piece = self._cache[token] = self._bytes(token)
        return piece

    def _bytes(self, token: int) -> bytes:
        if token in self._control:
            return b""
        text = self._tokenizer.convert_ids_to_tokens(token)
        if text is None:
            return b""
        if self._byte_level:
            table = _byte_level_decoder()
            if all(c in table for c in text):
                return bytes(table[c] for c in text)
            return text.encode("utf-8")  # an added (non-byte-level) token
        byte = _BYTE_TOKEN.fullmatch(text)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return text.replace("▁", " ").encode("utf-8")


def special_tokens(tokenizer: Any, *eos: int | list[int] | None) -> SpecialTokens:
    """The tokenizer's BOS and EOS, and every end-of-generation id: its EOS and those in ``eos`` (the
    model's generation settings may name more than one)."""
    ends: set[int] = set()
    for source in (*eos, tokenizer.eos_token_id):
        ends.update(source if isinstance(source, Iterable) else [] if source is None else [source])
    bos = tokenizer.bos_token_id
    return SpecialTokens(
        bos_id=bos,
        eos_id=tokenizer.eos_token_id,
        end_of_generation=frozenset(ends),
        bos_text=tokenizer.bos_token or "",
        eos_text=tokenizer.eos_token or "",
        add_bos=bos is not None and tokenizer.encode("a")[:1] == [bos],
    )


class HFText:
    """Text <-> ids for an engine that reads a Hugging Face tokenizer (``self.tokenizer``)."""

    tokenizer: Any
    _token_bytes: TokenBytes

    def token_table(self) -> TokenBytes:
        return TokenBytes(self.tokenizer)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special,
                                               split_special_tokens=not parse_special)
        return ids

    def token_bytes(self, token: int) -> bytes:
        return self._token_bytes(token)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        if special:
            text: str = self.tokenizer.decode(list(tokens), skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)
            return text
        return b"".join(self._token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
