"""One aggregator shard: the consume loop, rebalances, snapshots, dead letters, markers.

This is the thin I/O edge around the pure core (decode -> state -> metrics ->
exposition). Offsets live with the state: every ``snapshot_interval`` each owned
partition's state, including its ``next_offset``, is written as one record to the
compacted state topic (same partition number as the input), the broker's ack is
awaited, and only then is ``next_offset`` committed to the group. A shard that gets
a partition restores its latest snapshot and seeks to its ``next_offset``, so a
SIGKILL loses nothing and counts nothing twice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from aggregator.bulk_decode import MIN_BULK, EventDecoder, decode_events_per_record
from aggregator.decode import (
    EventChunkBuilder,
    Heartbeat,
    Marker,
    RowChunk,
    SchemaResolver,
    decode_batch,
)
from aggregator.errors import AggregatorError, ConfigMismatch, DecodeError
from aggregator.exposition import LabelCache, render_payload
from aggregator.metrics import ShardHealth, build_families
from aggregator.references import ReferenceReader, TrainingReference
from aggregator.server import MetricsServer
from aggregator.settings import AggregatorSettings
from aggregator.state import REJECT_REASONS, PartitionState, StateView
from aggregator.webconfig import load_web_config
from schemas.codec import MARKER_GROUP_HEADER, encode_marker
from schemas.registry import RegistryError
from schemas.wire import SchemaId

__all__ = ["Shard"]

log = logging.getLogger("modelpulse.aggregator")

_STATE_MAX_BYTES = 64 * 1024 * 1024
# Rows per ingest call: large enough to amortise per-call costs, small enough that
# the per-row temporaries stay in cache and memory does not grow with the batch.
_ROWS_PER_INGEST = 65_536
# Message bytes per consumed batch (see Shard.process_batch).
_BATCH_BYTES = 16 * 1024 * 1024
# A dead letter's value is cut to the dead-letter topic's limit minus this much room
# for the key, the headers and the record batch around it.
_DEAD_LETTER_ROOM = 16 * 1024
_BROKER_DEFAULT_MAX_BYTES = 1_048_588
# A partition whose fetch fails this many times in a row at one offset, over at least
# _STUCK_SECONDS, is stuck; a message-level error there is skipped to the DLQ.
_STUCK_ERRORS = 5
_STUCK_SECONDS = 2.0
_UNREADABLE = {
    KafkaError._BAD_COMPRESSION: "undecompressable",
    KafkaError._BAD_MSG: "unreadable",
    2: "unreadable",  # CORRUPT_MESSAGE: a broker-side CRC or format error
}
# Header that marks a watermark marker as written by a shard of this group.
MARKER_HEADER = MARKER_GROUP_HEADER
# SIGTERM to exit: final dead letters + snapshot, leaving the group, last flush.
# SIGTERM to exit: a periodic snapshot in progress, the final dead letters and
# snapshot, leaving the group and a last flush each have their own timeout.
_SNAPSHOT_SECONDS = 10.0
_FINAL_SNAPSHOT_SECONDS = 10.0
_CLOSE_SECONDS = 8.0
_FINAL_FLUSH_SECONDS = 2.0
# The references reader is told to stop first and polls in 0.2 s steps, so this wait
# normally finds it done; it is not part of the bound below for that reason.
_REFERENCES_CLOSE_SECONDS = 1.0
_REFERENCES_START_SECONDS = 10.0
SHUTDOWN_BOUND_SECONDS = (
    _SNAPSHOT_SECONDS + _FINAL_SNAPSHOT_SECONDS + _CLOSE_SECONDS + _FINAL_FLUSH_SECONDS
)


def _snapshot_key(topic: str, partition: int) -> bytes:
    return f"{topic}/{partition}".encode()


class _Stopping(Exception):
    """Raised inside a restore when the shard is asked to stop meanwhile."""


@dataclasses.dataclass
class _DeadLetter:
    """One dead letter as produced, kept until the broker has acknowledged it."""

    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    attempts: int = 0

    def truncated(self, limit: int) -> _DeadLetter:
        """The same letter with its value cut to ``limit`` bytes, marked as cut."""
        size = len(self.value or b"")
        if any(k == "modelpulse.truncated" for k, _ in self.headers):
            headers = self.headers
        else:
            headers = [
                *self.headers,
                ("modelpulse.truncated", b"true"),
                ("modelpulse.original.size", str(size).encode()),
            ]
        value = self.value[: max(0, limit)] if self.value else self.value
        return _DeadLetter(value, self.key, headers, self.attempts)


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    """Where a message is that could not be fetched (stands in for the Message)."""

    _topic: str
    _partition: int
    _offset: int

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> None:
        return None

    def key(self) -> None:
        return None


class _Renderer(threading.Thread):
    """Builds and renders /metrics off the consume path; the newest request wins."""

    def __init__(self, shard: Shard) -> None:
        super().__init__(name="modelpulse-render", daemon=True)
        self._shard = shard
        self._pending: tuple[list[StateView], ShardHealth, int | None] | None = None
        self._cond = threading.Condition()
        self._cache = LabelCache()
        self.renders = 0
        self.last_seconds = 0.0

    def submit(self, views: list[StateView], health: ShardHealth, clears: int | None) -> None:
        """Render these views next; once served, lift the /metrics refusal ``clears``."""
        with self._cond:
            self._pending = (views, health, clears)
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                views, health, clears = self._pending
                self._pending = None
            start = time.perf_counter()
            try:
                families = build_families(
                    views,
                    self._shard.config,
                    health,
                    max_series=self._shard.settings.max_series,
                    references=self._shard.training_references(),
                )
                payload = render_payload(families, self._cache)
                self._shard.server.set_payload(payload.body, payload.gzip_body)
                if clears is not None:
                    self._shard._lift_refusal(clears)
            except Exception:
                log.exception("render failed")
            self.last_seconds = time.perf_counter() - start
            self.renders += 1


class Shard:
    """An aggregator process: owns some partitions of the input topic.

    >>> Shard(AggregatorSettings(http_port=9464)).run()  # doctest: +SKIP
    """

    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = s = settings
        self.config = s.state_config()
        self.states: dict[int, PartitionState] = {}
        self.resolver = SchemaResolver(s.schema_registry())
        self._events = EventDecoder(self.resolver)
        self._event_ids: dict[int, bool] = {}  # schema id -> is a PredictionEvent schema
        self.health = ShardHealth(up_since=time.time())
        self.server = MetricsServer(s.http_host, s.http_port)
        if s.web_config_file:  # TLS and basic auth whoever builds the shard
            self.server.use_web_config(load_web_config(s.web_config_file))
        self._stop = threading.Event()
        self._renderer = _Renderer(self)
        self._snapshotted: dict[int, tuple[int, float]] = {}  # partition -> (version, time)
        self._advanced: dict[int, tuple[int, float]] = {}  # partition -> (max event, when)
        self._rendered_versions: tuple[tuple[int, int], ...] = ()
        self._fatal: Exception | None = None
        self._force_render = True
        self._last_render = 0.0
        self._last_snapshot = time.monotonic()
        self._delivery_errors = 0
        self._unacked_dead_letters: list[_DeadLetter] = []  # refused or failed: produce again
        self._dead_letters_stalled = False  # some could not be written: /healthz says so
        self._dead_letter_max_bytes = _BROKER_DEFAULT_MAX_BYTES  # the DLQ's, see ensure_topics
        # partition -> (offset, consecutive errors there, first of them, last error)
        self._fetch_errors: dict[int, tuple[int, int, float, KafkaError]] = {}
        self._closing = False
        self.close_timed_out = False  # the entry point then exits without waiting on it
        self._last_poll: float | None = None
        self._gap_since: float | None = None  # a frozen loop seen; waiting for the group
        self._rebalanced = False
        self._refusal = 0  # generation of the current /metrics refusal (see _refuse)
        self._refusal_lock = threading.Lock()
        self.batch_limit = s.batch_size  # messages per consume(); adapted to their size
        base = s.kafka_config()
        consumer_conf = {
            **base,
            "group.id": s.group_id,
            "client.id": f"modelpulse-{s.shard_id}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # The default 1 s backoff stalls a fast consumer (docs/architecture.md, figures).
            "fetch.queue.backoff.ms": 20,
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            # Bound librdkafka's prefetch (default 64 MiB) so memory does not scale with
            # how far behind the shard is.
            "queued.max.messages.kbytes": 16 * 1024,
            **s.kafka,
        }
        self.consumer = Consumer(consumer_conf, logger=log)
        session_s = float(consumer_conf["session.timeout.ms"]) / 1000
        heartbeat_s = float(consumer_conf["heartbeat.interval.ms"]) / 1000
        # Heartbeats stop only when the whole process stops (SIGSTOP, a VM pause), and
        # the loop then stops too: a loop silent this long may have lost its partitions.
        self._poll_gap_limit = max(1.0, session_s - 2 * heartbeat_s)
        # Long enough for a heartbeat to answer and librdkafka to report a lost session.
        self._confirm_seconds = max(3.0, 3 * heartbeat_s)
        self.server.watch_loop(self._poll_gap_limit)
        self.producer = Producer(
            {
                **base,
                "client.id": f"modelpulse-{s.shard_id}-out",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.max.bytes": _STATE_MAX_BYTES,
                "compression.type": "lz4",
                **s.kafka,
            },
            logger=log,
        )
        self._restore_conf = {
            **base,
            "group.id": f"{s.group_id}-restore",
            "enable.auto.commit": False,
            "fetch.max.bytes": _STATE_MAX_BYTES * 2,
            "max.partition.fetch.bytes": _STATE_MAX_BYTES * 2,
            **s.kafka,
        }
        self._admin = AdminClient({**base, "logger": log})
        self._references = (
            ReferenceReader(
                s.reference_topic,
                {**base, "client.id": f"modelpulse-{s.shard_id}-references", **s.kafka},
                self.config,
                s.schema_registry(),
                group_id=f"{s.group_id}-references",
            )
            if s.reference_topic
            else None
        )

    # -- topics ------------------------------------------------------------------------

    def ensure_topics(self, wait_seconds: float = 60.0) -> int:
        """Wait for the input topic; create the state and dead-letter topics if missing."""
        s = self.settings
        deadline = time.monotonic() + wait_seconds
        while True:
            md = self._admin.list_topics(timeout=10)
            topic = md.topics.get(s.input_topic)
            if topic is not None and topic.error is None and topic.partitions:
                partitions = len(topic.partitions)
                break
            if time.monotonic() > deadline:
                raise AggregatorError(f"input topic {s.input_topic!r} does not exist")
            log.info("waiting for topic %s", s.input_topic)
            time.sleep(1.0)
        wanted = {
            s.state_topic: NewTopic(
                s.state_topic,
                num_partitions=partitions,
                config={
                    "cleanup.policy": "compact",
                    "max.message.bytes": str(_STATE_MAX_BYTES),
                    "min.cleanable.dirty.ratio": "0.1",
                    "segment.ms": "600000",
                },
            ),
            # Every message the input takes must fit as a dead letter.
            s.dead_letter_topic: NewTopic(
                s.dead_letter_topic,
                num_partitions=partitions,
                config={"max.message.bytes": str(self._max_message_bytes(s.input_topic))},
            ),
        }
        missing = [t for name, t in wanted.items() if name not in md.topics]
        if missing:
            for name, fut in self._admin.create_topics(missing).items():
                try:
                    fut.result()
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
                    log.debug("topic %s created concurrently", name)
        have = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a topic just created shows up in steps
            md = self._admin.list_topics(s.state_topic, timeout=10)
            found = md.topics.get(s.state_topic)
            have = len(found.partitions) if found is not None and found.error is None else 0
            if have == partitions:
                break
            time.sleep(0.2)
        if have != partitions:
            raise AggregatorError(
                f"state topic {s.state_topic!r} has {have} partitions but input topic "
                f"{s.input_topic!r} has {partitions}: they must be co-partitioned"
            )
        self._dead_letter_max_bytes = min(
            self._max_message_bytes(s.dead_letter_topic), _STATE_MAX_BYTES
        )
        log.info(
            "dead letters over %d bytes are truncated to fit %s",
            self._dead_letter_max_bytes - _DEAD_LETTER_ROOM,
            s.dead_letter_topic,
        )
        return partitions

    def _max_message_bytes(self, topic: str) -> int:
        """The topic's max.message.bytes, or the broker default if it cannot be read."""
        resource = ConfigResource(ResourceType.TOPIC, topic)
        deadline = time.monotonic() + 30
        while True:
            try:
                configs = self._admin.describe_configs([resource])[resource].result(timeout=10)
                return int(configs["max.message.bytes"].value)
            except (KafkaException, KeyError, ValueError) as exc:
                # A topic just created answers "unknown" for a moment.
                if time.monotonic() > deadline:
                    log.warning(
                        "max.message.bytes of %s unreadable (%s); assuming %d",
                        topic,
                        exc,
                        _BROKER_DEFAULT_MAX_BYTES,
                    )
                    return _BROKER_DEFAULT_MAX_BYTES
                time.sleep(0.5)

    # -- rebalance ---------------------------------------------------------------------

    def _read_snapshot(self, reader: Consumer, p: int) -> bytes | None:
        """The latest snapshot record of partition ``p`` (the last record of its state
        partition, since only p's owner writes there), or None if there is none."""
        tp = TopicPartition(self.settings.state_topic, p)
        low, high = reader.get_watermark_offsets(tp, timeout=10)
        if high <= low:
            return None
        reader.assign([TopicPartition(self.settings.state_topic, p, high - 1)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._stop.is_set():
                raise _Stopping
            msg = reader.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                raise KafkaException(err)
            value: bytes | None = msg.value()
            return value
        raise AggregatorError(f"timed out reading the snapshot of partition {p}")

    def _restore(self, partitions: list[int]) -> dict[int, PartitionState]:
        s = self.settings
        restored: dict[int, PartitionState] = {}
        reader = Consumer(self._restore_conf, logger=log)
        try:
            for p in partitions:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        value = self._read_snapshot(reader, p)
                        break
                    except KafkaException as exc:
                        # A topic just created, a leader moving: retriable for a while.
                        if self._stop.is_set():
                            raise _Stopping from exc
                        if time.monotonic() > deadline:
                            raise AggregatorError(
                                f"partition {p}: snapshot unreadable: {exc}"
                            ) from exc
                        log.info("partition %d: snapshot not readable yet (%s), retrying", p, exc)
                        time.sleep(0.5)
                state: PartitionState | None = None
                if value is not None:
                    try:
                        state = PartitionState.from_bytes(value, self.config)
                    except ConfigMismatch:
                        if not s.rebuild_state:
                            raise
                        log.warning("partition %d: config changed, rebuilding state", p)
                        state = None
                if state is None:
                    state = PartitionState(self.config, p)
                restored[p] = state
                log.info(
                    "partition %d: %s, next offset %d",
                    p,
                    "restored snapshot" if state.next_offset >= 0 else "fresh state",
                    state.next_offset,
                )
        finally:
            reader.close()
        return restored

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.server.set_ready(False, "restoring partitions")
        mine = [tp.partition for tp in partitions if tp.topic == self.settings.input_topic]
        try:
            restored = self._restore(mine)
        except _Stopping:
            # Stopping anyway: take the partitions without state (nothing is counted or
            # snapshotted for them) so that leaving the group is not held up by a restore.
            log.info("stopping: partitions %s assigned without restoring", mine)
            consumer.incremental_assign(partitions)
            return
        except Exception as exc:
            log.error("restore failed: %s", exc)
            self.server.set_healthy(False, f"restore failed: {exc}")
            self._fatal = exc
            self._stop.set()
            consumer.incremental_assign(partitions)
            return
        for tp in partitions:
            state = restored[tp.partition]
            # No snapshot means nothing was ever committed for it either (we commit only
            # after a snapshot), so the start of the log is the exact place to begin.
            tp.offset = state.next_offset if state.next_offset >= 0 else OFFSET_BEGINNING
            self.states[tp.partition] = state
            self._snapshotted[tp.partition] = (state.version, time.monotonic())
            self._advanced[tp.partition] = (state.max_event_ms, time.monotonic())
        consumer.incremental_assign(partitions)
        self._force_render = True
        self._rebalanced = True
        self._last_poll = time.monotonic()  # a long restore is not a frozen loop
        self.server.loop_alive(self._last_poll)
        self.server.set_ready(True)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = [tp.partition for tp in partitions if tp.partition in self.states]
        # The next owner may serve them as soon as this returns: stop serving them now.
        self._refuse("partitions moving to another shard")
        if not self._closing:  # on shutdown the final snapshot was just written
            try:
                self._snapshot(gone, force=True, timeout=_FINAL_SNAPSHOT_SECONDS)
            except Exception as exc:  # the next owner replays from the previous snapshot
                log.warning("final snapshot on revoke failed: %s", exc)
        self._drop(gone)
        self._rebalanced = True
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another shard may own them already: writing a snapshot now could go back in time.
        self._refuse("partitions lost to another shard")
        log.warning("partitions %s lost (session expired)", [tp.partition for tp in partitions])
        self._drop([tp.partition for tp in partitions])
        self._rebalanced = True
        consumer.incremental_unassign(partitions)

    def _drop(self, partitions: list[int]) -> None:
        for p in partitions:
            self.states.pop(p, None)
            self._snapshotted.pop(p, None)
            self._advanced.pop(p, None)
            self.health.lag.pop(p, None)
            self.health.snapshot_age_seconds.pop(p, None)
        self._force_render = True

    # -- snapshots ---------------------------------------------------------------------

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._delivery_errors += 1
            log.error("snapshot delivery failed: %s", err)

    def _snapshot(
        self, partitions: list[int] | None = None, *, force: bool = False, timeout: float = 30.0
    ) -> None:
        """Write snapshots of changed partitions, wait for the acks, then commit offsets.

        The dead letters produced so far are acknowledged first: a snapshot moves
        ``next_offset`` past their messages, so it must not exist before they do.
        """
        s = self.settings
        deadline = time.monotonic() + timeout
        self._settle_dead_letters(deadline)
        now = time.monotonic()
        todo = []
        for p in partitions if partitions is not None else list(self.states):
            state = self.states.get(p)
            if state is None or state.next_offset < 0:
                continue
            if not force and self._snapshotted.get(p, (-1, 0.0))[0] == state.version:
                self._snapshotted[p] = (state.version, now)  # unchanged: still current
                continue
            todo.append(state)
        if not todo:
            return
        self._delivery_errors = 0
        for state in todo:
            value = state.to_bytes()
            self.producer.produce(
                s.state_topic,
                value,
                _snapshot_key(s.input_topic, state.partition),
                partition=state.partition,
                on_delivery=self._delivered,
            )
        left = self.producer.flush(max(0.0, deadline - time.monotonic()))
        if left or self._delivery_errors:
            raise AggregatorError(
                f"snapshots not acknowledged ({left} in flight); offsets not committed"
            )
        offsets = [TopicPartition(s.input_topic, st.partition, st.next_offset) for st in todo]
        # The snapshot is what a new owner resumes from; the group's offsets only inform
        # lag tools, so a commit never waits (a synchronous one can block a rebalance
        # or a shutdown for as long as the coordinator does not answer).
        self.consumer.commit(offsets=offsets, asynchronous=True)
        for state in todo:
            self._snapshotted[state.partition] = (state.version, now)

    # -- the loop ----------------------------------------------------------------------

    def _process(self, partition: int, state: PartitionState, msgs: list[Message]) -> None:
        """Decode a partition's messages and ingest them in groups of bounded rows.

        Groups keep the numpy temporaries cache-sized and memory flat however large
        the consumed batch; the state does not depend on where groups are cut.

        ``--max-future`` is measured against min(Kafka timestamp, this shard's clock at
        ingest): a CreateTime timestamp is whatever the sender wrote, the clock is not.
        The clock is read once per call and only ever lowers the bound, so a replay
        decides as the first pass did except for an event that was further ahead than
        ``max_future`` then and is not any more when replayed (RELIABILITY.md).
        """
        items: list[RowChunk | Marker | Heartbeat] = []
        builder = EventChunkBuilder()
        by_offset: dict[int, Message] = {}
        offsets = np.empty(len(msgs), dtype=np.int64)
        stamps = np.empty(len(msgs), dtype=np.int64)
        dead: list[tuple[Message, str, str, int]] = []
        read = self.resolver.read
        rows = 0
        ingest_ms = int(time.time() * 1000)
        group = self.settings.group_id.encode()

        def flush(filled: int) -> None:
            """Ingest what is pending; ``filled`` messages of ``offsets`` are set so far."""
            if len(builder):
                items.append(builder.build())
            result = state.ingest(
                items, offsets[:filled], stamps[:filled], next_offset=int(offsets[filled - 1]) + 1
            )
            items.clear()
            if result.offsets.size:
                uniq, first, counts = np.unique(
                    result.offsets, return_index=True, return_counts=True
                )
                for off, idx, n in zip(uniq.tolist(), first.tolist(), counts.tolist(), strict=True):
                    reason = REJECT_REASONS[int(result.reasons[idx])]
                    dead.append((by_offset[off], reason, f"{n} rows rejected", n))

        def note(i: int, m: Message) -> int:
            off: int = m.offset()
            offsets[i] = off
            _kind, ts = m.timestamp()
            stamps[i] = min(ts, ingest_ms) if ts >= 0 else ingest_ms
            by_offset[off] = m
            return off

        values = [m.value() for m in msgs]
        kinds = self._event_runs(values)
        n = len(msgs)
        i = 0
        while i < n:
            run = kinds[i]
            if run:
                # A run of per-event messages long enough for the bulk decoder: one
                # numpy pass instead of one fastavro call per message.
                j = i + run
                for k in range(i, j):
                    note(k, msgs[k])
                if len(builder):
                    items.append(builder.build())
                try:
                    result = self._events.decode(values[i:j], offsets[i:j])
                except ValueError:  # not all events after all: the per-message path
                    result = decode_events_per_record(values[i:j], offsets[i:j], self.resolver)
                if len(result.chunk):
                    items.append(result.chunk)
                    rows += len(result.chunk)
                for k, exc in result.rejected:
                    state.count_rejected(exc.reason)
                    dead.append((msgs[i + k], exc.reason, exc.detail, 1))
                i = j
                if rows >= _ROWS_PER_INGEST:
                    flush(j)
                    rows = 0
                continue
            m = msgs[i]
            off = note(i, m)
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
                        chunk = decode_batch(rec, off, state.config.max_rows_per_envelope)
                        items.append(chunk)
                        rows += len(chunk)
                    elif kind == SchemaId.RESOURCE_HEARTBEAT:
                        items.append(Heartbeat(off, rec))
                    elif kind == SchemaId.WATERMARK_MARKER:
                        origin = dict(m.headers() or ()).get(MARKER_HEADER)
                        if origin == group:
                            items.append(Marker(off, int(rec["event_time_ms"])))
                        elif origin is None:
                            raise DecodeError(
                                "untrusted_marker",
                                f"watermark marker (origin {rec.get('origin')!r}) without the "
                                f"{MARKER_HEADER} header that this group's shards write",
                            )
                        # else: another aggregator group's marker, not for us
                    else:
                        raise DecodeError(
                            "unexpected_schema", f"schema kind {kind} on the input topic"
                        )
            except DecodeError as exc:
                state.count_rejected(exc.reason)
                dead.append((m, exc.reason, exc.detail, 1))
            i += 1
            if rows >= _ROWS_PER_INGEST:
                flush(i)
                rows = 0
        flush(len(msgs))
        for m, reason, detail, n in dead:
            self._dead_letter(m, reason, detail, n)

    def _event_runs(self, values: list[bytes | None]) -> list[int]:
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

    def _dead_letter(
        self,
        m: Message | _Unreadable,
        reason: str,
        detail: str,
        rows: int,
        *,
        unreadable: bool = False,
    ) -> None:
        """Send a message to the dead-letter topic with why and where it came from.

        ``unreadable``: the message could not be fetched, so the letter has no value,
        only its coordinates.
        """
        headers = [
            ("modelpulse.reason", reason.encode()),
            ("modelpulse.detail", detail[:500].encode()),
            ("modelpulse.source.topic", (m.topic() or "").encode()),
            ("modelpulse.source.partition", str(m.partition()).encode()),
            ("modelpulse.source.offset", str(m.offset()).encode()),
            ("modelpulse.rows", str(rows).encode()),
        ]
        letter = _DeadLetter(None, None, headers)
        if not unreadable:
            letter = _DeadLetter(m.value(), m.key(), headers)
            room = self._dead_letter_room(letter)
            if len(letter.value or b"") > room:
                letter = letter.truncated(room)
                self.health.dead_letters_truncated += 1
                log.warning(
                    "dead letter of %s[%d]@%d (%s) truncated to %d bytes to fit %s",
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    reason,
                    room,
                    self.settings.dead_letter_topic,
                )
        self._produce_dead_letter(letter)
        self.health.dead_letter_messages += 1

    def _dead_letter_room(self, letter: _DeadLetter) -> int:
        extra = len(letter.key or b"") + sum(len(k) + len(v) + 8 for k, v in letter.headers)
        return max(0, self._dead_letter_max_bytes - _DEAD_LETTER_ROOM - extra)

    def _produce_dead_letter(self, letter: _DeadLetter) -> None:
        """Produce one dead letter; a refusal puts it back in ``_unacked_dead_letters``."""
        letter.attempts += 1

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._dead_letter_failed(letter, err)

        while True:
            try:
                self.producer.produce(
                    self.settings.dead_letter_topic,
                    letter.value,
                    letter.key,
                    headers=letter.headers,
                    on_delivery=delivered,
                )
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:  # e.g. larger than the producer's own limit
                self._dead_letter_failed(letter, exc.args[0])
                return

    def _dead_letter_failed(self, letter: _DeadLetter, err: KafkaError) -> None:
        self.health.dead_letter_failures += 1
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and letter.value:
            # The topic's limit is smaller than we read (or the batch around the letter
            # is larger): keep only the headers, which always fit.
            letter = letter.truncated(0)
            self.health.dead_letters_truncated += 1
        log.error(
            "dead letter (%s) not written (attempt %d): %s; retrying before the next snapshot",
            dict(letter.headers).get("modelpulse.reason", b"?").decode(errors="replace"),
            letter.attempts,
            err.str(),
        )
        self._unacked_dead_letters.append(letter)

    def _settle_dead_letters(self, deadline: float) -> None:
        """Wait until every dead letter produced so far is acknowledged, producing the
        refused ones again; raise (so no snapshot moves past them) if that fails."""
        for attempt in range(4):
            left = self.producer.flush(max(0.0, deadline - time.monotonic()))
            retry, self._unacked_dead_letters = self._unacked_dead_letters, []
            if not retry and not left:
                if self._dead_letters_stalled:
                    self._dead_letters_stalled = False
                    self._refresh_health()
                return
            if attempt == 3 or time.monotonic() >= deadline:
                self._unacked_dead_letters.extend(retry)
                if retry and not self._dead_letters_stalled:
                    self._dead_letters_stalled = True
                    self._refresh_health()
                raise AggregatorError(
                    f"{len(retry)} dead letters refused and {left} messages unacknowledged; "
                    "no snapshot until they are written"
                )
            for letter in retry:
                self._produce_dead_letter(letter)

    def _markers(self) -> None:
        """Append a watermark marker to owned partitions idle longer than idle_timeout."""
        s = self.settings
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        idle_ms = s.idle_timeout_ms
        for p, state in self.states.items():
            seen, since = self._advanced.get(p, (state.max_event_ms, now))
            if state.max_event_ms != seen:
                self._advanced[p] = (state.max_event_ms, now)
                continue
            if (now - since) * 1000 < idle_ms or self.health.lag.get(p, 0) > 0:
                continue
            marker_ms = now_ms - idle_ms
            self._advanced[p] = (seen, now)  # at most one marker per idle period
            if marker_ms <= state.max_event_ms:
                continue
            try:
                marker_id = self.resolver.writer_id(SchemaId.WATERMARK_MARKER)
            except RegistryError as exc:  # retried at the next idle period
                log.warning("partition %d idle: no watermark marker (%s)", p, exc)
                continue
            body = encode_marker(marker_ms, s.shard_id, marker_id)
            self.producer.produce(
                s.input_topic,
                body,
                None,
                partition=p,
                headers=[(MARKER_HEADER, s.group_id.encode())],
            )
            log.debug("partition %d idle: watermark marker at %d", p, marker_ms)

    def _update_lag(self) -> None:
        for p, state in self.states.items():
            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.settings.input_topic, p), cached=True
                )
            except KafkaException:
                continue
            if high >= 0 and state.next_offset >= 0:
                self.health.lag[p] = max(0, high - state.next_offset)
            elif high >= 0:
                self.health.lag[p] = high
        now = time.monotonic()
        for p, (_v, when) in self._snapshotted.items():
            self.health.snapshot_age_seconds[p] = now - when

    def _maybe_render(self) -> None:
        versions = tuple(sorted((p, st.version) for p, st in self.states.items()))
        now = time.monotonic()
        since = now - self._last_render
        changed = versions != self._rendered_versions
        # Health gauges (lag, snapshot age) move without state changes: refresh them
        # every few seconds even when no pane closed.
        due = since >= self.settings.render_interval_seconds and (changed or since >= 5.0)
        if not (self._force_render or due):
            return
        self._update_lag()
        self._rendered_versions = versions
        self._last_render = now
        self._force_render = False
        views = [self.states[p].view() for p in sorted(self.states)]
        # The render thread gets its own copy: the loop keeps mutating these dicts.
        health = dataclasses.replace(
            self.health,
            lag=dict(self.health.lag),
            snapshot_age_seconds=dict(self.health.snapshot_age_seconds),
            stuck_partitions=dict(self.health.stuck_partitions),
        )
        # Views taken after a refusal may lift it, unless the group has still to confirm
        # the assignment after a frozen loop.
        self._renderer.submit(views, health, self._refusal if self._gap_since is None else None)

    def _refuse(self, reason: str) -> None:
        """Answer /metrics with 503 until a render of views taken after now is served."""
        with self._refusal_lock:
            self._refusal += 1
            self.server.set_stale(reason)
        self._force_render = True

    def _lift_refusal(self, generation: int) -> None:
        """Called by the renderer once views taken at ``generation`` are served."""
        with self._refusal_lock:
            if generation == self._refusal and self._gap_since is None:
                self.server.set_stale(None)

    def _watch_gap(self) -> None:
        """Notice a loop that was frozen long enough to lose its session (see __init__).

        Its payload may export partitions that another shard owns now, so /metrics is
        refused until the group has spoken: a rebalance callback, or ``_confirm_seconds``
        of polling without one (a heartbeat has then been answered).
        """
        now = time.monotonic()
        last, self._last_poll = self._last_poll, now
        if last is not None and now - last > self._poll_gap_limit:
            log.warning(
                "consumer loop was silent for %.1f s (limit %.1f s): /metrics refused until "
                "the group confirms this shard's partitions",
                now - last,
                self._poll_gap_limit,
            )
            self._gap_since = now
            self._rebalanced = False
            self._refuse("consumer loop was frozen; waiting for the group")
        elif self._gap_since is not None and (
            self._rebalanced or now - self._gap_since >= self._confirm_seconds
        ):
            log.info("assignment confirmed after the frozen loop; serving /metrics again")
            self._gap_since = None
            self._force_render = True
        # After the flag above, so the HTTP thread never sees a fresh poll and no refusal.
        self.server.loop_alive(now)

    def process_batch(self, msgs: list[Message]) -> None:
        """Route one consumed batch to its partitions' states (what ``run`` does per poll).

        Also adapts ``batch_limit`` so that one batch holds about ``_BATCH_BYTES`` of
        message values: envelopes are ~1000x larger than single events, and a count
        limit alone would let memory grow with the backlog.
        """
        start = time.perf_counter()
        by_partition: dict[int, list[Message]] = {}
        nbytes = 0
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._fetch_error(m, err)
                continue
            p = m.partition()
            if p in self._fetch_errors:
                self._unstuck(p)
            state = self.states.get(p)
            # Skip what the state already holds (a seek can re-deliver).
            if state is None or m.offset() < state.next_offset:
                continue
            nbytes += len(m)
            by_partition.setdefault(p, []).append(m)
        for p, part_msgs in by_partition.items():
            self._process(p, self.states[p], part_msgs)
        if msgs:
            self.health.batches += 1
            self.health.messages += len(msgs)
            self.health.batch_seconds_sum += time.perf_counter() - start
            if nbytes:
                wanted = len(msgs) * _BATCH_BYTES // nbytes
                self.batch_limit = max(16, min(self.settings.batch_size, wanted))

    def _fetch_error(self, m: Message, err: KafkaError) -> None:
        """Track per-partition consume errors; skip a message that can never be read.

        librdkafka reports a fetch it cannot decode (e.g. ``_BAD_COMPRESSION`` for a
        message that decompresses beyond receive.message.max.bytes) on every fetch and
        never moves on. After ``_STUCK_ERRORS`` in a row at one offset the partition is
        reported stuck (log, /healthz, ``modelpulse_partition_stuck``); if the error is
        about the message itself, the message is dead-lettered by its coordinates (its
        value is unavailable) and the partition resumes after it.
        """
        p, off = m.partition(), m.offset()
        state = self.states.get(p) if p is not None else None
        if p is None or state is None or off is None or off < 0:
            log.warning("consume error: %s", err)
            return
        now = time.monotonic()
        at, n, since, _last = self._fetch_errors.get(p, (off, 0, now, err))
        if at != off:
            at, n, since = off, 0, now
        n += 1
        self._fetch_errors[p] = (at, n, since, err)
        if n < _STUCK_ERRORS or now - since < _STUCK_SECONDS:
            log.warning("consume error on partition %d at offset %d: %s", p, off, err)
            return
        if self.health.stuck_partitions.get(p) != 1:
            log.error(
                "partition %d stuck at offset %d: %d errors in %.1f s: %s",
                p,
                off,
                n,
                now - since,
                err,
            )
            self.health.stuck_partitions[p] = 1
            self._refresh_health()
        reason = _UNREADABLE.get(err.code())
        if reason is None:
            return  # not the message's fault (authorization, a deleted topic...): report only
        skip = max(off, state.next_offset)
        detail = f"offset {skip} unreadable after {n} fetches: {err.name()}: {err.str()}"
        log.error("partition %d: dead-lettering offset %d (%s) and moving on", p, skip, reason)
        self._dead_letter(
            _Unreadable(m.topic() or self.settings.input_topic, p, skip),
            reason,
            detail,
            1,
            unreadable=True,
        )
        state.count_rejected(reason)
        state.next_offset = skip + 1
        try:
            self.consumer.seek(TopicPartition(self.settings.input_topic, p, skip + 1))
        except KafkaException as exc:  # the next errors find it again
            log.warning("partition %d: seek past offset %d failed: %s", p, skip, exc)
        self._unstuck(p)

    def _unstuck(self, p: int) -> None:
        self._fetch_errors.pop(p, None)
        if self.health.stuck_partitions.pop(p, None):
            log.info("partition %d moves again", p)
            self._refresh_health()

    def _refresh_health(self) -> None:
        stuck = sorted(p for p, v in self.health.stuck_partitions.items() if v)
        if stuck:
            self.server.set_healthy(False, f"partitions stuck: {stuck}")
        elif self._dead_letters_stalled:
            self.server.set_healthy(False, "dead letters refused; snapshots held back")
        elif self._fatal is None:
            self.server.set_healthy(True)
        self._force_render = True

    def stop(self) -> None:
        """Ask the loop to finish: final snapshots, commit, leave the group."""
        self._stop.set()

    def training_references(self) -> dict[tuple[str, str], TrainingReference]:
        """Drift references from training read so far (empty without a reference topic)."""
        return {} if self._references is None else self._references.references()

    def run(self, on_loop: Callable[[Shard], Any] | None = None) -> None:
        """Consume until ``stop()``; raises if a partition could not be restored."""
        s = self.settings
        self.ensure_topics()
        if self._references is not None:
            # Bounded: a shard whose references are late drifts against its first window.
            self._references.start(wait_seconds=_REFERENCES_START_SECONDS)
        self.server.start()
        self._renderer.start()
        self.consumer.subscribe(
            [s.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "shard %s consuming %s as %s; metrics on %s",
            s.shard_id,
            s.input_topic,
            s.group_id,
            self.server.url,
        )
        self.server.set_ready(True)
        try:
            while not self._stop.is_set():
                self._watch_gap()
                msgs = self.consumer.consume(self.batch_limit, 0.1)
                self.process_batch(msgs)
                self.producer.poll(0)
                now = time.monotonic()
                if now - self._last_snapshot >= s.snapshot_interval_seconds:
                    self._last_snapshot = now
                    try:
                        self._snapshot(timeout=_SNAPSHOT_SECONDS)
                    except (AggregatorError, KafkaException) as exc:
                        log.error("snapshot failed (will retry): %s", exc)
                    self._markers()
                self._maybe_render()
                if on_loop is not None:
                    on_loop(self)
        finally:
            self._shutdown()
        if self._fatal is not None:
            raise self._fatal

    def _shutdown(self) -> None:
        """Final snapshot, leave the group, flush: each step bounded (see
        SHUTDOWN_BOUND_SECONDS), so SIGTERM exits even while the group rebalances."""
        start = time.monotonic()
        self._closing = True
        if self._references is not None:
            self._references.stop()  # it winds down while the snapshot is written
        try:
            if self._fatal is None:
                self._snapshot(force=True, timeout=_FINAL_SNAPSHOT_SECONDS)
        except Exception as exc:
            log.error("final snapshot failed: %s", exc)
        # close() runs the revoke callback and waits for the coordinator; a group in the
        # middle of a rebalance can keep it waiting. The snapshot above is what the next
        # owner resumes from, so giving up on a slow goodbye loses nothing.
        closer = threading.Thread(target=self._close_consumer, name="modelpulse-close")
        closer.daemon = True
        closer.start()
        closer.join(_CLOSE_SECONDS)
        if closer.is_alive():
            self.close_timed_out = True
            log.warning(
                "leaving the group took over %.0f s; exiting anyway (the group reassigns "
                "the partitions after the session timeout)",
                _CLOSE_SECONDS,
            )
        left = self.producer.flush(_FINAL_FLUSH_SECONDS)
        if left:
            log.warning("%d messages (markers) not flushed at exit", left)
        if self._references is not None:
            self._references.close(_REFERENCES_CLOSE_SECONDS)
        self.server.stop()
        log.info("stopped in %.1f s", time.monotonic() - start)

    def _close_consumer(self) -> None:
        try:
            self.consumer.close()
        except Exception as exc:
            log.warning("consumer close: %s", exc)
