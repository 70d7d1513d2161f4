"""Predictions waiting for their label, and labels waiting for their prediction.

One ``PendingStore`` per partition and kind, keyed by the uint64 hash of the event id
(``schemas.event_id``; 0 is reserved for "no id" and never stored). Pure numpy: open
addressing with linear probing over a power-of-two table of int32 indices into dense
entry columns. Every operation takes a batch; Python loops only over probe rounds, never
over entries. Removal moves the last entries into the holes, so the live entries are
always the first ``len(store)`` rows of the columns, in an order that is a function of
the operations alone (what a snapshot saves, so a restored store behaves the same).

Entries leave by ``take`` (a label joined, once), ``expire`` (time to live in event
time: the caller passes watermark - ttl) or eviction when an insert passes the cap (the
oldest event times first, ties by key). Expired and evicted entries are returned,
for the caller to count: nothing leaves silently.

Example: a prediction store and a store of labels that came first::

    >>> import numpy as np
    >>> preds = PendingStore.predictions(cap=1_000_000)
    >>> labels = PendingStore.labels(cap=100_000)
    >>> ids = np.array([11, 12, 13], dtype=np.uint64)
    >>> preds.insert(ids, {"version": [0, 0, 1], "predicted": [1.0, 0.0, 2.5],
    ...     "score": [0.9, 0.2, np.nan], "event_time_ms": [1000, 1005, 1010],
    ...     "segment": [-1, 2, -1]}).duplicates
    array([False, False, False])
    >>> found, joined = preds.take(np.array([12, 99], dtype=np.uint64))  # two labels
    >>> found, joined["predicted"]
    (array([ True, False]), array([0.]))
    >>> _ = labels.insert(np.array([99], dtype=np.uint64),  # 99 waits for its prediction
    ...     {"label": [1.0], "label_time_ms": [2000]})
    >>> found, early = labels.take(np.array([99, 14], dtype=np.uint64))  # predictions come
    >>> found, early["label"]
    (array([ True, False]), array([1.]))
    >>> preds.expire(before_ms=1008)["key"]  # watermark - ttl
    array([11], dtype=uint64)
    >>> labels.expire(before_ms=3000)["key"]  # the labels' own wait: nothing left
    array([], dtype=uint64)
    >>> len(preds), len(labels)
    (1, 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from aggregator.join.chunks import DEFAULT_MAX_BYTES, SnapshotError, decode_chunks, encode_chunks
from aggregator.join.inputs import (
    Columns,
    Schema,
    as_keys,
    checked,
    distinct_keys,
    first_of_each,
    valid_schema,
)
from aggregator.join.oldest import OldestFirst
from aggregator.join.table import EMPTY, I64, TOMB, U64, find, place

__all__ = ["LABEL_COLUMNS", "PREDICTION_COLUMNS", "Columns", "InsertResult", "PendingStore"]


# What a joined label needs of its prediction, at the precision the metrics use:
# the class code (-1 for regression) or the predicted value share ``predicted``.
PREDICTION_COLUMNS: Final[Schema] = (
    ("version", "<i4"),  # model-version index of the partition's catalog
    ("predicted", "<f8"),  # class code (exact in float64) or regression value
    ("score", "<f8"),  # NaN = no score
    ("event_time_ms", "<i8"),
    ("segment", "<i2"),  # segment code, -1 = none
)
LABEL_COLUMNS: Final[Schema] = (("label", "<f8"), ("label_time_ms", "<i8"))

_MIN_SLOTS: Final = 1024
_MAX_LOAD: Final = 0.75  # live + tombstones, before a rehash
_REHASH_LOAD: Final = 0.5  # live entries after a rehash (doubling as needed)
_RESTORE_LOAD: Final = 0.625  # after a restore: the table the store had, not a bigger one
_NO_TIME: Final = np.iinfo(np.int64).max


class InsertResult(NamedTuple):
    """``duplicates``: per input key, True when not inserted (already stored, or a repeat
    within the batch: the first occurrence wins). ``evicted``: entries the cap pushed out,
    oldest first."""

    duplicates: npt.NDArray[np.bool_]
    evicted: Columns


class PendingStore:
    """Entries keyed by a nonzero uint64, with columns ``schema``, under a cap."""

    def __init__(self, schema: Schema, time_column: str, cap: int) -> None:
        self.schema: Final = valid_schema(schema, time_column)
        if cap < 1:
            raise ValueError(f"cap: must be >= 1, got {cap}")
        self.time_column: Final = time_column
        self._cap = int(cap)
        self._n = 0
        self._min_time = _NO_TIME  # lower bound of the stored times: expire's fast path
        self._tombs = 0
        self._table = np.full(_MIN_SLOTS, EMPTY, np.int32)
        # Two trailing zeros: a probe reads keys[slot value], and EMPTY/TOMB index them, so
        # a free slot never matches a (nonzero) key without a separate mask.
        self._keys = np.zeros(2, np.uint64)
        self._cols: Columns = {n: np.empty(0, d) for n, d in self.schema}
        self._oldest = OldestFirst()

    @classmethod
    def predictions(cls, cap: int) -> PendingStore:
        """A store of predictions waiting for a label (``PREDICTION_COLUMNS``)."""
        return cls(PREDICTION_COLUMNS, "event_time_ms", cap)

    @classmethod
    def labels(cls, cap: int) -> PendingStore:
        """A store of labels that arrived before their prediction (``LABEL_COLUMNS``)."""
        return cls(LABEL_COLUMNS, "label_time_ms", cap)

    def __len__(self) -> int:
        return self._n

    @property
    def cap(self) -> int:
        return self._cap

    @property
    def nbytes(self) -> int:
        """Bytes held by the table, the columns (with spare capacity) and caches."""
        cols = sum(c.nbytes for c in self._cols.values())
        return self._table.nbytes + self._keys.nbytes + cols + self._oldest.nbytes

    def set_cap(self, cap: int) -> Columns:
        """Change the cap; returns what a lower cap evicted (oldest first)."""
        if cap < 1:
            raise ValueError(f"cap: must be >= 1, got {cap}")
        self._cap = int(cap)
        return self._evict(self._n - cap) if self._n > cap else self._empty()

    def entries(self) -> Columns:
        """The live entries in storage order: read-only views, valid until the next change."""
        out: Columns = {"key": self._keys[: self._n]}
        out.update((n, c[: self._n]) for n, c in self._cols.items())
        for arr in out.values():
            arr.flags.writeable = False
        return out

    # -- operations --------------------------------------------------------------------

    def insert(self, keys: npt.ArrayLike, columns: Mapping[str, npt.ArrayLike]) -> InsertResult:
        """Store new entries; keys already stored (or repeated in the batch) are skipped."""
        ks = as_keys(keys)
        if ks.size and not ks.all():
            raise ValueError("keys: 0 is reserved for 'no id' and cannot be stored")
        cols = checked(self.schema, columns, ks.size)
        dup = np.ones(ks.size, np.bool_)
        first = first_of_each(ks)
        _, idx = self._find(ks[first])
        new = first[idx < 0]
        dup[new] = False
        if new.size:
            self._reserve(new.size)
            n0, n1 = self._n, self._n + new.size
            self._keys[n0:n1] = ks[new]
            for name, col in self._cols.items():
                col[n0:n1] = cols[name][new]
            self._place(ks[new], n0)
            self._n = n1
            oldest = int(cols[self.time_column][new].min())
            self._min_time = min(self._min_time, oldest)
            self._oldest.noticed(oldest)
        evicted = self._evict(self._n - self._cap) if self._n > self._cap else self._empty()
        return InsertResult(dup, evicted)

    def take(self, keys: npt.ArrayLike) -> tuple[npt.NDArray[np.bool_], Columns]:
        """Remove and return the entries of ``keys``: (found mask, their columns in key
        order). A key repeated in the batch is found once, at its first occurrence."""
        ks = as_keys(keys)
        slot, idx = self._find(ks)
        found = idx >= 0
        pos = np.flatnonzero(found)
        firsts = first_of_each(idx[pos])
        if firsts.size < pos.size:
            found[:] = False
            pos = pos[firsts]
            found[pos] = True
        d = idx[pos]
        out = self._gather(d)
        self._remove(d, slot[pos])
        return found, out

    def peek(self, keys: npt.ArrayLike) -> tuple[npt.NDArray[np.bool_], Columns]:
        """The entries of ``keys`` without removing them: (found mask, their columns in
        key order; a repeated key is returned at each occurrence)."""
        _, idx = self._find(as_keys(keys))
        found = idx >= 0
        return found, self._gather(idx[found])

    def expire(self, before_ms: int) -> Columns:
        """Remove and return the entries with a time before ``before_ms``, oldest first."""
        if self._n == 0 or before_ms <= self._min_time:
            return self._empty()
        t = self._cols[self.time_column][: self._n]
        d = np.flatnonzero(t < before_ms)
        if d.size:
            d = d[np.lexsort((self._keys[d], t[d]))]
        out = self._gather(d)
        self._remove(d, self._find(out["key"])[0])
        t = self._cols[self.time_column][: self._n]
        self._min_time = int(t.min()) if self._n else _NO_TIME
        return out

    # -- internals ---------------------------------------------------------------------

    def _empty(self) -> Columns:
        return self._gather(np.empty(0, np.int64))

    def _gather(self, d: I64) -> Columns:
        out: Columns = {"key": self._keys[d]}
        out.update((n, c[d]) for n, c in self._cols.items())
        return out

    def _find(self, keys: U64) -> tuple[I64, I64]:
        return find(self._table, self._keys, keys)

    def _place(self, keys: U64, first_row: int) -> None:
        self._tombs -= place(self._table, keys, first_row)

    def _reserve(self, extra: int) -> None:
        """Room for ``extra`` more entries in the columns and under the table's load."""
        need = self._n + extra
        cap_now = self._keys.size - 2
        if need > cap_now:
            size = max(need, min(cap_now + cap_now // 8 + 256, self._cap))
            self._resize(size)
        if need + self._tombs > _MAX_LOAD * self._table.size:
            slots = self._table.size
            while need > _REHASH_LOAD * slots:
                slots *= 2
            self._rehash(slots)

    def _resize(self, size: int) -> None:
        keys = np.zeros(size + 2, np.uint64)
        keys[: self._n] = self._keys[: self._n]
        self._keys = keys
        for name, col in self._cols.items():
            grown = np.empty(size, col.dtype)
            grown[: self._n] = col[: self._n]
            self._cols[name] = grown

    def _rehash(self, slots: int) -> None:
        self._table = np.full(slots, EMPTY, np.int32)
        self._tombs = 0
        self._place(self._keys[: self._n], 0)

    def _remove(self, d: I64, slots: I64) -> None:
        """Drop dense rows ``d`` (distinct) found at table ``slots``: the last live rows
        move into the holes, so the live rows stay the first ``len(self)``."""
        if not d.size:
            return
        self._table[slots] = TOMB
        self._tombs += d.size
        n = self._n - d.size
        holes = np.sort(d[d < n])
        tail = np.ones(d.size, np.bool_)
        tail[d[d >= n] - n] = False
        movers = n + np.flatnonzero(tail)
        if movers.size:
            mslots, _ = self._find(self._keys[movers])
            self._keys[holes] = self._keys[movers]
            for col in self._cols.values():
                col[holes] = col[movers]
            self._table[mslots] = holes
        self._keys[n : self._n] = 0
        self._n = n
        # Removal turns live slots into tombstones (their sum never grows, so probes do
        # not lengthen); only memory after a mass expiry needs giving back.
        cap_now = self._keys.size - 2
        if cap_now > 4 * _MIN_SLOTS and n < cap_now // 4:
            self._resize(n + n // 8 + 256)
        if self._table.size > _MIN_SLOTS and n < self._table.size // 16:
            size = self._table.size
            while size > _MIN_SLOTS and n < size // 8:
                size //= 2
            self._rehash(size)

    def _evict(self, k: int) -> Columns:
        """Remove and return the ``k`` oldest entries (by time, then key; ``oldest.py``)."""
        parts: list[Columns] = []
        times = self._cols[self.time_column]
        while k > 0:
            n = self._n
            keys, when = self._oldest.next(k, self._keys[:n], times[:n])
            slot, idx = self._find(keys)
            ok = np.flatnonzero(idx >= 0)
            ok = ok[times[idx[ok]] == when[ok]]  # not taken (and stored again) meanwhile
            parts.append(self._gather(idx[ok]))
            self._remove(idx[ok], slot[ok])
            k -= ok.size
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def to_chunks(self, max_bytes: int = DEFAULT_MAX_BYTES, codec: str = "none") -> list[bytes]:
        """The store as snapshot chunks of at most ``max_bytes`` each (``chunks.py``)."""
        meta = {"cap": self._cap, "time_column": self.time_column}
        return encode_chunks(self.entries(), meta, max_bytes, codec)

    @classmethod
    def from_chunks(cls, chunks: list[bytes]) -> PendingStore:
        """The store ``to_chunks`` saved, exactly (chunks in any order)."""
        meta, arrays = decode_chunks(chunks)
        names = list(arrays)
        if names[:1] != ["key"]:
            raise SnapshotError(f"columns: expected 'key' first, got {names}")
        schema = tuple((name, arr.dtype.str) for name, arr in arrays.items() if name != "key")
        try:
            time_column, cap = str(meta["time_column"]), int(meta["cap"])
            return cls.from_entries(schema, time_column, cap, arrays, copy=False)
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"entries: {exc}") from exc

    @classmethod
    def from_entries(
        cls,
        schema: Schema,
        time_column: str,
        cap: int,
        entries: Mapping[str, npt.ArrayLike],
        *,
        copy: bool = True,
    ) -> PendingStore:
        """A store holding ``entries`` (as ``entries()`` returns them) in that order.

        Nothing is evicted: a restored store may hold more than ``cap`` until
        ``set_cap``/the next insert evicts and returns the excess. ``copy=False`` lets
        the store own the column arrays it can (writable, of the stored dtype): the
        caller must not use them afterwards.
        """
        store = cls(schema, time_column, cap)
        _load(store, entries, copy)
        return store


def _load(store: PendingStore, entries: Mapping[str, npt.ArrayLike], copy: bool) -> None:
    """Fill an empty store with ``entries``, in their order (``from_entries``)."""
    keys = distinct_keys(entries["key"])
    n = keys.size
    cols = checked(store.schema, {k: v for k, v in entries.items() if k != "key"}, n)
    store._keys = np.zeros(n + 2, np.uint64)
    store._keys[:n] = keys
    for name, col in cols.items():
        own = not copy and col.flags.writeable and col.flags.c_contiguous
        store._cols[name] = col if own else col.copy()
    store._n = n
    slots = _MIN_SLOTS
    while n > _RESTORE_LOAD * slots:
        slots *= 2
    store._rehash(slots)
    if n:
        store._min_time = int(cols[store.time_column].min())
