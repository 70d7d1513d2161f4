"""Linear probing over a power-of-two table of int32 row indices, batch at a time.

The table maps a key to a row of a dense ``keys`` array whose last two elements are 0:
``EMPTY`` (-1) and ``TOMB`` (-2) then index a zero, so comparing ``keys[slot value]``
with a (nonzero) key needs no separate mask for free slots. Every function loops over
probe rounds only; the keys still probing shrink each round.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["EMPTY", "TOMB", "find", "home", "place"]

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
U64 = npt.NDArray[np.uint64]

EMPTY: Final = -1  # slot never used: ends a probe
TOMB: Final = -2  # slot of a removed row: a probe goes on past it
_C1: Final = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 fmix64: ids hashed upstream may
_C2: Final = np.uint64(0xC4CEB9FE1A85EC53)  # still share low bits, so mix all 64 first
_S: Final = np.uint64(33)
# Keys probed at a time: the temporaries of a step stay in cache (a rehash of 10M keys
# in one step takes 2.7x the CPU of 64k-key steps).
STEP: Final = 65_536


def home(keys: U64, slots: int) -> I64:
    """First probe slot of each key in a table of ``slots`` (a power of two)."""
    x = keys >> _S
    x ^= keys
    x *= _C1
    x ^= x >> _S
    x *= _C2
    x ^= x >> _S
    return (x >> np.uint64(65 - slots.bit_length())).astype(np.int64)


def find(table: I32, dense: U64, keys: U64) -> tuple[I64, I64]:
    """Slot and row of each key; -1 and -1 when absent (and for key 0)."""
    slot = np.full(keys.size, -1, np.int64)
    row = np.full(keys.size, -1, np.int64)
    for a in range(0, keys.size, STEP):
        _find(table, dense, keys[a : a + STEP], slot[a : a + STEP], row[a : a + STEP])
    return slot, row


def _find(table: I32, dense: U64, keys: U64, slot: I64, row: I64) -> None:
    act = np.flatnonzero(keys)
    k = keys[act]
    pos = home(k, table.size)
    mask = table.size - 1
    while act.size:
        v = table[pos]
        hit = dense[v] == k
        if hit.any():
            a = act[hit]
            slot[a] = pos[hit]
            row[a] = v[hit]
        go = ~hit & (v != EMPTY)
        act, k, pos = act[go], k[go], (pos[go] + 1) & mask


def place(table: I32, keys: U64, first_row: int) -> int:
    """Point free slots at rows ``first_row``, ``first_row + 1``... of ``keys`` (distinct,
    absent); returns the tombstones reused."""
    return sum(_place(table, keys[a : a + STEP], first_row + a) for a in range(0, keys.size, STEP))


def _place(table: I32, keys: U64, first_row: int) -> int:
    mask = table.size - 1
    pos = home(keys, table.size)
    act = np.arange(keys.size, dtype=np.int32)
    reused = 0
    while act.size:
        v = table[pos]
        free = np.flatnonzero(v < 0)
        fp, fw = pos[free], act[free] + np.int32(first_row)
        table[fp] = fw  # contenders for one slot: one write lands, the rest probe on
        won = table[fp] == fw
        reused += int(np.count_nonzero(v[free[won]] == TOMB))
        left = np.ones(act.size, np.bool_)
        left[free[won]] = False
        act, pos = act[left], (pos[left] + 1) & mask
    return reused
