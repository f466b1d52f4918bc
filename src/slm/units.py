"""Durations and sizes as people write them: ``5m``, ``1h30m``, ``-1``; ``4GiB``, ``512MB``."""

from __future__ import annotations

import math
import re

from slm.errors import InvalidParameter

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?|b)?", re.IGNORECASE)


def parse_duration(value: float | int | str, field: str) -> float:
    """Seconds, from a number of seconds or a Go-style duration (``30s``, ``5m``, ``1h30m``).
    A negative value means forever and comes back as ``math.inf``."""
    if isinstance(value, bool):
        raise InvalidParameter(field, f"expected seconds or a duration like '5m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise InvalidParameter(field, f"expected seconds or a duration like '5m', got {value!r}") from None
            seconds = sign * sum(float(n) * _SECONDS[u] for n, u in parts)
    if math.isnan(seconds):
        raise InvalidParameter(field, "is not a number")
    return math.inf if seconds < 0 else seconds


def parse_size(value: str, field: str) -> int:
    """Bytes, from ``4GiB``, ``4G``, ``512MB`` or a plain number of bytes (powers of 1024 throughout)."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise InvalidParameter(field, f"expected a size like '4GiB' or '512MB', got {value!r}")
    number, unit = match.groups()
    power = " kmgt".index(unit.lower()) if unit else 0
    return int(float(number) * 1024**power)


def format_size(size: int) -> str:
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size >= 1024**power:
            return f"{size / 1024**power:.1f} {unit}"
    return f"{size} B"
