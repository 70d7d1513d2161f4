"""The order in which a store at its cap evicts: oldest time first, ties by key.

Finding the k oldest of n entries costs a pass over the whole time column, too much
for every insert of a store that sits at its cap. So one pass lists about the oldest
eighth (at least k), sorted by (time, key), and later evictions pop from the list.
Invariant: every stored entry missing from the list has a time above ``limit``; the
store calls ``noticed`` with the oldest time it inserts, which drops the list when that
entry could belong in it. Listed entries taken meanwhile, or taken and stored again
with another time, are the caller's to skip (their key is gone or their time differs).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["OldestFirst"]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


class OldestFirst:
    """Keys and times of the oldest entries, sorted, popped a batch at a time."""

    def __init__(self) -> None:
        self.keys: U64 | None = None
        self.times = np.empty(0, np.int64)
        self.pos = 0
        self.limit = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.times.nbytes

    def noticed(self, oldest_ms: int) -> None:
        """An entry this old was inserted: drop the list if it could belong in it."""
        if self.keys is not None and oldest_ms <= self.limit:
            self.keys = None

    def next(self, k: int, keys: U64, times: I64) -> tuple[U64, I64]:
        """The next (up to) ``k`` listed keys and times; ``keys``/``times``: all live
        entries, to list from when the list is used up or dropped."""
        if self.keys is None or self.pos >= self.keys.size:
            self._build(k, keys, times)
        assert self.keys is not None
        a, self.pos = self.pos, self.pos + k
        return self.keys[a : self.pos], self.times[a : self.pos]

    def _build(self, k: int, keys: U64, t: I64) -> None:
        n = t.size
        size = min(n, max(k, n >> 3, 1024))
        sel = np.arange(n)
        if size < n:
            # Any threshold keeps the list exact (all entries at or below it join, ties
            # too); a sample's quantile finds one about ``size`` deep without a full
            # partition, and a threshold that would yield fewer than k falls back to one.
            sample = t[:: max(1, n // 8192)]
            q = size * sample.size // n
            sel = np.flatnonzero(t <= np.partition(sample, q)[q])
            if sel.size < k:
                sel = np.flatnonzero(t <= np.partition(t, k - 1)[k - 1])
        ks, ts = keys[sel], t[sel]
        order = np.lexsort((ks, ts))
        self.keys, self.times = ks[order], ts[order]
        self.pos = 0
        self.limit = int(ts.max()) if n else 0
