"""A GGUF file's leading metadata, read in Python without loading the model (the store sits below the engines).

GGUF (v2, v3): ``GGUF``, version (u32), tensor count (u64), key count (u64), then each key: its name (u64
length, UTF-8), its type (u32), its value. Writers put the model's hyperparameters before its vocabulary, so
reading stops at the first ``tokenizer.`` key and never walks the token lists.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

Value = int | float | bool | str | None
"""A scalar or string value; an array's value is None (not read)."""


def leading_metadata(path: Path, stop_prefix: str = "tokenizer.") -> dict[str, Value]:
    """The keys before the first one starting with ``stop_prefix`` and their values; {} for a file that is not
    GGUF or is cut short."""
    found: dict[str, Value] = {}
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF" or _read(f, "<I") not in (2, 3):
                return {}
            _read(f, "<Q")
            for _ in range(int(_read(f, "<Q"))):
                key = _string(f)
                if key.startswith(stop_prefix):
                    break
                found[key] = _value(f, int(_read(f, "<I")))
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return found
    return found


def _read(f: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its metadata")
    value: int | float | bool = struct.unpack(fmt, data)[0]
    return value


def _string(f: BinaryIO) -> str:
    length = int(_read(f, "<Q"))
    data = f.read(length)
    if len(data) != length:
        raise ValueError("the file ends inside its metadata")
    return data.decode("utf-8")


def _value(f: BinaryIO, kind: int) -> Value:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, count = int(_read(f, "<I")), int(_read(f, "<Q"))
    if item in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
    else:
        for _ in range(count):
            _value(f, item)
    return None
