"""A shard's owned partitions as Kafka sees them: consume errors, idle markers, lag.

Keyed by ``TopicPartitionKey``; the exported health gauges carry the partition
number only (one input topic so far; a second one adds a ``topic`` label there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from aggregator.deadletters import Coordinates, DeadLetters
from aggregator.edge import TopicPartitionKey
from aggregator.metrics import ShardHealth
from aggregator.resolver import SchemaResolver
from aggregator.settings import AggregatorSettings
from aggregator.snapshots import Snapshots
from aggregator.state import PartitionState, StateView
from schemas.codec import MARKER_GROUP_HEADER, encode_marker
from schemas.registry import RegistryError
from schemas.wire import SchemaId

__all__ = ["UNREADABLE", "FetchErrors", "IdleMarkers", "Owned", "split_batch", "update_lag"]

log = logging.getLogger("modelpulse.aggregator")

# A partition whose fetch fails this many times in a row at one offset, over at least
# _STUCK_SECONDS, is stuck; a message-level error there is skipped to the DLQ.
_STUCK_ERRORS = 5
_STUCK_SECONDS = 2.0
UNREADABLE = {
    KafkaError._BAD_COMPRESSION: "undecompressable",
    KafkaError._BAD_MSG: "unreadable",
    2: "unreadable",  # CORRUPT_MESSAGE: a broker-side CRC or format error
}


class FetchErrors:
    """Per-partition consume errors; skips a message that can never be read.

    librdkafka reports a fetch it cannot decode (e.g. ``_BAD_COMPRESSION`` for a
    message that decompresses beyond receive.message.max.bytes) on every fetch and
    never moves on. After ``_STUCK_ERRORS`` in a row at one offset the partition is
    reported stuck (log, /healthz, ``modelpulse_partition_stuck``); if the error is
    about the message itself, the message is dead-lettered by its coordinates (its
    value is unavailable) and the partition resumes after it.
    """

    def __init__(
        self,
        consumer: Consumer,
        dead_letters: DeadLetters,
        health: ShardHealth,
        on_change: Callable[[], None],
    ) -> None:
        self._consumer = consumer
        self._dead_letters = dead_letters
        self._health = health
        self._on_change = on_change
        # key -> (offset, consecutive errors there, first of them, last error)
        self.pending: dict[TopicPartitionKey, tuple[int, int, float, KafkaError]] = {}

    def record(
        self,
        key: TopicPartitionKey | None,
        off: int | None,
        err: KafkaError,
        state: PartitionState | None,
    ) -> None:
        """One consume error at ``off`` of ``key`` (None: not about a partition)."""
        if key is None or state is None or off is None or off < 0:
            log.warning("consume error: %s", err)
            return
        topic, p = key
        now = time.monotonic()
        at, n, since, _last = self.pending.get(key, (off, 0, now, err))
        if at != off:
            at, n, since = off, 0, now
        n += 1
        self.pending[key] = (at, n, since, err)
        if n < _STUCK_ERRORS or now - since < _STUCK_SECONDS:
            log.warning("consume error on partition %d at offset %d: %s", p, off, err)
            return
        if self._health.stuck_partitions.get(p) != 1:
            log.error(
                "partition %d stuck at offset %d: %d errors in %.1f s: %s",
                p,
                off,
                n,
                now - since,
                err,
            )
            self._health.stuck_partitions[p] = 1
            self._on_change()
        reason = UNREADABLE.get(err.code())
        if reason is None:
            return  # not the message's fault (authorization, a deleted topic...): report only
        skip = max(off, state.next_offset)
        detail = f"offset {skip} unreadable after {n} fetches: {err.name()}: {err.str()}"
        log.error("partition %d: dead-lettering offset %d (%s) and moving on", p, skip, reason)
        self._dead_letters.send(Coordinates(topic, p, skip), reason, detail, 1, unreadable=True)
        state.count_rejected(reason)
        state.next_offset = skip + 1
        try:
            self._consumer.seek(TopicPartition(topic, p, skip + 1))
        except KafkaException as exc:  # the next errors find it again
            log.warning("partition %d: seek past offset %d failed: %s", p, skip, exc)
        self.clear(key)

    def clear(self, key: TopicPartitionKey) -> None:
        """The partition delivered a message (or is gone): not stuck any more."""
        self.pending.pop(key, None)
        if self._health.stuck_partitions.pop(key.partition, None):
            log.info("partition %d moves again", key.partition)
            self._on_change()


def split_batch(
    msgs: list[Message],
    states: Mapping[TopicPartitionKey, PartitionState],
    errors: FetchErrors,
    topics: Sequence[str],
) -> tuple[dict[TopicPartitionKey, list[Message]], int]:
    """A consumed batch's new messages per owned partition, and their value bytes.

    ``topics`` are the subscribed input topics. Error messages go to ``errors``;
    what a state already holds (a seek can re-deliver) and partitions not owned (any
    more) are skipped.
    """
    # With one input topic every message is from it: no topic() call per message.
    only = topics[0] if len(topics) == 1 else None
    by_key: dict[tuple[str, int], list[Message]] = {}
    nbytes = 0
    pending = errors.pending
    for m in msgs:
        err = m.error()
        p = m.partition()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                key = None if p is None else TopicPartitionKey(m.topic() or topics[0], p)
                errors.record(key, m.offset(), err, None if key is None else states.get(key))
            continue
        # A plain tuple: it finds the TopicPartitionKey entries (equal, same hash) and
        # is cheaper to build per message than the NamedTuple.
        tp = (only or m.topic(), p)
        if tp in pending:
            errors.clear(TopicPartitionKey(*tp))
        state = states.get(tp)  # type: ignore[call-overload]
        if state is None or m.offset() < state.next_offset:
            continue
        nbytes += len(m)
        by_key.setdefault(tp, []).append(m)
    return {TopicPartitionKey(*tp): ms for tp, ms in by_key.items()}, nbytes


class IdleMarkers:
    """Appends a watermark marker to owned partitions idle longer than idle_timeout,
    so their windows close (it goes through the log: replays see it too)."""

    def __init__(self, settings: AggregatorSettings, resolver: SchemaResolver, producer: Any):
        self._settings = settings
        self._resolver = resolver
        self._producer = producer
        self._advanced: dict[TopicPartitionKey, tuple[int, float]] = {}  # (max event, when)

    def reset(self, key: TopicPartitionKey, state: PartitionState) -> None:
        self._advanced[key] = (state.max_event_ms, time.monotonic())

    def drop(self, key: TopicPartitionKey) -> None:
        self._advanced.pop(key, None)

    def tick(
        self, states: Mapping[TopicPartitionKey, PartitionState], lag: Mapping[int, int]
    ) -> None:
        s = self._settings
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        idle_ms = s.idle_timeout_ms
        for key, state in states.items():
            p = key.partition
            seen, since = self._advanced.get(key, (state.max_event_ms, now))
            if state.max_event_ms != seen:
                self._advanced[key] = (state.max_event_ms, now)
                continue
            if (now - since) * 1000 < idle_ms or lag.get(p, 0) > 0:
                continue
            marker_ms = now_ms - idle_ms
            self._advanced[key] = (seen, now)  # at most one marker per idle period
            if marker_ms <= state.max_event_ms:
                continue
            try:
                marker_id = self._resolver.writer_id(SchemaId.WATERMARK_MARKER)
            except RegistryError as exc:  # retried at the next idle period
                log.warning("partition %d idle: no watermark marker (%s)", p, exc)
                continue
            body = encode_marker(marker_ms, s.shard_id, marker_id)
            self._producer.produce(
                key.topic,
                body,
                None,
                partition=p,
                headers=[(MARKER_GROUP_HEADER, s.group_id.encode())],
            )
            log.debug("partition %d idle: watermark marker at %d", p, marker_ms)


def update_lag(
    consumer: Consumer,
    states: Mapping[TopicPartitionKey, PartitionState],
    snapshotted: Mapping[TopicPartitionKey, tuple[int, float]],
    health: ShardHealth,
) -> None:
    """Consumer lag and snapshot age per partition, into the health gauges."""
    for key, state in states.items():
        try:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(key.topic, key.partition), cached=True
            )
        except KafkaException:
            continue
        if high >= 0 and state.next_offset >= 0:
            health.lag[key.partition] = max(0, high - state.next_offset)
        elif high >= 0:
            health.lag[key.partition] = high
    now = time.monotonic()
    for key, (_v, when) in snapshotted.items():
        health.snapshot_age_seconds[key.partition] = now - when


class Owned:
    """The partitions a shard owns, by (topic, partition): their states and the
    bookkeeping that goes with them (last snapshot, idle markers, health gauges)."""

    def __init__(self, snapshots: Snapshots, markers: IdleMarkers, health: ShardHealth) -> None:
        self.states: dict[TopicPartitionKey, PartitionState] = {}
        self._snapshots = snapshots
        self._markers = markers
        self._health = health

    def take(
        self,
        partitions: list[TopicPartition],
        restored: Mapping[TopicPartitionKey, PartitionState],
    ) -> None:
        """Own the restored states; points each ``TopicPartition`` at its next offset."""
        for tp in partitions:
            key = TopicPartitionKey(tp.topic, tp.partition)
            state = restored[key]
            # No snapshot means nothing was ever committed for it either (we commit only
            # after a snapshot), so the start of the log is the exact place to begin.
            tp.offset = state.next_offset if state.next_offset >= 0 else OFFSET_BEGINNING
            self.states[key] = state
            self._snapshots.snapshotted[key] = (state.version, time.monotonic())
            self._markers.reset(key, state)

    def drop(self, keys: list[TopicPartitionKey]) -> None:
        for key in keys:
            self.states.pop(key, None)
            self._snapshots.snapshotted.pop(key, None)
            self._markers.drop(key)
            self._health.lag.pop(key.partition, None)
            self._health.snapshot_age_seconds.pop(key.partition, None)

    def versions(self) -> tuple[tuple[TopicPartitionKey, int], ...]:
        return tuple(sorted((k, st.version) for k, st in self.states.items()))

    def views(self) -> list[StateView]:
        return [self.states[k].view() for k in sorted(self.states)]
