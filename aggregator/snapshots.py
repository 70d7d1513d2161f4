"""Snapshots: offsets live with the state.

Every ``snapshot_interval`` each owned partition's state, including its
``next_offset``, is written as one record to its input topic's compacted state
topic (same partition number as the input, key ``topic/partition``), the broker's
ack is awaited, and only then is ``next_offset`` committed to the group. A shard
that gets a partition restores its latest snapshot and seeks to its
``next_offset``, so a SIGKILL loses nothing and counts nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from aggregator.deadletters import DeadLetters
from aggregator.edge import TopicPartitionKey
from aggregator.errors import AggregatorError, ConfigMismatch
from aggregator.join.chunks import SnapshotError
from aggregator.state import PartitionState, StateConfig

__all__ = ["Snapshots", "Stopping", "snapshot_key"]

log = logging.getLogger("modelpulse.aggregator")


# Largest join chunk record: under the broker's default 1 MB, whatever the topic allows.
_CHUNK_BYTES = 900_000


def snapshot_key(key: TopicPartitionKey) -> bytes:
    return f"{key.topic}/{key.partition}".encode()


class Stopping(Exception):
    """Raised inside a restore when the shard is asked to stop meanwhile."""


class Snapshots:
    """Restores, writes and commits the states of one shard's partitions.

    ``state_topics`` maps each input topic to its state topic. ``snapshotted`` is
    (state version, when) of the last snapshot per partition: its age is a health
    gauge, and an unchanged state is not written again.
    """

    def __init__(
        self,
        config: StateConfig,
        state_topics: Mapping[str, str],
        *,
        producer: Producer,
        consumer: Consumer,
        restore_conf: dict[str, object],
        dead_letters: DeadLetters,
        stop: threading.Event,
        rebuild: bool,
    ) -> None:
        self._config = config
        self._state_topics = dict(state_topics)
        self._producer = producer
        self._consumer = consumer
        self._restore_conf = restore_conf
        self._dead_letters = dead_letters
        self._stop = stop
        self._rebuild = rebuild
        self._delivery_errors = 0
        self.snapshotted: dict[TopicPartitionKey, tuple[int, float]] = {}

    # -- restore -----------------------------------------------------------------------

    def _read(self, reader: Consumer, key: TopicPartitionKey) -> list[bytes] | None:
        """The latest snapshot records of ``key``: the join's chunk records, then the head
        (the last record of its state partition, since only its owner writes there);
        None if there is none."""
        state_topic = self._state_topics[key.topic]
        low, high = reader.get_watermark_offsets(
            TopicPartition(state_topic, key.partition), timeout=10
        )
        if high <= low:
            return None
        head = self._records(reader, state_topic, key.partition, high - 1, high)[0]
        n = PartitionState.chunks_before(head)
        if not n:
            return [head]
        if high - 1 - n < low:
            raise AggregatorError(
                f"partition {key.partition}: the snapshot names {n} join chunks before "
                f"offset {high - 1}, the log starts at {low}; restart with --rebuild-state"
            )
        return [*self._records(reader, state_topic, key.partition, high - 1 - n, high - 1), head]

    def _records(
        self, reader: Consumer, topic: str, partition: int, start: int, end: int
    ) -> list[bytes]:
        """The values of offsets [start, end) of one partition."""
        reader.assign([TopicPartition(topic, partition, start)])
        out: list[bytes] = []
        deadline = time.monotonic() + 15 + (end - start) * 0.05
        while time.monotonic() < deadline:
            if self._stop.is_set():
                raise Stopping
            msg = reader.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                raise KafkaException(err)
            if msg.offset() >= start:
                out.append(msg.value() or b"")
            if msg.offset() >= end - 1:
                return out
        raise AggregatorError(f"timed out reading the snapshot of partition {partition}")

    def _read_retrying(self, reader: Consumer, key: TopicPartitionKey) -> list[bytes] | None:
        p = key.partition
        deadline = time.monotonic() + 60
        while True:
            try:
                return self._read(reader, key)
            except KafkaException as exc:
                # A topic just created, a leader moving: retriable for a while.
                if self._stop.is_set():
                    raise Stopping from exc
                if time.monotonic() > deadline:
                    raise AggregatorError(f"partition {p}: snapshot unreadable: {exc}") from exc
                log.info("partition %d: snapshot not readable yet (%s), retrying", p, exc)
                time.sleep(0.5)

    def restore(self, keys: Iterable[TopicPartitionKey]) -> dict[TopicPartitionKey, PartitionState]:
        """The latest state of each partition (a fresh one if it has no snapshot)."""
        restored: dict[TopicPartitionKey, PartitionState] = {}
        reader = Consumer(self._restore_conf, logger=log)
        try:
            for key in keys:
                p = key.partition
                records = self._read_retrying(reader, key)
                state: PartitionState | None = None
                if records is not None:
                    try:
                        state = PartitionState.from_records(records, self._config)
                    except (ConfigMismatch, SnapshotError):
                        if not self._rebuild:
                            raise
                        log.warning("partition %d: config changed, rebuilding state", p)
                        state = None
                if state is None:
                    state = PartitionState(self._config, p)
                restored[key] = state
                log.info(
                    "partition %d: %s, next offset %d",
                    p,
                    "restored snapshot" if state.next_offset >= 0 else "fresh state",
                    state.next_offset,
                )
        finally:
            reader.close()
        return restored

    # -- write and commit --------------------------------------------------------------

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._delivery_errors += 1
            log.error("snapshot delivery failed: %s", err)

    def write(
        self,
        states: Mapping[TopicPartitionKey, PartitionState],
        keys: Iterable[TopicPartitionKey] | None = None,
        *,
        force: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Write snapshots of changed partitions, wait for the acks, then commit offsets.

        The dead letters produced so far are acknowledged first: a snapshot moves
        ``next_offset`` past their messages, so it must not exist before they do.
        """
        deadline = time.monotonic() + timeout
        self._dead_letters.settle(deadline)
        now = time.monotonic()
        todo: list[tuple[TopicPartitionKey, PartitionState]] = []
        for key in keys if keys is not None else list(states):
            state = states.get(key)
            if state is None or state.next_offset < 0:
                continue
            if not force and self.snapshotted.get(key, (-1, 0.0))[0] == state.version:
                self.snapshotted[key] = (state.version, now)  # unchanged: still current
                continue
            todo.append((key, state))
        if not todo:
            return
        self._delivery_errors = 0
        for key, state in todo:
            # The join's stores (late labels) go first, as chunk records the head names;
            # one owner writes a state partition, so they sit right before it.
            records = state.to_records(_CHUNK_BYTES)
            for i, record in enumerate(records):
                last = i == len(records) - 1
                self._producer.produce(
                    self._state_topics[key.topic],
                    record,
                    snapshot_key(key) if last else snapshot_key(key) + f"/join/{i}".encode(),
                    partition=key.partition,
                    on_delivery=self._delivered,
                )
                if not last:
                    self._producer.poll(0)
        left = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if left or self._delivery_errors:
            raise AggregatorError(
                f"snapshots not acknowledged ({left} in flight); offsets not committed"
            )
        offsets = [TopicPartition(k.topic, k.partition, st.next_offset) for k, st in todo]
        # The snapshot is what a new owner resumes from; the group's offsets only inform
        # lag tools, so a commit never waits (a synchronous one can block a rebalance
        # or a shutdown for as long as the coordinator does not answer).
        self._consumer.commit(offsets=offsets, asynchronous=True)
        for key, state in todo:
            self.snapshotted[key] = (state.version, now)
