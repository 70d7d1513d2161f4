"""The join's pending store: labels/s, inserts/s, bytes per pending prediction, snapshots.

No Kafka: it times ``aggregator.join.PendingStore`` alone, on one core, against a
Python dict store doing the same operations in the same run (key -> tuple of the five
values; take = ``dict.pop`` per label; snapshot = ``pickle``), as ratios.

* fill: ``--pending`` predictions inserted in batches of ``--batch`` (inserts/s,
  nbytes / len, and the process RSS delta per entry);
* join: ``--rounds`` of (take ``--batch`` labels of pending ids, then insert as many
  new predictions, so the store stays at its size); labels/s and inserts/s per core
  (process CPU time; numpy here is single-threaded);
* at the cap: the same inserts into a store at its cap, each evicting as many;
* snapshot: ``to_chunks`` (900 kB chunks) and ``from_chunks`` at full size, raw and zlib
  level 1: bytes per second, total bytes, restore time.

The dict baseline runs at ``--dict-pending`` (default 1M: 10M tuples take GBs), and
ours runs again at that size for the ratio.

    .venv/bin/python bench/bench_join.py            # 10M pending, 1-2 min, 1.6 GB peak
    .venv/bin/python bench/bench_join.py --quick    # 200k pending, a smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _util import machine_line, pin_to_core

from aggregator.join import DEFAULT_MAX_BYTES, PendingStore

GOAL_LABELS_PER_S = 1_000_000
GOAL_BYTES_PER_PENDING = 64
GOAL_PENDING = 10_000_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def columns(rng: np.random.Generator, m: int, t0: int) -> dict[str, np.ndarray]:
    """Classifier-like rows: 4 versions, 3 classes, a score, rising event time, 3 segments."""
    return {
        "version": rng.integers(0, 4, m).astype(np.int32),
        "predicted": rng.integers(0, 3, m).astype(np.float64),
        "score": rng.random(m),
        "event_time_ms": t0 + np.arange(m, dtype=np.int64) * 10,
        "segment": rng.integers(-1, 3, m).astype(np.int16),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(process cpu s, wall s, result)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


class Keys:
    """Fresh random uint64 ids (as ``schemas.event_id`` hashes look) and a pool of the
    pending ones to draw labels from, in random order."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.t = 0

    def fresh(self, m: int) -> np.ndarray:
        return self.rng.integers(1, 2**64 - 1, m, dtype=np.uint64, endpoint=True)


def fill(store: PendingStore, keys: Keys, n: int, batch: int) -> tuple[float, float, np.ndarray]:
    """Insert n predictions; returns (cpu s, wall s, their keys)."""
    all_keys = keys.fresh(n)
    cpu = wall = 0.0
    for a in range(0, n, batch):
        b = min(n, a + batch)
        part = columns(keys.rng, b - a, a * 10)  # per batch: the bench holds no columns
        c, w, _ = timed(lambda a=a, b=b, part=part: store.insert(all_keys[a:b], part))
        cpu, wall = cpu + c, wall + w
    keys.t = n * 10
    return cpu, wall, all_keys


def churn(
    store: PendingStore, keys: Keys, pending: np.ndarray, batch: int, rounds: int
) -> dict[str, float]:
    """Rounds of (take a batch of labels of pending ids, insert as many new predictions)."""
    order = keys.rng.permutation(pending.size)
    take_cpu = take_wall = ins_cpu = ins_wall = 0.0
    evicted = 0
    fresh_pool: list[np.ndarray] = []
    for r in range(rounds):
        labels = pending[order[r * batch : (r + 1) * batch]]
        c, w, (found, _) = timed(lambda labels=labels: store.take(labels))
        if not found.all():
            raise SystemExit("a pending id was not found")
        take_cpu, take_wall = take_cpu + c, take_wall + w
        new = keys.fresh(batch)
        cols = columns(keys.rng, batch, keys.t)
        keys.t += batch * 10
        c, w, res = timed(lambda new=new, cols=cols: store.insert(new, cols))
        ins_cpu, ins_wall = ins_cpu + c, ins_wall + w
        evicted += res.evicted["key"].size
        fresh_pool.append(new)
    n = rounds * batch
    return {
        "take_per_s": n / take_cpu,
        "take_wall_per_s": n / take_wall,
        "insert_per_s": n / ins_cpu,
        "insert_wall_per_s": n / ins_wall,
        "evicted": evicted,
    }


def at_cap(store: PendingStore, keys: Keys, batch: int, rounds: int) -> float:
    """Inserts/s (cpu) into a store at its cap: every batch evicts as many."""
    store.set_cap(len(store))
    cpu = 0.0
    for _ in range(rounds):
        new, cols = keys.fresh(batch), columns(keys.rng, batch, keys.t)
        keys.t += batch * 10
        c, _, res = timed(lambda new=new, cols=cols: store.insert(new, cols))
        if res.evicted["key"].size != batch:
            raise SystemExit("at the cap, an insert must evict as many")
        cpu += c
    return rounds * batch / cpu


class DictStore:
    """The baseline: a dict of row tuples, fed and read as numpy columns like ours."""

    def __init__(self) -> None:
        self.d: dict[int, tuple[Any, ...]] = {}

    def insert(self, keys: np.ndarray, cols: dict[str, np.ndarray]) -> np.ndarray:
        d, dup = self.d, []
        for k, *row in zip(keys.tolist(), *(c.tolist() for c in cols.values()), strict=True):
            dup.append(k in d)
            if not dup[-1]:
                d[k] = tuple(row)
        return np.array(dup)

    def take(self, keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        rows = [self.d.pop(k, None) for k in keys.tolist()]
        found = np.array([r is not None for r in rows])
        got = [r for r in rows if r is not None]
        return found, [np.array(c) for c in zip(*got, strict=True)]


def dict_baseline(n: int, batch: int, rounds: int, seed: int) -> dict[str, float]:
    """The same operations on a Python dict of tuples, numpy columns in and out."""
    rng = np.random.default_rng(seed)
    ks = rng.integers(1, 2**64 - 1, n + rounds * batch, dtype=np.uint64, endpoint=True)
    gc.collect()
    r0 = rss_bytes()
    store = DictStore()
    c_fill = 0.0
    for a in range(0, n, batch):
        b = min(n, a + batch)
        part = columns(rng, b - a, a * 10)
        c, _, _ = timed(lambda a=a, b=b, part=part: store.insert(ks[a:b], part))
        c_fill += c
    rss = (rss_bytes() - r0) / n
    labels = ks[rng.permutation(n)[: rounds * batch]]
    take = ins_c = 0.0
    for r in range(rounds):
        part_keys = labels[r * batch : (r + 1) * batch]
        c, _, (found, _) = timed(lambda part_keys=part_keys: store.take(part_keys))
        if not found.all():
            raise SystemExit("baseline: a pending id was not found")
        take += c
        new, cols = ks[n + r * batch : n + (r + 1) * batch], columns(rng, batch, n * 10)
        c, _, _ = timed(lambda new=new, cols=cols: store.insert(new, cols))
        ins_c += c
    c_dump, _, blob = timed(lambda: pickle.dumps(store.d, protocol=5))
    c_load, w_load, _ = timed(lambda: pickle.loads(blob))
    return {
        "fill_per_s": n / c_fill,
        "take_per_s": rounds * batch / take,
        "insert_per_s": rounds * batch / ins_c,
        "rss_per_entry": rss,
        "snapshot_mb_per_s": len(blob) / c_dump / 1e6,
        "snapshot_bytes": len(blob),
        "restore_s": w_load,
        "restore_mb_per_s": len(blob) / c_load / 1e6,
    }


def snapshots(store: PendingStore, codec: str) -> dict[str, float]:
    c, w, chunks = timed(lambda: store.to_chunks(DEFAULT_MAX_BYTES, codec))
    size = sum(map(len, chunks))
    rc, rw, restored = timed(lambda: PendingStore.from_chunks(chunks))
    a, b = store.entries(), restored.entries()
    if not all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a):
        raise SystemExit(f"{codec}: the restored store differs")
    del restored
    return {
        "bytes": size,
        "chunks": len(chunks),
        "largest": max(map(len, chunks)),
        "mb_per_s": size / c / 1e6,
        "wall_s": w,
        "restore_s": rw,
        "restore_mb_per_s": size / rc / 1e6,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pending", type=int, default=GOAL_PENDING, help="store size")
    parser.add_argument("--dict-pending", type=int, default=1_000_000, help="baseline size")
    parser.add_argument("--batch", type=int, default=65_536, help="labels per take()")
    parser.add_argument("--rounds", type=int, default=20, help="take+insert rounds")
    parser.add_argument("--codecs", default="none,zlib", help="snapshot codecs to time")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=-1, help="core to pin to (-1: none)")
    parser.add_argument("--quick", action="store_true", help="200k pending, 3 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.pending, args.dict_pending, args.rounds = 200_000, 100_000, 3
        args.batch = min(args.batch, 16_384)
    print(machine_line())
    print(f"pinning: {pin_to_core(args.cpu)}")
    out: dict[str, float] = {}

    gc.collect()
    r0 = rss_bytes()
    keys = Keys(args.seed)
    store = PendingStore.predictions(cap=2 * args.pending)
    c, w, pending = fill(store, keys, args.pending, args.batch)
    rss = rss_bytes() - r0 - pending.nbytes  # the bench's own key list is not the store's
    n = len(store)
    print(f"\nfill: {n:,} pending in {w:.1f} s wall ({n / c:,.0f} inserts/s per core)")
    print(f"  nbytes {store.nbytes / 1e6:,.1f} MB = {store.nbytes / n:.1f} B per pending; "
          f"RSS delta {rss / 1e6:,.1f} MB = {rss / n:.1f} B per pending")  # fmt: skip
    out |= {"fill_per_s": n / c, "bytes_per_pending": store.nbytes / n, "rss_per_pending": rss / n}
    ch = churn(store, keys, pending, args.batch, args.rounds)
    print(f"join at {n:,} pending, {args.rounds} x {args.batch:,}: take {ch['take_per_s']:,.0f} "
          f"labels/s per core ({ch['take_wall_per_s']:,.0f} wall), insert "
          f"{ch['insert_per_s']:,.0f}/s per core")  # fmt: skip
    out |= {"take_per_s": ch["take_per_s"], "insert_per_s": ch["insert_per_s"]}
    out["bytes_per_pending_after_churn"] = store.nbytes / len(store)
    out["insert_at_cap_per_s"] = at_cap(store, keys, args.batch, max(3, args.rounds // 2))
    print(f"at the cap: {out['insert_at_cap_per_s']:,.0f} inserts/s per core (each evicting)")
    print(f"after churn: {out['bytes_per_pending_after_churn']:.1f} B per pending")
    for codec in [c for c in args.codecs.split(",") if c]:
        s = snapshots(store, codec)
        print(f"snapshot {codec}: {s['bytes'] / 1e6:,.1f} MB in {s['chunks']:,} chunks (largest "
              f"{s['largest']:,} B), {s['mb_per_s']:,.0f} MB/s per core ({s['wall_s']:.2f} s); "
              f"restore {s['restore_s']:.2f} s ({s['restore_mb_per_s']:,.0f} MB/s)")  # fmt: skip
        out |= {f"snapshot_{k}_{codec}": v for k, v in s.items()}
    del store, pending
    gc.collect()

    m = args.dict_pending
    small = PendingStore.predictions(cap=2 * m)
    k2 = Keys(args.seed + 1)
    c, _, p2 = fill(small, k2, m, args.batch)
    ours = churn(small, k2, p2, args.batch, args.rounds) | {"fill_per_s": m / c}
    s2 = snapshots(small, "none")
    del small
    gc.collect()
    base = dict_baseline(m, args.batch, args.rounds, args.seed)
    print(f"\nat {m:,} pending, ours against a Python dict store (same run):")
    print(f"{'what':<28} {'ours':>14} {'dict':>14} {'ratio':>8}")
    rows = [
        ("take labels/s per core", ours["take_per_s"], base["take_per_s"]),
        ("insert/s per core", ours["insert_per_s"], base["insert_per_s"]),
        ("fill inserts/s per core", ours["fill_per_s"], base["fill_per_s"]),
        ("snapshot MB/s per core", s2["mb_per_s"], base["snapshot_mb_per_s"]),
        ("restore MB/s per core", s2["restore_mb_per_s"], base["restore_mb_per_s"]),
    ]
    for name, a, b in rows:
        print(f"{name:<28} {a:>14,.0f} {b:>14,.0f} {a / b:>7.1f}x")
    print(f"{'bytes per pending (RSS)':<28} {out['rss_per_pending']:>14.1f} "
          f"{base['rss_per_entry']:>14.1f} {base['rss_per_entry'] / out['rss_per_pending']:>7.1f}x "
          "smaller")  # fmt: skip
    print(f"{'snapshot bytes':<28} {s2['bytes']:>14,} {base['snapshot_bytes']:>14,}")

    print("\ngoals (issue 9):")
    goals = [
        ("labels/s per core >= 1M", out["take_per_s"] >= GOAL_LABELS_PER_S),
        ("bytes per pending <= 64", out["bytes_per_pending"] <= GOAL_BYTES_PER_PENDING),
        ("10M pending per shard", n >= GOAL_PENDING),
    ]
    for name, ok in goals:
        print(f"  {name}: {'met' if ok else 'missed'}")
    out |= {f"dict_{k}": v for k, v in base.items()}
    out["take_vs_dict"] = ours["take_per_s"] / base["take_per_s"]
    out["insert_vs_dict"] = ours["insert_per_s"] / base["insert_per_s"]
    out["small_take_per_s"] = ours["take_per_s"]
    out["pending"] = n
    print()
    for k, v in out.items():
        print(f"join_{k}={v:.6g}")
    print(f"join_take_labels_per_s={out['take_per_s']:.6g}")
    print(f"join_peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"join_restore_s={out.get('snapshot_restore_s_none', s2['restore_s']):.4g}")


if __name__ == "__main__":
    main()
