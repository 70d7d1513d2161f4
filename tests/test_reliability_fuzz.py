"""Reliability: a fuzz of the decoders with mutated valid messages.

Whatever the bytes, decoding and ingesting raise only ``DecodeError``. Writes
``reliability/results/decoder_fuzz.json`` (RELIABILITY.md); ``--long`` runs the long
form.
"""

import warnings
from collections import Counter
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_util import T0_MS, Clock, shard_settings, write_result
from shards import make_row

from aggregator.decode import EventChunkBuilder, SchemaResolver, decode_batch
from aggregator.errors import DecodeError
from aggregator.exposition import LabelCache, render_payload
from aggregator.metrics import build_families
from aggregator.state import Heartbeat, Marker, PartitionState, RowChunk
from producer.encode import encode_batch, encode_event, encode_heartbeat
from schemas.codec import encode_marker
from schemas.wire import SchemaId


def _seed_messages() -> list[bytes]:
    """Valid messages of every kind the input topic carries, to be mutated."""
    t = T0_MS / 1000
    cls = [
        make_row(
            "fz-cls",
            t + i / 100,
            outcome=i % 5 if i % 7 else 0,
            prediction=["a", "b", None][i % 3],
            label=["b", None, "a"][i % 3],
            segment=["eu", None][i % 2],
            features={"f1": i / 3, "f2": -1.0} if i % 2 else None,
            event_id=f"id-{i}" if i % 3 else "",
        )
        for i in range(12)
    ]
    reg = [
        make_row(
            "fz-reg", t + i / 100, prediction=i * 1.5, label=[i * 1.0, None][i % 2], score=None
        )
        for i in range(12)
    ]
    heartbeat = encode_heartbeat(
        {
            "event_time_ms": T0_MS,
            "service": "svc",
            "instance": "pod-1",
            "cpu_usage_ratio": 0.5,
            "memory_usage_bytes": 10**9,
            "disk_usage_ratio": 0.1,
            "gpus": [{"index": 0, "utilization_ratio": 0.3, "memory_used_bytes": None}],
        }
    )
    marker = encode_marker(T0_MS + 5000, "x")
    return [
        encode_batch(cls, service="svc", instance="i"),
        encode_batch(reg),
        encode_batch(cls[:1]),
        *(encode_event(r, service="svc") for r in cls[:4]),
        *(encode_event(r) for r in reg[:3]),
        heartbeat,
        marker,
    ]


@st.composite
def _mutated(draw: Any, seeds: list[bytes]) -> bytes:
    """A valid message after 1-4 mutations: bit flips, cuts, splices, header swaps..."""
    value = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                ["flip", "byte", "cut", "splice", "header", "insert", "delete", "varint"]
            )
        )
        n = len(value)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            value[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            value[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            value = value[: draw(st.integers(0, n))]
        elif op == "splice":  # a prefix of this one + a suffix of another (either format)
            other = draw(st.sampled_from(seeds))
            value = value[: draw(st.integers(0, n))] + other[draw(st.integers(0, len(other))) :]
        elif op == "header" and n >= 5:  # read the body with another schema
            value[1:5] = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 2**31])).to_bytes(4, "big")
        elif op == "insert":
            i = draw(st.integers(0, n))
            value[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del value[i : i + draw(st.integers(1, 8))]
        elif op == "varint" and n > 5:  # a huge or negative length/count
            i = draw(st.integers(5, n - 1))
            value[i : i + 1] = draw(st.sampled_from([b"\x01", b"\x7f", b"\xff\xff\xff\xff\x0f"]))
    return bytes(value)


def _ingest_like_the_shard(
    state: PartitionState, values: list[bytes], first_offset: int, stats: Counter[str]
) -> None:
    """What Shard._process does with one partition's messages, minus Kafka."""
    items: list[RowChunk | Marker | Heartbeat] = []
    builder = EventChunkBuilder()
    resolver = SchemaResolver()
    non_rows: set[int] = set()
    rows = 0
    for i, value in enumerate(values):
        off = first_offset + i
        try:
            kind, rec = resolver.read(value)
            if kind == SchemaId.PREDICTION_EVENT:
                try:
                    builder.add(rec, off)
                except (KeyError, TypeError) as exc:  # the shard maps these the same way
                    raise DecodeError("undecodable", str(exc)) from None
                rows += 1
                continue
            if len(builder):
                items.append(builder.build())
            if kind == SchemaId.PREDICTION_BATCH:
                chunk = decode_batch(rec, off)
                rows += len(chunk)
                items.append(chunk)
            elif kind == SchemaId.RESOURCE_HEARTBEAT:
                items.append(Heartbeat(off, rec))
                non_rows.add(off)
            elif kind == SchemaId.WATERMARK_MARKER:
                items.append(Marker(off, int(rec["event_time_ms"])))
                non_rows.add(off)
            else:
                raise DecodeError("unexpected_schema", str(kind))
        except DecodeError as exc:
            stats[f"decode_error:{exc.reason}"] += 1
            non_rows.add(off)
    if len(builder):
        items.append(builder.build())
    offsets = np.arange(first_offset, first_offset + len(values), dtype=np.int64)
    stamps = np.full(len(values), T0_MS + 60_000, dtype=np.int64)
    result = state.ingest(items, offsets, stamps, next_offset=first_offset + len(values))
    rejected_rows = sum(1 for off in result.offsets.tolist() if off not in non_rows)
    stats["rows"] += rows
    stats["rows_accepted"] += result.accepted
    stats["rows_rejected"] += rejected_rows
    # Nothing silently lost: every decoded row was accepted or rejected (dead-lettered).
    assert result.accepted + rejected_rows == rows, (result.accepted, rejected_rows, rows)


def test_fuzz_mutated_messages_only_ever_raise_decode_error(long: bool) -> None:
    clock = Clock()
    examples = 3000 if long else 400
    seeds = _seed_messages()
    config = shard_settings(max_models=8, max_classes=4, max_series=5000).state_config()
    stats: Counter[str] = Counter()
    failures: list[str] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(st.one_of(_mutated(seeds), st.sampled_from(seeds)), min_size=1, max_size=6))
    def run(values: list[bytes]) -> None:
        stats["examples"] += 1
        stats["messages"] += len(values)
        state = PartitionState(config, 0)
        # As in production, numpy's overflow warnings are warnings, not errors (they are
        # counted; what an overflow does to the sums is test_non_finite_regression_...).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            try:
                _check(state, values)
            finally:
                stats["numpy_runtime_warnings"] += len(caught)

    def _check(state: PartitionState, values: list[bytes]) -> None:
        try:
            _ingest_like_the_shard(state, values, 0, stats)
            _ingest_like_the_shard(state, values[::-1], len(values), stats)
            # Every panel's view, the exposition and the snapshot must survive it too.
            families = build_families([state.view()], config)
            render_payload(families, LabelCache())
            restored = PartitionState.from_bytes(state.to_bytes(), config)
            assert restored.events_accepted == state.events_accepted
            open_slots = ~state.slot_closed
            binned = state.cum["outcome"].sum() + state.ring["outcome"][open_slots].sum()
            assert binned == state.events_accepted, (binned, state.events_accepted)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
            raise

    passed = False
    try:
        run()
        passed = True
    finally:
        write_result(
            "decoder_fuzz",
            clock,
            long=long,
            passed=passed,
            examples=stats["examples"],
            messages=stats["messages"],
            rows_decoded=stats["rows"],
            rows_accepted=stats["rows_accepted"],
            rows_rejected=stats["rows_rejected"],
            decode_errors={
                k.split(":", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("decode")
            },
            numpy_runtime_warnings=stats["numpy_runtime_warnings"],
            other_exceptions=len(failures),
            first_failures=failures[:5],
        )
