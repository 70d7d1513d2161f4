"""The pure route: one partition's consumed messages -> what its state ingests.

No Kafka client here: a message is anything shaped like ``confluent_kafka.Message``
(``MessageLike``), so the message-kind switch, the per-event runs for the bulk
decoder, the marker trust check and the dead-letter reasons are unit-tested with
plain objects (tests/test_route.py). ``ingest`` feeds the ``Routed`` groups to the
state and returns what the shard sends to the dead-letter topic.

A second input topic gets its own route function beside this one (the shard maps
each input topic to its handler; docs/architecture.md, "a second input topic").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from aggregator.bulk import MIN_BULK, EventDecoder, decode_events_per_record
from aggregator.decode import EventChunkBuilder, decode_batch
from aggregator.errors import DecodeError
from aggregator.resolver import SchemaResolver
from aggregator.state import (
    REJECT_REASONS,
    Heartbeat,
    IngestResult,
    Marker,
    PartitionState,
    RowChunk,
)
from schemas.codec import MARKER_GROUP_HEADER
from schemas.wire import SchemaId

__all__ = [
    "ROWS_PER_INGEST",
    "Decoders",
    "MessageLike",
    "Rejected",
    "Routed",
    "ingest",
    "rejections",
    "route",
]

# Rows per ingest call: large enough to amortise per-call costs, small enough that
# the per-row temporaries stay in cache and memory does not grow with the batch.
ROWS_PER_INGEST = 65_536


class MessageLike(Protocol):
    """What the aggregator reads of a consumed message (``confluent_kafka.Message``).

    Methods, as librdkafka's messages expose them; ``error()`` is a ``KafkaError`` there.
    """

    def topic(self) -> str | None: ...

    # None only on an error message, which is never routed.
    def partition(self) -> int: ...

    def offset(self) -> int: ...

    def timestamp(self) -> tuple[int, int]: ...

    def key(self) -> str | bytes | None: ...

    def value(self) -> bytes | None: ...

    def headers(self) -> list[tuple[str, bytes]] | None: ...

    def error(self) -> object | None: ...


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message for the dead-letter topic: why, and how many of its rows."""

    message: MessageLike
    reason: str
    detail: str
    rows: int = 1

    @property
    def offset(self) -> int:
        return self.message.offset()

    @property
    def value(self) -> bytes | None:
        return self.message.value()


@dataclass(slots=True)
class Routed:
    """One ingest group: items in log order and the messages they came from.

    ``rejected`` are the messages that never became items (decode failures); the
    state counts them with ``count_rejected``, the shard dead-letters them.
    """

    items: list[RowChunk | Marker | Heartbeat]
    offsets: np.ndarray  # int64, one per message, ascending
    stamps: np.ndarray  # int64 ms: min(Kafka timestamp, clock at ingest)
    messages: list[MessageLike]
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def next_offset(self) -> int:
        return int(self.offsets[-1]) + 1


class Decoders:
    """The schema resolver, the bulk event decoder, and which ids are events."""

    def __init__(self, resolver: SchemaResolver, *, ids: bool = True) -> None:
        self.resolver = resolver
        self.ids = ids  # keep event id hashes of envelopes (only the label join reads them)
        self.events = EventDecoder(resolver)
        self._event_ids: dict[int, bool] = {}  # schema id -> is a PredictionEvent schema

    def event_runs(self, values: Sequence[bytes | None]) -> list[int]:
        """For each message that starts a run of at least ``MIN_BULK`` consecutive
        ``PredictionEvent`` messages, the run's length; 0 elsewhere.

        Only the 5-byte header is read; an id that does not resolve ends a run (the
        per-message path rejects it with its reason, as always).
        """
        n = len(values)
        out = [0] * n
        if n < MIN_BULK:
            return out
        event_ids = self._event_ids
        start = -1
        for i, v in enumerate(values):
            is_event = False
            if v is not None and len(v) >= 5 and v[0] == 0:
                sid = int.from_bytes(v[1:5], "big")
                known = event_ids.get(sid)
                if known is None:
                    try:
                        known = self.resolver.resolve(sid)[0] == SchemaId.PREDICTION_EVENT
                    except DecodeError:
                        known = False  # not cached: it may resolve later
                    else:
                        event_ids[sid] = known
                is_event = known
            if is_event:
                if start < 0:
                    start = i
            elif start >= 0:
                if i - start >= MIN_BULK:
                    out[start] = i - start
                start = -1
        if start >= 0 and n - start >= MIN_BULK:
            out[start] = n - start
        return out


def route(
    msgs: Sequence[MessageLike],
    decoders: Decoders,
    group_id: str,
    *,
    max_rows_per_envelope: int,
    ingest_ms: int,
    rows_per_ingest: int = ROWS_PER_INGEST,
) -> Iterator[Routed]:
    """Decode the messages of one (topic, partition), in log order, into groups of
    about ``rows_per_ingest`` rows (a group ends at the message that fills it).

    Lazily: a group is decoded only when asked for, so the caller ingests it while
    its columns are still in cache and memory stays flat however large the batch.
    ``ingest_ms`` is the clock read once for the batch: a message's stamp is
    min(its Kafka timestamp, ``ingest_ms``), since a CreateTime is whatever the sender
    wrote (``--max-future`` is checked against it; RELIABILITY.md).
    """
    n = len(msgs)
    if n == 0:
        return
    offsets = np.empty(n, dtype=np.int64)
    stamps = np.empty(n, dtype=np.int64)
    items: list[RowChunk | Marker | Heartbeat] = []
    rejected: list[Rejected] = []
    builder = EventChunkBuilder()
    read = decoders.resolver.read
    group = group_id.encode()
    values = [m.value() for m in msgs]
    kinds = decoders.event_runs(values)
    rows = 0
    start = 0  # first message of the pending group

    def cut(stop: int) -> Routed:
        nonlocal items, rejected, start, rows
        if len(builder):
            items.append(builder.build())
        out = Routed(items, offsets[start:stop], stamps[start:stop], list(msgs[start:stop]))
        out.rejected = rejected
        items, rejected, start, rows = [], [], stop, 0
        return out

    def note(i: int) -> int:
        m = msgs[i]
        off = m.offset()
        offsets[i] = off
        ts = m.timestamp()[1]
        stamps[i] = min(ts, ingest_ms) if ts >= 0 else ingest_ms
        return off

    i = 0
    while i < n:
        run = kinds[i]
        if run:
            # A run of per-event messages long enough for the bulk decoder: one numpy
            # pass instead of one fastavro call per message.
            j = i + run
            for k in range(i, j):
                note(k)
            if len(builder):
                items.append(builder.build())
            try:
                result = decoders.events.decode(values[i:j], offsets[i:j])
            except ValueError:  # not all events after all: the per-message path
                result = decode_events_per_record(values[i:j], offsets[i:j], decoders.resolver)
            if len(result.chunk):
                items.append(result.chunk)
                rows += len(result.chunk)
            for k, exc in result.rejected:
                rejected.append(Rejected(msgs[i + k], exc.reason, exc.detail))
            i = j
            if rows >= rows_per_ingest:
                yield cut(j)
            continue
        m = msgs[i]
        off = note(i)
        try:
            kind, rec = read(values[i])
            if kind == SchemaId.PREDICTION_EVENT:
                try:
                    builder.add(rec, off)
                except (KeyError, TypeError) as exc:
                    raise DecodeError("undecodable", f"bad record: {exc}") from None
                rows += 1
            else:
                if len(builder):
                    items.append(builder.build())
                if kind == SchemaId.PREDICTION_BATCH:
                    chunk = decode_batch(rec, off, max_rows_per_envelope, ids=decoders.ids)
                    items.append(chunk)
                    rows += len(chunk)
                elif kind == SchemaId.RESOURCE_HEARTBEAT:
                    items.append(Heartbeat(off, rec))
                elif kind == SchemaId.WATERMARK_MARKER:
                    marker = _trusted_marker(m, rec, off, group)
                    if marker is not None:
                        items.append(marker)
                else:
                    raise DecodeError("unexpected_schema", f"schema kind {kind} on the input topic")
        except DecodeError as exc:
            rejected.append(Rejected(m, exc.reason, exc.detail))
        i += 1
        if rows >= rows_per_ingest:
            yield cut(i)
    if start < n:
        yield cut(n)


def _trusted_marker(m: MessageLike, rec: dict[str, Any], off: int, group: bytes) -> Marker | None:
    """A marker written by a shard of this group; None for another group's marker.

    Anyone can produce to the input topic, so a marker without the group header is
    rejected (``untrusted_marker``) rather than allowed to close windows.
    """
    origin = dict(m.headers() or ()).get(MARKER_GROUP_HEADER)
    if origin == group:
        return Marker(off, int(rec["event_time_ms"]))
    if origin is None:
        raise DecodeError(
            "untrusted_marker",
            f"watermark marker (origin {rec.get('origin')!r}) without the "
            f"{MARKER_GROUP_HEADER} header that this group's shards write",
        )
    return None  # another aggregator group's marker, not for us


def rejections(group: Routed, result: IngestResult) -> list[Rejected]:
    """The messages some of whose rows the state rejected: one letter per message,
    with the reason of its first rejected row and how many rows were rejected."""
    if not result.offsets.size:
        return []
    uniq, first, counts = np.unique(result.offsets, return_index=True, return_counts=True)
    at = np.searchsorted(group.offsets, uniq).tolist()
    return [
        Rejected(
            group.messages[k], REJECT_REASONS[int(result.reasons[idx])], f"{c} rows rejected", c
        )
        for k, idx, c in zip(at, first.tolist(), counts.tolist(), strict=True)
    ]


def ingest(state: PartitionState, groups: Iterable[Routed]) -> list[Rejected]:
    """Feed routed groups to the state, in order; returns what to dead-letter.

    Decode failures are counted here (``count_rejected``), rows the state rejects
    are counted by the state itself; both come back in log order per group.
    """
    dead: list[Rejected] = []
    for g in groups:
        for r in g.rejected:
            state.count_rejected(r.reason)
        result = state.ingest(g.items, g.offsets, g.stamps, next_offset=g.next_offset)
        dead += g.rejected
        dead += rejections(g, result)
    return dead
