"""Strings of a bulk pass: interned densely, decoding only their distinct values."""

from __future__ import annotations

from typing import Final

import numpy as np

from aggregator.bulk.reader import HI, Buf

__all__ = ["BIG", "Strings", "first_seen", "non_ascii"]

_MAX_STR: Final = 64  # longer strings are interned with Python bytes, not word views
_BYTE_MASKS: Final = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], np.uint64)
_MIX: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX2: Final = np.uint64(0xBF58476D1CE4E5B9)
BIG: Final = np.iinfo(np.int64).max


class Strings:
    """Every distinct string of one call, numbered densely in order of first decoding."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ids: dict[str, int] = {}
        self.names: list[str] = []

    def add(self, raw: bytes) -> int:
        """The id of ``raw`` decoded as UTF-8, or -1 when it is not valid UTF-8."""
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return -1
        found = self.ids.get(text)
        if found is None:
            found = self.ids[text] = len(self.names)
            self.names.append(text)
        return found

    def intern(self, buf: Buf, start: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Ids of the strings at (start, n); -1 for invalid UTF-8. Decodes distinct values only."""
        k = start.shape[0]
        if not k:
            return np.empty(0, dtype=np.int64)
        longest = int(n.max())
        if longest > _MAX_STR:
            return self._intern_bytes(start, n)
        if longest < 8:  # the bytes and the length fit one word: an exact key
            key = (buf.u64[start] & _BYTE_MASKS[n]) | (n.astype(np.uint64) << np.uint64(56))
            _uniq, inv = np.unique(key, return_inverse=True)
            rep = np.empty(_uniq.shape[0], dtype=np.int64)
            rep[inv] = np.arange(k)
            return self._decode(start, n, rep, inv)
        h = n.astype(np.uint64) * _MIX
        words = []
        for j in range((longest + 7) // 8):
            w = buf.u64[start + 8 * j] & _BYTE_MASKS[np.clip(n - 8 * j, 0, 8)]
            words.append(w)
            h = (h ^ w) * _MIX2
            h ^= h >> np.uint64(29)
        _uniq, inv = np.unique(h, return_inverse=True)
        rep = np.empty(_uniq.shape[0], dtype=np.int64)
        rep[inv] = np.arange(k)  # any member represents its hash
        back = rep[inv]
        if not (n[back] == n).all() or not all((w[back] == w).all() for w in words):
            return self._intern_bytes(start, n)  # a 64-bit hash collision: exact path
        return self._decode(start, n, rep, inv)

    def _decode(
        self, start: np.ndarray, n: np.ndarray, rep: np.ndarray, inv: np.ndarray
    ) -> np.ndarray:
        data = self.data
        spans = zip(start[rep].tolist(), n[rep].tolist(), strict=True)
        local = np.array([self.add(data[s : s + ln]) for s, ln in spans], dtype=np.int64)
        ids: np.ndarray = local[inv]
        return ids

    def _intern_bytes(self, start: np.ndarray, n: np.ndarray) -> np.ndarray:
        data = self.data
        seen: dict[bytes, int] = {}
        out = np.empty(start.shape[0], dtype=np.int64)
        for i, (s, ln) in enumerate(zip(start.tolist(), n.tolist(), strict=True)):
            raw = data[s : s + ln]
            found = seen.get(raw)
            if found is None:
                found = seen[raw] = self.add(raw)
            out[i] = found
        return out


def non_ascii(buf: Buf, start: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Which spans hold a byte >= 0x80 (one pass of np.maximum.reduceat over the buffer)."""
    if not start.shape[0]:
        return np.zeros(0, dtype=bool)
    longest = int(n.max())
    if longest <= _MAX_STR:
        high = np.zeros(start.shape[0], dtype=np.uint64)
        for j in range((longest + 7) // 8):
            high |= buf.u64[start + 8 * j] & _BYTE_MASKS[np.clip(n - 8 * j, 0, 8)]
        found_w: np.ndarray = (high & HI) != 0
        return found_w
    bounds = np.empty(2 * start.shape[0], dtype=np.int64)
    bounds[0::2] = start
    bounds[1::2] = start + n
    top = np.maximum.reduceat(buf.u8, bounds)[0::2]
    found: np.ndarray = (top >= 0x80) & (n > 0)
    return found


def first_seen(ids: np.ndarray, positions: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``ids`` numbered in order of their smallest position; ids in code order."""
    first = np.full(size, BIG, dtype=np.int64)
    np.minimum.at(first, ids, positions)
    present = np.flatnonzero(first < BIG)
    order = present[np.argsort(first[present], kind="stable")]
    rank = np.full(size, -1, dtype=np.int64)
    rank[order] = np.arange(order.shape[0])
    return rank[ids], order
