"""aggregator.route on plain message objects: no librdkafka, no broker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.bulk import MIN_BULK
from aggregator.resolver import SchemaResolver
from aggregator.route import Decoders, MessageLike, Rejected, Routed, ingest, route
from aggregator.settings import AggregatorSettings
from aggregator.state import Heartbeat, Marker, PartitionState, RowChunk
from producer.encode import Row, encode_batch, encode_events, encode_heartbeat, encode_label
from schemas.codec import MARKER_GROUP_HEADER, encode_marker

GROUP = "modelpulse-aggregator"
NOW_MS = int(time.time() * 1000)
T0 = NOW_MS / 1000 - 120
MAX_ROWS = 200_000


@dataclass
class Msg:
    """A consumed message as the aggregator reads it (``MessageLike``)."""

    _value: bytes | None
    _offset: int
    _ts: int = NOW_MS - 1000
    _headers: list[tuple[str, bytes]] | None = None

    def topic(self) -> str:
        return "predictions"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)

    def key(self) -> bytes:
        return b"m"

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def error(self) -> None:
        return None


class SpyEvents:
    """Wraps the bulk decoder to record the run lengths it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.runs: list[int] = []

    def decode(self, values: list[bytes | None], offsets: np.ndarray) -> Any:
        self.runs.append(len(values))
        return self.inner.decode(values, offsets)


def _decoders() -> tuple[Decoders, SpyEvents]:
    d = Decoders(SchemaResolver())
    spy = SpyEvents(d.events)
    d.events = spy  # type: ignore[assignment]
    return d, spy


def _rows(n: int, model: str = "m", latency: float = 0.01) -> list[Row]:
    return [
        Row(model, "v", T0 + i / 1000, latency, 0, "a", 0.9, None, None, None, f"e{i}")
        for i in range(n)
    ]


def _route(msgs: list[MessageLike], decoders: Decoders | None = None, **kw: Any) -> list[Routed]:
    d = decoders if decoders is not None else _decoders()[0]
    kw.setdefault("max_rows_per_envelope", MAX_ROWS)
    kw.setdefault("ingest_ms", NOW_MS)
    return list(route(msgs, d, GROUP, **kw))


def _marker(offset: int, group: str | None) -> Msg:
    headers = None if group is None else [(MARKER_GROUP_HEADER, group.encode())]
    return Msg(encode_marker(NOW_MS - 60_000, "shard-x"), offset, _headers=headers)


def _heartbeat() -> bytes:
    return encode_heartbeat(
        {
            "event_time_ms": NOW_MS - 5000,
            "service": "svc",
            "instance": "pod-1",
            "cpu_usage_ratio": 0.5,
            "memory_usage_bytes": 1 << 30,
            "disk_usage_ratio": 0.25,
            "gpus": [],
        }
    )


def test_an_envelope_becomes_one_chunk_with_its_offset_and_clamped_stamp() -> None:
    future = NOW_MS + 3_600_000  # a CreateTime ahead of the shard's clock
    [g] = _route([Msg(encode_batch(_rows(50)), 7, future)])
    [chunk] = g.items
    assert isinstance(chunk, RowChunk) and len(chunk) == 50
    assert chunk.offset.tolist() == [7] * 50
    assert g.offsets.tolist() == [7] and g.next_offset == 8
    assert g.stamps.tolist() == [NOW_MS]  # min(Kafka timestamp, clock at ingest)
    assert g.rejected == [] and [m.offset() for m in g.messages] == [7]


def test_a_negative_kafka_timestamp_takes_the_clock() -> None:
    [g] = _route([Msg(encode_batch(_rows(1)), 0, -1)])
    assert g.stamps.tolist() == [NOW_MS]


def test_per_event_runs_of_min_bulk_go_to_the_bulk_decoder_shorter_ones_do_not() -> None:
    events = encode_events(_rows(MIN_BULK + 10))
    short = encode_events(_rows(MIN_BULK - 1, model="s"))
    msgs: list[MessageLike] = [Msg(v, i) for i, v in enumerate(events)]
    msgs.append(Msg(encode_batch(_rows(5, model="env")), len(msgs)))
    msgs += [Msg(v, len(msgs) + i) for i, v in enumerate(short)]
    d, spy = _decoders()
    [g] = _route(msgs, d)
    assert spy.runs == [MIN_BULK + 10]  # the short run went through the per-message path
    assert [len(c) for c in g.items if isinstance(c, RowChunk)] == [MIN_BULK + 10, 5, MIN_BULK - 1]
    rows = np.concatenate([c.offset for c in g.items if isinstance(c, RowChunk)])
    assert (np.diff(rows) >= 0).all() and rows[-1] == len(msgs) - 1  # log order
    assert g.rejected == []


def test_a_bad_event_inside_a_bulk_run_is_rejected_alone() -> None:
    events = encode_events(_rows(MIN_BULK + 2))
    bad = bytearray(events[5])
    bad[-1:] = b""  # a truncated body, same schema id: still part of the run
    events[5] = bytes(bad)
    d, spy = _decoders()
    [g] = _route([Msg(v, i) for i, v in enumerate(events)], d)
    assert spy.runs == [MIN_BULK + 2]
    assert [(r.offset, r.reason) for r in g.rejected] == [(5, "undecodable")]
    assert sum(len(c) for c in g.items if isinstance(c, RowChunk)) == MIN_BULK + 1


def test_markers_are_trusted_only_with_this_groups_header() -> None:
    msgs: list[MessageLike] = [
        _marker(0, GROUP),
        _marker(1, None),
        _marker(2, "another-group"),
    ]
    [g] = _route(msgs)
    assert g.items == [Marker(0, NOW_MS - 60_000)]
    [r] = g.rejected
    assert (r.offset, r.reason) == (1, "untrusted_marker")
    assert MARKER_GROUP_HEADER in r.detail
    assert g.offsets.tolist() == [0, 1, 2] and g.next_offset == 3  # all three are consumed


def test_heartbeats_become_heartbeat_items() -> None:
    [g] = _route([Msg(_heartbeat(), 4)])
    [beat] = g.items
    assert isinstance(beat, Heartbeat) and beat.offset == 4
    assert beat.record["instance"] == "pod-1"


def test_undecodable_values_tombstones_and_foreign_records_are_rejected_with_reasons() -> None:
    label = encode_label(("m", "e1", "a", T0, "v"))  # feedback belongs on its own topic
    msgs: list[MessageLike] = [
        Msg(b"junk", 0),
        Msg(None, 1),  # a tombstone
        Msg(b"\x00\x00\x00\x00\x63abc", 2),  # an id nobody registered
        Msg(label, 3),
        Msg(encode_events(_rows(1))[0][:-3], 4),
    ]
    [g] = _route(msgs)
    assert g.items == []
    assert [(r.offset, r.reason) for r in g.rejected] == [
        (0, "truncated"),
        (1, "truncated"),
        (2, "unknown_schema"),
        (3, "unexpected_schema"),
        (4, "undecodable"),
    ]
    assert all(r.rows == 1 and r.value is msgs[r.offset].value() for r in g.rejected)


def test_mixed_kinds_keep_log_order_across_groups() -> None:
    events = encode_events(_rows(3))
    msgs: list[MessageLike] = [
        Msg(events[0], 10),
        Msg(events[1], 11),
        _marker(12, GROUP),
        Msg(encode_batch(_rows(4)), 13),
        Msg(b"junk", 14),
        Msg(_heartbeat(), 15),
        Msg(encode_batch(_rows(4)), 16),
        Msg(events[2], 17),
        Msg(b"junk", 18),
    ]
    groups = _route(msgs, rows_per_ingest=5)  # a group ends at the message that fills it
    assert [g.offsets.tolist() for g in groups] == [[10, 11, 12, 13], [14, 15, 16, 17], [18]]
    assert [g.next_offset for g in groups] == [14, 18, 19]
    kinds = [
        (type(i).__name__, int(i.offset[0]) if isinstance(i, RowChunk) else i.offset)
        for g in groups
        for i in g.items
    ]
    assert kinds == [
        ("RowChunk", 10),  # the two single events, one chunk
        ("Marker", 12),
        ("RowChunk", 13),
        ("Heartbeat", 15),
        ("RowChunk", 16),
        ("RowChunk", 17),
    ]
    assert [[r.offset for r in g.rejected] for g in groups] == [[], [14], [18]]


def test_ingest_counts_decode_failures_and_maps_rejected_rows_to_their_message() -> None:
    config = AggregatorSettings(bootstrap_servers="127.0.0.1:1").state_config()
    state = PartitionState(config, 0)
    good = encode_batch(_rows(3))
    bad = encode_batch(_rows(2, latency=-1.0))
    msgs: list[MessageLike] = [Msg(good, 0), Msg(b"junk", 1), Msg(bad, 2), Msg(good, 3)]
    dead = ingest(
        state,
        route(
            msgs,
            Decoders(SchemaResolver()),
            GROUP,
            max_rows_per_envelope=MAX_ROWS,
            ingest_ms=NOW_MS,
        ),
    )
    assert [(d.offset, d.reason, d.rows) for d in dead] == [
        (1, "truncated", 1),
        (2, "invalid_latency", 2),
    ]
    assert isinstance(dead[1], Rejected) and dead[1].detail == "2 rows rejected"
    assert state.next_offset == 4
    assert state.rejected == {"truncated": 1, "invalid_latency": 2}
    assert state.events_accepted == 6


def test_no_messages_route_to_no_groups() -> None:
    assert _route([]) == []
