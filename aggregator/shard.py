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
from confluent_kafka.admin import AdminClient, NewTopic

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
from aggregator.server import MetricsServer
from aggregator.settings import AggregatorSettings
from aggregator.state import REJECT_REASONS, PartitionState, StateView
from schemas.wire import SchemaId, frame, parsed_schema

__all__ = ["Shard"]

log = logging.getLogger("modelpulse.aggregator")

_STATE_MAX_BYTES = 64 * 1024 * 1024
# Rows per ingest call: large enough to amortise per-call costs, small enough that
# the per-row temporaries stay in cache and memory does not grow with the batch.
_ROWS_PER_INGEST = 65_536
# Message bytes per consumed batch (see Shard.process_batch).
_BATCH_BYTES = 16 * 1024 * 1024


def _snapshot_key(topic: str, partition: int) -> bytes:
    return f"{topic}/{partition}".encode()


class _Renderer(threading.Thread):
    """Builds and renders /metrics off the consume path; the newest request wins."""

    def __init__(self, shard: Shard) -> None:
        super().__init__(name="modelpulse-render", daemon=True)
        self._shard = shard
        self._pending: tuple[list[StateView], ShardHealth] | None = None
        self._cond = threading.Condition()
        self._cache = LabelCache()
        self.renders = 0
        self.last_seconds = 0.0

    def submit(self, views: list[StateView], health: ShardHealth) -> None:
        with self._cond:
            self._pending = (views, health)
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                views, health = self._pending
                self._pending = None
            start = time.perf_counter()
            try:
                families = build_families(views, self._shard.config, health)
                payload = render_payload(families, self._cache)
                self._shard.server.set_payload(payload.body, payload.gzip_body)
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
        self.resolver = SchemaResolver()
        self.health = ShardHealth(up_since=time.time())
        self.server = MetricsServer(s.http_host, s.http_port)
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
            # The default 1 s backoff stalls a fast consumer (docs/architecture.md, reference figures).
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
            s.dead_letter_topic: NewTopic(s.dead_letter_topic, num_partitions=partitions),
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
        return partitions

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
            msg = reader.poll(1.0)
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
        self.server.set_ready(True)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = [tp.partition for tp in partitions if tp.partition in self.states]
        try:
            self._snapshot(gone, force=True)
        except Exception as exc:  # the next owner replays from the previous snapshot
            log.warning("final snapshot on revoke failed: %s", exc)
        self._drop(gone)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another shard may own them already: writing a snapshot now could go back in time.
        self._drop([tp.partition for tp in partitions])
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

    def _snapshot(self, partitions: list[int] | None = None, *, force: bool = False) -> None:
        """Write snapshots of changed partitions, wait for the acks, then commit offsets."""
        s = self.settings
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
        left = self.producer.flush(30.0)
        if left or self._delivery_errors:
            raise AggregatorError(
                f"snapshots not acknowledged ({left} in flight); offsets not committed"
            )
        offsets = [TopicPartition(s.input_topic, st.partition, st.next_offset) for st in todo]
        self.consumer.commit(offsets=offsets, asynchronous=False)
        for state in todo:
            self._snapshotted[state.partition] = (state.version, now)

    # -- the loop ----------------------------------------------------------------------

    def _process(self, partition: int, state: PartitionState, msgs: list[Message]) -> None:
        """Decode a partition's messages and ingest them in groups of bounded rows.

        Groups keep the numpy temporaries cache-sized and memory flat however large
        the consumed batch; the state does not depend on where groups are cut.
        """
        items: list[RowChunk | Marker | Heartbeat] = []
        builder = EventChunkBuilder()
        by_offset: dict[int, Message] = {}
        offsets = np.empty(len(msgs), dtype=np.int64)
        stamps = np.empty(len(msgs), dtype=np.int64)
        dead: list[tuple[Message, str, str, int]] = []
        read = self.resolver.read
        rows = 0

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

        for i, m in enumerate(msgs):
            off = m.offset()
            offsets[i] = off
            _kind, ts = m.timestamp()
            stamps[i] = ts if ts >= 0 else np.iinfo(np.int64).max // 2
            by_offset[off] = m
            try:
                kind, rec = read(m.value())
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
                        chunk = decode_batch(rec, off)
                        items.append(chunk)
                        rows += len(chunk)
                    elif kind == SchemaId.RESOURCE_HEARTBEAT:
                        items.append(Heartbeat(off, rec))
                    elif kind == SchemaId.WATERMARK_MARKER:
                        items.append(Marker(off, int(rec["event_time_ms"])))
                    else:
                        raise DecodeError(
                            "unexpected_schema", f"schema kind {kind} on the input topic"
                        )
            except DecodeError as exc:
                state.count_rejected(exc.reason)
                dead.append((m, exc.reason, exc.detail, 1))
            if rows >= _ROWS_PER_INGEST:
                flush(i + 1)
                rows = 0
        flush(len(msgs))
        for m, reason, detail, n in dead:
            self._dead_letter(m, reason, detail, n)

    def _dead_letter(self, m: Message, reason: str, detail: str, rows: int) -> None:
        headers = [
            ("modelpulse.reason", reason.encode()),
            ("modelpulse.detail", detail[:500].encode()),
            ("modelpulse.source.topic", (m.topic() or "").encode()),
            ("modelpulse.source.partition", str(m.partition()).encode()),
            ("modelpulse.source.offset", str(m.offset()).encode()),
            ("modelpulse.rows", str(rows).encode()),
        ]
        while True:
            try:
                self.producer.produce(
                    self.settings.dead_letter_topic, m.value(), m.key(), headers=headers
                )
                break
            except BufferError:
                self.producer.poll(0.1)
        self.health.dead_letter_messages += 1

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
            body = _encode_marker(marker_ms, s.shard_id)
            self.producer.produce(s.input_topic, body, None, partition=p)
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
        )
        self._renderer.submit(views, health)

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
                    log.warning("consume error: %s", err)
                continue
            p = m.partition()
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

    def stop(self) -> None:
        """Ask the loop to finish: final snapshots, commit, leave the group."""
        self._stop.set()

    def run(self, on_loop: Callable[[Shard], Any] | None = None) -> None:
        """Consume until ``stop()``; raises if a partition could not be restored."""
        s = self.settings
        self.ensure_topics()
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
                msgs = self.consumer.consume(self.batch_limit, 0.1)
                self.process_batch(msgs)
                self.producer.poll(0)
                now = time.monotonic()
                if now - self._last_snapshot >= s.snapshot_interval_seconds:
                    self._last_snapshot = now
                    try:
                        self._snapshot()
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
        try:
            if self._fatal is None:
                self._snapshot(force=True)
        except Exception as exc:
            log.error("final snapshot failed: %s", exc)
        try:
            self.consumer.close()
        except Exception as exc:
            log.warning("consumer close: %s", exc)
        self.producer.flush(10)
        self.server.stop()


def _encode_marker(event_time_ms: int, origin: str) -> bytes:
    import io  # noqa: PLC0415

    from fastavro import schemaless_writer  # noqa: PLC0415

    out = io.BytesIO()
    schemaless_writer(
        out,
        parsed_schema(SchemaId.WATERMARK_MARKER),
        {"event_time_ms": event_time_ms, "origin": origin},
    )
    return frame(SchemaId.WATERMARK_MARKER, out.getvalue())
