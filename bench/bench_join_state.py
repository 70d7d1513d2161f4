"""Late labels through a partition's state: join + binning, decode, snapshot, restore.

``bench_join.py`` times the pending store alone; this times what a shard does per
label on top of it, in one run, side by side with the store's own ``take`` as the
ceiling:

- join: ``PartitionState.ingest_labels`` on label columns (take from the store,
  model/kind checks, class interning, binning into the joined measures);
- decode: framed ``LabelFeedback`` records to label columns (``SchemaResolver.read``
  + ``LabelChunkBuilder``), what the feedback edge does per record;
- snapshot: ``to_records`` (the join's chunk records + head) and ``from_records``.

Per core = process CPU time. Example: ``python bench/bench_join_state.py --quick``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.join.joiner import JoinLimits
from aggregator.join.labels import LabelChunk, LabelChunkBuilder
from aggregator.resolver import SchemaResolver
from aggregator.state import Marker, PartitionState, RowChunk, StateConfig
from schemas.codec import encode_label

T0 = 1_700_000_000_000
CLASSES = ["legit", "fraud"]


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def predictions(n: int, rng: np.random.Generator, offset: int) -> RowChunk:
    """One model's n ok classifications with ids 1..n, as decode would give them."""
    return RowChunk(
        mv_keys=[("fraud", "v1")],
        regression=[False],
        mv=np.zeros(n, np.int32),
        offset=np.full(n, offset, np.int64),
        event_time_ms=T0 + offset + np.arange(n, dtype=np.int64),  # 1 ms apart, in order
        latency_seconds=np.full(n, 0.01),
        outcome=np.zeros(n, np.int8),
        score=rng.uniform(0.5, 1, n),
        classes=list(CLASSES),
        pred_code=rng.integers(0, 2, n).astype(np.int32),
        label_code=np.full(n, -1, np.int32),
        pred_value=np.empty(0),
        label_value=np.empty(0),
        segments=[],
        segment=np.full(n, -1, np.int32),
        feature_names=[],
        feat_row=np.empty(0, np.int64),
        feat_code=np.empty(0, np.int32),
        feat_value=np.empty(0),
        event_hash=np.arange(1, n + 1, dtype=np.uint64),
    )


def labels(keys: np.ndarray, rng: np.random.Generator, t_ms: int) -> LabelChunk:
    m = keys.size
    return LabelChunk(
        offset=np.arange(m, dtype=np.int64),
        key=keys,
        label_time_ms=np.full(m, t_ms, np.int64),
        model=np.zeros(m, np.int32),
        version=np.full(m, -1, np.int32),
        label_code=rng.integers(1, 3, m).astype(np.int32),  # names[1:] are the classes
        label_value=np.full(m, np.nan),
        names=["fraud", *CLASSES],
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pending", type=int, default=2_000_000, help="predictions waiting")
    p.add_argument("--batch", type=int, default=65_536, help="labels per ingest_labels()")
    p.add_argument("--decode", type=int, default=200_000, help="records decoded one by one")
    p.add_argument("--quick", action="store_true", help="200k pending, 20k decoded")
    args = p.parse_args(argv)
    n = 200_000 if args.quick else args.pending
    n_dec = 20_000 if args.quick else args.decode
    rng = np.random.default_rng(3)
    config = StateConfig(join=JoinLimits(max_pending=n * 2, max_seen=n * 2))
    state = PartitionState(config, 0)
    step = 500_000
    for k in range(0, n, step):
        chunk = predictions(min(step, n - k), rng, k)
        chunk.event_hash[:] += np.uint64(k)
        state.ingest([chunk], np.array([k]), np.array([2 * T0]), k + 1)
    assert state.join is not None
    assert len(state.join.pending) == n
    order = rng.permutation(np.arange(1, n + 1, dtype=np.uint64))
    half = order[: n // 2]

    # The store's own take on a copy-free twin: the ceiling of the join.
    twin = PartitionState.from_records(state.to_records(), config)
    assert twin.join is not None
    w_take, c_take, _ = timed(
        lambda: [twin.join.pending.take(half[i : i + args.batch])  # type: ignore[union-attr]
                 for i in range(0, half.size, args.batch)]
    )  # fmt: skip
    t_label = T0 + n + 60_000
    batches = [
        labels(half[i : i + args.batch], rng, t_label) for i in range(0, half.size, args.batch)
    ]
    w_join, c_join, _ = timed(lambda: [state.ingest_labels(b, 0) for b in batches])
    joined = int(half.size)

    records = [
        encode_label(("fraud", f"id-{i}", CLASSES[i % 2], t_label / 1000, "")) for i in range(n_dec)
    ]
    resolver = SchemaResolver()

    def decode() -> LabelChunk:
        b = LabelChunkBuilder()
        for i, r in enumerate(records):
            b.add(resolver.read(r)[1], i)
        return b.build()

    w_dec, c_dec, _ = timed(decode)

    w_snap, c_snap, recs = timed(state.to_records)
    size = sum(len(r) for r in recs)
    w_rest, c_rest, restored = timed(lambda: PartitionState.from_records(recs, config))
    assert restored.join is not None
    assert len(restored.join.pending) == n - joined
    state.ingest([Marker(n, t_label + 60_000)], np.array([n]), np.array([2 * T0]), n + 1)
    assert int(state.cum["joined"].sum()) == joined

    pending_left = n - joined
    print(f"bench_join_state: {n:,} pending, {joined:,} labels joined in batches of {args.batch:,}")
    print(f"  store take (ceiling)      {joined / c_take / 1e6:6.2f} M labels/s per core")
    print(
        f"  state join (take+bin)     {joined / c_join / 1e6:6.2f} M labels/s per core"
        f"  = {c_take / c_join:.0%} of the ceiling"
    )
    print(
        f"  decode, per record        {n_dec / c_dec / 1e3:6.0f} k labels/s per core"
        f"  ({c_dec / n_dec * 1e6:.1f} us each: the edge's cost per label)"
    )
    print(
        f"  snapshot of {pending_left:,} pending: {size / 1e6:.1f} MB in {len(recs)} records,"
        f" {size / w_snap / 1e6:.0f} MB/s ({w_snap:.2f} s); restore {w_rest:.2f} s"
        f" ({size / 1e6 / w_rest:.0f} MB/s), {size / max(pending_left, 1):.1f} B per pending"
    )
    del c_snap, c_rest, w_take, w_join, w_dec


if __name__ == "__main__":
    main()
