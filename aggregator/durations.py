"""Durations as text, both ways: "10s" -> 10000 ms for the settings, 60000 -> "1m" for labels.

One place, so that a window given as ``--windows 1m`` shows as ``window="1m"``.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["format_duration", "parse_duration_ms"]

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str | int | float) -> int:
    """ "10s" -> 10000; "1.5m" -> 90000; a bare number is seconds.

    >>> parse_duration_ms("5m")
    300000
    """
    if isinstance(text, int | float):
        return int(float(text) * 1000)
    match = _DURATION.match(text)
    if not match:
        try:
            return int(float(text) * 1000)
        except ValueError:
            raise ValueError(f"{text!r} is not a duration like 500ms, 10s, 5m, 1h") from None
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


def format_duration(ms: int) -> str:
    """Prometheus-style label for a duration: 60000 -> "1m", 3600000 -> "1h".

    >>> format_duration(90_000)
    '90s'
    """
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
