"""The join's pending stores (aggregator/join), against a dict oracle; no Kafka."""

from __future__ import annotations

import doctest
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregator.join.pending
from aggregator.join import PendingStore, SnapshotError, chunk_header

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("version", "predicted", "score", "event_time_ms", "segment")
Row = tuple[Any, ...]


class Oracle:
    """The store's contract, one entry at a time: key -> (version, predicted, score,
    time, segment). Removals return (key, row) pairs in the order the store must."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.rows: dict[int, Row] = {}

    def insert(self, keys: list[int], rows: list[Row]) -> tuple[list[bool], list[Any]]:
        dup = []
        for k, r in zip(keys, rows, strict=True):
            dup.append(k in self.rows)  # stored before, or earlier in this batch
            self.rows.setdefault(k, r)
        return dup, self._pop(sorted(self.rows, key=lambda k: (self.rows[k][3], k)),
                              len(self.rows) - self.cap)  # fmt: skip

    def _pop(self, keys: list[int], n: int) -> list[Any]:
        return [(k, self.rows.pop(k)) for k in keys[: max(n, 0)]]

    def take(self, keys: list[int]) -> tuple[list[bool], list[Any]]:
        found, out = [], []
        for k in keys:
            found.append(k in self.rows)  # a repeat in the batch finds it taken
            if found[-1]:
                out.append((k, self.rows.pop(k)))
        return found, out

    def expire(self, before: int) -> list[Any]:
        gone = sorted((r[3], k) for k, r in self.rows.items() if r[3] < before)
        return self._pop([k for _, k in gone], len(gone))


def _columns(rng: np.random.Generator, m: int, times: int) -> dict[str, np.ndarray]:
    return {
        "version": rng.integers(0, 5, m).astype(np.int32),
        "predicted": np.where(rng.random(m) < 0.5, rng.integers(-1, 3, m), rng.normal(size=m)),
        "score": np.where(rng.random(m) < 0.2, np.nan, rng.random(m)),
        "event_time_ms": rng.integers(0, times, m),
        "segment": rng.integers(-1, 3, m).astype(np.int16),
    }


def _rows(cols: dict[str, np.ndarray]) -> list[Row]:
    return list(zip(*(cols[n].tolist() for n in NAMES), strict=True))


def _same_row(a: Row, b: Row) -> bool:
    """Exactly equal, NaN equal to NaN (the score's "none")."""
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


def _check_removed(got: dict[str, np.ndarray], want: list[Any]) -> None:
    assert got["key"].tolist() == [k for k, _ in want]
    for row, (_, wrow) in zip(_rows(got), want, strict=True):
        assert _same_row(row, wrow), (row, wrow)


def _same_contents(store: PendingStore, oracle: Oracle) -> None:
    e = store.entries()
    assert len(store) == len(oracle.rows) == e["key"].size
    got = dict(zip(e["key"].tolist(), _rows(e), strict=True))
    assert got.keys() == oracle.rows.keys()
    for k, row in got.items():
        assert _same_row(row, oracle.rows[k]), k


@st.composite
def _ops(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[str, int, int]]]:
    seed = draw(st.integers(0, 2**32 - 1))
    cap = draw(st.sampled_from([1, 3, 40, 700, 2500, 100_000]))
    space = draw(st.sampled_from([5, 60, 3000, 2**40]))
    stride = draw(st.sampled_from([1, 1 << 20, 1 << 44]))  # high strides collide low bits
    kinds = st.sampled_from(["insert", "insert", "take", "take", "peek", "expire", "snapshot"])
    ops = draw(st.lists(st.tuples(kinds, st.integers(0, 1800), st.integers(0, 60)), max_size=12))
    return seed, cap, space, stride, ops


@settings(max_examples=120, deadline=None)
@given(_ops())
def test_matches_dict_oracle(case: tuple[int, int, int, int, list[tuple[str, int, int]]]) -> None:
    seed, cap, space, stride, ops = case
    rng = np.random.default_rng(seed)
    store = PendingStore.predictions(cap=cap)
    oracle = Oracle(cap)
    for step, (kind, size, param) in enumerate(ops):
        keys = (rng.integers(1, space + 1, size, dtype=np.uint64) * np.uint64(stride)).tolist()
        if kind == "insert":
            cols = _columns(rng, size, 50)  # few distinct times: ties in eviction and expiry
            # With a seed-chosen rise, later batches are mostly newer: the eviction list
            # then outlives inserts, and keys taken and stored again must be skipped.
            cols["event_time_ms"] += step * (seed % 3) * 40
            res = store.insert(np.array(keys, np.uint64), cols)
            want_dup, want_evicted = oracle.insert(keys, _rows(cols))
            assert res.duplicates.tolist() == want_dup
            _check_removed(res.evicted, want_evicted)
        elif kind == "peek":
            found, got = store.peek(np.array(keys, np.uint64))
            assert found.tolist() == [k in oracle.rows for k in keys]
            _check_removed(got, [(k, oracle.rows[k]) for k in keys if k in oracle.rows])
        elif kind == "take":
            found, got = store.take(np.array(keys, np.uint64))
            want_found, want = oracle.take(keys)
            assert found.tolist() == want_found
            _check_removed(got, want)
        elif kind == "expire":
            _check_removed(store.expire(param), oracle.expire(param))
        else:
            codec = ("none", "zlib")[param % 2]
            chunks = store.to_chunks(max_bytes=2048 + 38 * (param + 1), codec=codec)
            store = PendingStore.from_chunks(chunks[::-1])
        _same_contents(store, oracle)


def test_first_occurrence_wins_in_a_batch() -> None:
    store = PendingStore.predictions(cap=10)
    cols = {
        "version": [1, 2, 3],
        "predicted": [1.0, 2.0, 3.0],
        "score": [0.1, 0.2, 0.3],
        "event_time_ms": [10, 20, 30],
        "segment": [-1, -1, -1],
    }
    res = store.insert(np.array([7, 7, 8], np.uint64), cols)
    assert res.duplicates.tolist() == [False, True, False]
    found, got = store.take(np.array([9, 7, 7], np.uint64))
    assert found.tolist() == [False, True, False]
    assert got["version"].tolist() == [1] and got["predicted"].tolist() == [1.0]
    assert store.insert(np.array([8], np.uint64), {n: [v[0]] for n, v in cols.items()})[0].all()


def test_cap_evicts_oldest_first_and_returns_them() -> None:
    store = PendingStore.predictions(cap=4)
    keys = np.array([50, 40, 30, 20, 10, 60], np.uint64)
    times = [5, 3, 3, 9, 1, 7]
    cols = {
        "version": np.zeros(6, np.int32),
        "predicted": np.arange(6.0),
        "score": np.full(6, np.nan),
        "event_time_ms": times,
        "segment": np.full(6, -1, np.int16),
    }
    res = store.insert(keys, cols)
    # time 1 (key 10), then the tie at 3 broken by key: 30 before 40
    assert res.evicted["key"].tolist() == [10, 30]
    assert res.evicted["event_time_ms"].tolist() == [1, 3]
    assert len(store) == 4
    older = {n: v[:1] for n, v in cols.items()} | {"event_time_ms": [0]}
    res = store.insert(np.array([99], np.uint64), older)  # older than all: goes out at once
    assert res.evicted["key"].tolist() == [99] and not res.duplicates[0]
    assert store.set_cap(2)["key"].tolist() == [40, 50]
    assert sorted(store.entries()["key"].tolist()) == [20, 60]


def test_eviction_list_at_scale_matches_sorting() -> None:
    """Beyond the first 1024 candidates: the cached eviction order stays exact while
    takes and older inserts come in between."""
    rng = np.random.default_rng(5)
    store = PendingStore.predictions(cap=20_000)
    times: dict[int, int] = {}
    evicted = 0
    for step in range(12):
        keys = rng.integers(1, 2**63, 4000, dtype=np.uint64)
        cols = _columns(rng, 4000, 10_000)
        cols["event_time_ms"] += step * 500  # mostly rising, overlapping: some go in older
        res = store.insert(keys, cols)
        times.update(zip(keys.tolist(), cols["event_time_ms"].tolist(), strict=True))
        want = sorted(times, key=lambda k: (times[k], k))[: max(len(times) - 20_000, 0)]
        assert res.evicted["key"].tolist() == want
        evicted += len(want)
        for k in want:
            del times[k]
        taken = rng.choice(store.entries()["key"], 500, replace=False)
        assert store.take(taken)[0].all()
        for k in taken.tolist():
            del times[k]
        assert sorted(store.entries()["key"].tolist()) == sorted(times)
    assert len(store) == 20_000 - 500
    assert evicted == 12 * 4000 - 12 * 500 - len(store)
    for cap in (17_000, 3001, 3000, 1):  # evictions deeper than the sampled threshold
        want = sorted(times, key=lambda k: (times[k], k))[: len(times) - cap]
        assert store.set_cap(cap)["key"].tolist() == want
        for k in want:
            del times[k]
    assert store.entries()["key"].tolist() == list(times)


@pytest.mark.parametrize("codec", ["none", "zlib"])
def test_chunked_snapshot_round_trip(codec: str) -> None:
    rng = np.random.default_rng(1)
    store = PendingStore.predictions(cap=1_000_000)
    keys = rng.integers(1, 2**64 - 1, 200_000, dtype=np.uint64)
    store.insert(keys, _columns(rng, keys.size, 10**12))
    store.take(keys[::3])
    chunks = store.to_chunks(max_bytes=100_000, codec=codec)
    assert len(chunks) > 30 and max(map(len, chunks)) <= 100_000  # 6.1 MB raw
    restored = PendingStore.from_chunks(list(reversed(chunks)))
    a, b = store.entries(), restored.entries()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name
    assert restored.cap == store.cap and restored.schema == store.schema
    # Restored, it behaves the same: same answers to the same operations.
    more = rng.integers(1, 2**64 - 1, 5000, dtype=np.uint64)
    probe = np.concatenate([keys[1::3][:4000], more[:1000]])
    assert np.array_equal(store.take(probe)[0], restored.take(probe)[0])
    assert np.array_equal(store.expire(10**11)["key"], restored.expire(10**11)["key"])
    empty = PendingStore.labels(cap=5).to_chunks()
    assert len(empty) == 1 and len(PendingStore.from_chunks(empty)) == 0
    assert chunk_header(chunks[0])["count"] == len(chunks)


def test_snapshot_refuses_mixed_missing_or_damaged_chunks() -> None:
    rng = np.random.default_rng(2)
    store = PendingStore.labels(cap=10_000)
    keys = rng.integers(1, 2**63, 3000, dtype=np.uint64)
    store.insert(keys, {"label": rng.random(3000), "label_time_ms": np.arange(3000)})
    old = store.to_chunks(max_bytes=10_000)
    store.take(keys[:1])
    new = store.to_chunks(max_bytes=10_000)
    with pytest.raises(SnapshotError, match="different snapshots"):
        PendingStore.from_chunks([*new[:-1], old[-1]])
    with pytest.raises(SnapshotError, match="index"):
        PendingStore.from_chunks(new[:-1])
    bad = bytearray(new[1])
    bad[-1] ^= 1
    with pytest.raises(SnapshotError, match="digest"):
        PendingStore.from_chunks([new[0], bytes(bad), *new[2:]])
    with pytest.raises(SnapshotError, match="magic"):
        PendingStore.from_chunks([b"nonsense"])
    assert zlib.crc32(new[0]) != zlib.crc32(old[0])


def test_bad_input_names_the_field() -> None:
    store = PendingStore.labels(cap=5)
    with pytest.raises(ValueError, match="keys: 0 is reserved"):
        store.insert(np.array([0], np.uint64), {"label": [1.0], "label_time_ms": [1]})
    with pytest.raises(ValueError, match="missing \\['label_time_ms'\\]"):
        store.insert(np.array([1], np.uint64), {"label": [1.0]})
    with pytest.raises(ValueError, match="label_time_ms: cannot store float64"):
        store.insert(np.array([1], np.uint64), {"label": [1.0], "label_time_ms": [1.5]})
    with pytest.raises(ValueError, match="label: expected 1 values"):
        store.insert(np.array([1], np.uint64), {"label": [1.0, 2.0], "label_time_ms": [1]})
    preds = PendingStore.predictions(cap=5)
    with pytest.raises(ValueError, match="segment: values outside"):
        preds.insert(
            np.array([1], np.uint64),
            {"version": [0], "predicted": [0.0], "score": [0.5], "event_time_ms": [1],
             "segment": np.array([70_000])},
        )  # fmt: skip
    with pytest.raises(ValueError, match="cap: must be >= 1"):
        PendingStore.labels(cap=0)
    assert store.take(np.array([0, 5], np.uint64))[0].tolist() == [False, False]
    assert len(store) == 0


def test_memory_per_pending_prediction() -> None:
    rng = np.random.default_rng(3)
    store = PendingStore.predictions(cap=10_000_000)
    batch = 65_536
    for _ in range(8):  # 524k entries, grown from empty
        keys = rng.integers(1, 2**64 - 1, batch, dtype=np.uint64)
        store.insert(keys, _columns(rng, batch, 10**9))
    assert store.nbytes / len(store) <= 64
    for _ in range(20):  # churn at a steady size: tombstones, rehashes
        live = store.entries()["key"]
        store.take(rng.choice(live, batch, replace=False))
        keys = rng.integers(1, 2**64 - 1, batch, dtype=np.uint64)
        store.insert(keys, _columns(rng, batch, 10**9))
    assert store.nbytes / len(store) <= 64, store.nbytes / len(store)
    store.expire(2**62)  # a mass expiry gives memory back
    assert len(store) == 0 and store.nbytes < 100_000


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(aggregator.join.pending)
    assert result.attempted >= 8 and result.failed == 0


def test_bench_join_quick_smoke() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_join.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for key in ("join_take_labels_per_s=", "join_bytes_per_pending=", "join_restore_s="):
        assert key in out, out
