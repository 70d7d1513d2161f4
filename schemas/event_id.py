"""The 64-bit hash of an ``event_id``: how predictions and labels find each other.

Part of the wire contract of the label join: the aggregator keeps this hash of every
prediction's id (``RowChunk.event_hash``) and hashes a label's ``event_id`` the same
way, so every side must use exactly this definition (``schemas/README.md`` gives it
in full). It is not Python's ``hash()``, which is salted per process.

The hash is over the id's UTF-8 bytes, read as little-endian 8-byte words, the last
one zero-padded::

    h = SEED ^ (length * LENGTH_MULT)            # mod 2**64
    for each word w:  h = (h ^ w) * WORD_MULT;  h ^= h >> 29
    h = fmix64(h)                                # MurmurHash3's final avalanche
    0 is "no id": the empty id hashes to 0, a non-empty id whose h is 0 gets 1

Every step is a bijection of ``h`` for a fixed word, so two ids of one length that
differ in a single word never collide; other pairs collide with probability ~2**-64.

>>> hash_event_id("")
0
>>> hash_event_id("a") == int(event_hashes(b"a", np.array([0]), np.array([1]))[0])
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

__all__ = [
    "LENGTH_MULT",
    "NO_ID",
    "SEED",
    "WORD_MULT",
    "event_hashes",
    "hash_event_id",
    "hash_event_ids",
]

NO_ID: Final = 0  # the hash of an empty id; no real id hashes to it
SEED: Final = 0x6D6F64656C70756C  # b"modelpul" as a little-endian word
LENGTH_MULT: Final = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd
WORD_MULT: Final = 0xBF58476D1CE4E5B9  # splitmix64's first multiplier
_FMIX1: Final = 0xFF51AFD7ED558CCD
_FMIX2: Final = 0xC4CEB9FE1A85EC53
_MASK: Final = (1 << 64) - 1

_U64: Final = np.dtype("<u8")
_SHIFT29: Final = np.uint64(29)
_SHIFT33: Final = np.uint64(33)
_BYTE_MASKS: Final = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [_MASK], np.uint64)


def hash_event_id(event_id: str) -> int:
    """The hash of one id (the scalar definition; ``event_hashes`` equals it)."""
    data = event_id.encode()
    n = len(data)
    if not n:
        return NO_ID
    h = SEED ^ ((n * LENGTH_MULT) & _MASK)
    padded = data + bytes(-n % 8)
    for j in range(0, n, 8):
        h = ((h ^ int.from_bytes(padded[j : j + 8], "little")) * WORD_MULT) & _MASK
        h ^= h >> 29
    h ^= h >> 33
    h = (h * _FMIX1) & _MASK
    h ^= h >> 33
    h = (h * _FMIX2) & _MASK
    h ^= h >> 33
    return h or 1


def event_hashes(
    data: bytes | bytearray | memoryview | np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Hashes (uint64) of the ids ``data[starts[i] : starts[i] + lengths[i]]`` (UTF-8 bytes).

    Reads only inside ``data`` (a word that would run past an id's end is read ending
    at it and shifted), so the buffer needs no padding.
    """
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    k = starts.shape[0]
    if lengths.shape != (k,):
        raise ValueError(f"{k} starts but {lengths.shape[0]} lengths")
    if not k:
        return np.empty(0, dtype=np.uint64)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"data must be a 1-d uint8 array, got {data.dtype} x {data.shape}")
        u8 = np.ascontiguousarray(data)
    else:
        u8 = np.frombuffer(data, dtype=np.uint8)
    shortest, longest = int(lengths.min()), int(lengths.max())
    if shortest < 0 or int(starts.min()) < 0 or int((starts + lengths).max()) > u8.size:
        raise ValueError("an id span lies outside the buffer")
    if not longest:
        return np.zeros(k, dtype=np.uint64)
    if u8.size < 8:  # too short for one word: a padded copy of a few bytes
        u8 = np.concatenate([u8, np.zeros(8, dtype=np.uint8)])
    if shortest == longest:
        h = np.full(k, SEED ^ ((longest * LENGTH_MULT) & _MASK), dtype=np.uint64)
    else:
        h = (lengths.astype(np.uint64) * np.uint64(LENGTH_MULT)) ^ np.uint64(SEED)
    tmp = np.empty(k, dtype=np.uint64)
    words = np.ndarray((u8.size - 7,), dtype=_U64, buffer=u8, strides=(1,))
    if shortest == longest >= 8:
        # One length (UUIDs): no masks, no subsets; a partial last word is the 8 bytes
        # ending the id, shifted down.
        step = int(starts[1] - starts[0]) if k > 1 else 0
        # At a fixed stride (a PredictionBatch's ids) strided views beat gathers 3x.
        regular = step >= 0 and (k == 1 or bool((np.diff(starts) == step).all()))
        first = int(starts[0])
        for j in range((longest + 7) // 8):
            lo = min(8 * j, longest - 8)
            if regular:
                w = np.ndarray((k,), dtype=_U64, buffer=u8, offset=first + lo, strides=(step,))
            else:
                w = words[starts + lo]
            if lo < 8 * j:
                w = w >> np.uint64(8 * (8 * j - lo))
            _round(h, w, tmp)
    else:
        for j in range((longest + 7) // 8):
            lo = 8 * j
            act = np.flatnonzero(lengths > lo) if lo >= shortest else None  # ids not ended
            s, n = (starts, lengths) if act is None else (starts[act], lengths[act])
            if lo + 8 <= shortest:
                w = words[s + lo]
            else:
                # A partial word is read ending at its id's end (or at the buffer's
                # start) and shifted down: no read past the id, whatever follows it.
                back = np.minimum(n - 8, lo)  # lo, or less for a partial word
                q = s + back
                if int(q.min()) < 0:  # an id of < 8 bytes at the buffer's start
                    q = np.maximum(q, 0)
                    w = (words[q] >> ((s + lo - q) * 8).astype(np.uint64)) & _BYTE_MASKS[
                        np.minimum(n - lo, 8)
                    ]
                else:
                    w = words[q] >> ((lo - back) * 8).astype(np.uint64)
            if act is None:
                _round(h, w, tmp)
            else:
                sub = h[act]
                _round(sub, w, tmp[: act.shape[0]])
                h[act] = sub
    np.right_shift(h, _SHIFT33, out=tmp)
    h ^= tmp
    h *= np.uint64(_FMIX1)
    np.right_shift(h, _SHIFT33, out=tmp)
    h ^= tmp
    h *= np.uint64(_FMIX2)
    np.right_shift(h, _SHIFT33, out=tmp)
    h ^= tmp
    h[h == 0] = 1
    if not shortest:
        h[lengths == 0] = NO_ID
    return h


def _round(h: np.ndarray, w: np.ndarray, tmp: np.ndarray) -> None:
    """One word into every hash, in place: h = (h ^ w) * WORD_MULT; h ^= h >> 29."""
    h ^= w
    h *= np.uint64(WORD_MULT)
    np.right_shift(h, _SHIFT29, out=tmp)
    h ^= tmp


def hash_event_ids(ids: Sequence[str]) -> np.ndarray:
    """Hashes (uint64) of a list of ids, in one vectorised pass."""
    k = len(ids)
    if not k:
        return np.empty(0, dtype=np.uint64)
    data = "".join(ids).encode()
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=k)
    if len(data) != int(lengths.sum()):  # some id is not ASCII: lengths in bytes
        lengths = np.fromiter((len(i.encode()) for i in ids), dtype=np.int64, count=k)
    ends = np.cumsum(lengths)
    return event_hashes(data, ends - lengths, lengths)
