"""Per-event decoding: the bulk numpy decoder against fastavro record by record.

No Kafka: it times only decoding a consumed batch of framed ``PredictionEvent``
values into a ``RowChunk``, the step that dominates the per-event aggregator path.

* ``per-record``: ``SchemaResolver.read`` (fastavro ``schemaless_reader``) and
  ``EventChunkBuilder.add`` per message, then ``build()`` (what the shard does today);
* ``bulk``: ``EventDecoder.decode`` on the same values (``aggregator/bulk/``).

The events are ``bench_aggregator.py``'s stream (3 classifiers with labels on 70 % of
rows and a score, 1 regressor, one feature each, 2 % error/timeout), plus a 36-char
event id and a segment out of three, as a Java service would send them. Both paths
decode the same values in turns, median of ``--repeats``; the outputs are compared
column by column first.

    .venv/bin/python bench/bench_decode.py              # 100k events x 5, about 30 s
    .venv/bin/python bench/bench_decode.py --quick      # 10k x 1, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _util import machine_line, pin_to_core
from bench_aggregator import slices

from aggregator.bulk import (
    EventDecoder,
    EventDecodeResult,
    decode_events_per_record,
)
from aggregator.decode import RowChunk, SchemaResolver
from producer.encode import encode_event

SEGMENTS = ("eu-west", "us-east", "ap-south")


def make_values(events: int, seed: int) -> list[bytes]:
    """``events`` framed PredictionEvent values, in stream order."""
    values: list[bytes] = []
    k = 0
    for groups in slices(events, 10_000.0, seed):
        for _model, rows in groups:
            for row in rows:
                r = row._replace(event_id=str(uuid.UUID(int=k)), segment=SEGMENTS[k % 3])
                values.append(encode_event(r, service="checkout", instance="pod-7f9c"))
                k += 1
    return values[:events]


def same(a: RowChunk, b: RowChunk) -> list[str]:
    """Names of the columns that differ (NaN equals NaN)."""
    diff = []
    for name in RowChunk.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            equal = x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        else:
            equal = x == y
        if not equal:
            diff.append(name)
    return diff


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=-1, help="core to pin to (-1: none)")
    parser.add_argument(
        "--sizes",
        default="128,1000,20000",
        help="also time the values in consecutive calls of these many messages (comma list; "
        "the shard consumes up to 20000 per batch)",
    )
    parser.add_argument("--quick", action="store_true", help="10k events, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeats = 10_000, 1
    print(machine_line())
    print(f"pinning: {pin_to_core(args.cpu)}")
    values = make_values(args.events, args.seed)
    offsets = np.arange(len(values), dtype=np.int64)
    size = sum(map(len, values)) / len(values)
    print(f"{len(values)} framed events, {size:.1f} bytes each on average")

    resolver = SchemaResolver()
    decoder = EventDecoder(resolver)
    paths: dict[str, Callable[[], EventDecodeResult]] = {
        "per-record": lambda: decode_events_per_record(values, offsets, resolver),
        "bulk": lambda: decoder.decode(values, offsets),
    }
    ref, got = paths["per-record"](), paths["bulk"]()
    diff = same(ref.chunk, got.chunk)
    if diff or not got.bulk or got.rejected or ref.rejected:
        raise SystemExit(f"outputs differ: {diff} (bulk={got.bulk})")

    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():  # in turns, so drift hits both alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    us = {name: statistics.median(t) / len(values) * 1e6 for name, t in times.items()}
    print(f"{'path':<12} {'us/event':>9} {'events/s':>12}   runs (ms)")
    for name, t in times.items():
        runs = " ".join(f"{x * 1e3:.1f}" for x in t)
        print(f"{name:<12} {us[name]:>9.3f} {1e6 / us[name]:>12,.0f}   {runs}")
    ratio = us["per-record"] / us["bulk"]
    print(f"bulk is {ratio:.1f}x faster than per-record")
    print(f"per_record_us={us['per-record']:.3f}")
    print(f"bulk_us={us['bulk']:.3f}")
    print(f"speedup={ratio:.2f}")

    sizes = [int(x) for x in args.sizes.split(",") if x]
    if sizes:
        print(f"\nper call of k messages (us/event, median of {args.repeats}):")
        print(f"{'k':>7} {'per-record':>11} {'bulk':>8} {'speedup':>8}")
    for k in sizes:
        cuts = [(i, min(i + k, len(values))) for i in range(0, len(values), k)]
        dec = EventDecoder(resolver, min_bulk=0)
        sized: dict[str, Callable[[], object]] = {
            "per-record": lambda cuts=cuts: [
                decode_events_per_record(values[a:b], offsets[a:b], resolver) for a, b in cuts
            ],
            "bulk": lambda cuts=cuts, dec=dec: [
                dec.decode(values[a:b], offsets[a:b]) for a, b in cuts
            ],
        }
        spent: dict[str, list[float]] = {name: [] for name in sized}
        for _ in range(args.repeats):
            for name, fn in sized.items():
                t0 = time.perf_counter()
                fn()
                spent[name].append(time.perf_counter() - t0)
        per = {name: statistics.median(t) / len(values) * 1e6 for name, t in spent.items()}
        print(f"{k:>7} {per['per-record']:>11.3f} {per['bulk']:>8.3f} "
              f"{per['per-record'] / per['bulk']:>7.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
