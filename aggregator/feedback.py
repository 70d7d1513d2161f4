"""The feedback edge: labels sent later, read beside the predictions they belong to.

The feedback topic is co-partitioned with the prediction topic and keyed the same way
(``PredictionPublisher.label`` partitions by model name like ``publish``), so the
label of a prediction in partition p is in feedback partition p. A shard reads, with a
consumer of its own assigned by hand, exactly the feedback partitions whose numbers it
owns in the prediction topic: it follows the group's assignment (``follow``/``drop``
from the rebalance callbacks), starting each at the offset its partition's snapshot
holds (``PartitionState.join.next_offset``), so labels and predictions are restored
together and no label is counted twice. The join itself is ``PartitionState``'s.

A partition whose labels run ahead of its predictions (label times past the
prediction watermark by more than ``--label-wait``) is paused until the predictions
catch up: labels that came first wait in a bounded store, and pausing keeps it small.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from aggregator.deadletters import Coordinates, DeadLetters
from aggregator.edge import TopicPartitionKey, close_bounded
from aggregator.errors import AggregatorError, DecodeError
from aggregator.join.joiner import LABEL_REASONS
from aggregator.join.labels import LabelChunkBuilder
from aggregator.resolver import SchemaResolver
from aggregator.settings import AggregatorSettings
from aggregator.state import PartitionState
from schemas.wire import SchemaId

__all__ = ["Feedback", "ensure_feedback_topic", "feedback_config"]

log = logging.getLogger("modelpulse.aggregator")

_BATCH = 50_000  # labels per consume()
_MAX_PAUSE_SECONDS = 10.0


def feedback_config(s: AggregatorSettings) -> dict[str, object]:
    """The feedback reader: assigned by hand (never subscribes), never commits."""
    return {
        **s.kafka_config(),
        "group.id": f"{s.group_id}-feedback",
        "client.id": f"modelpulse-{s.shard_id}-feedback",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.queue.backoff.ms": 20,
        "queued.max.messages.kbytes": 16 * 1024,
        **s.kafka,
    }


def ensure_feedback_topic(
    admin: AdminClient, topic: str, input_topic: str, partitions: int
) -> None:
    """Create the feedback topic co-partitioned with the input topic, or check that it
    is: a label must land in the partition number of its prediction."""
    found = admin.list_topics(topic=topic, timeout=10).topics.get(topic)
    if found is None or found.error is not None:
        fut = admin.create_topics([NewTopic(topic, num_partitions=partitions)])[topic]
        try:
            fut.result()
            log.info("created feedback topic %s with %d partitions", topic, partitions)
            return
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        found = admin.list_topics(topic=topic, timeout=10).topics[topic]
    have = len(found.partitions)
    if have != partitions:
        raise AggregatorError(
            f"--feedback-topic {topic} has {have} partitions but --input-topic {input_topic} "
            f"has {partitions}: labels are joined in the partition of their prediction, so "
            f"the topics must be co-partitioned (same partition count, keyed by model); "
            f"recreate {topic} with {partitions} partitions"
        )


class Feedback:
    """Reads the feedback partitions of the owned prediction partitions into their states."""

    def __init__(
        self,
        settings: AggregatorSettings,
        resolver: SchemaResolver,
        dead_letters: DeadLetters,
        states: Mapping[TopicPartitionKey, PartitionState],
    ) -> None:
        self.topic = settings.feedback_topic
        self._input = settings.input_topic
        self._resolver = resolver
        self._dead_letters = dead_letters
        self._states = states
        self.consumer = Consumer(feedback_config(settings), logger=log)
        self.assigned: set[int] = set()
        self.paused: dict[int, float] = {}  # partition -> resume at the latest (monotonic)

    # -- following the group's assignment ------------------------------------------------

    def follow(self, keys: Iterable[TopicPartitionKey]) -> None:
        """Read the feedback partitions of these (just restored) prediction partitions."""
        tps = []
        for key in keys:
            state = self._states.get(key)
            if key.topic != self._input or state is None or state.join is None:
                continue
            start = state.join.next_offset
            tps.append(
                TopicPartition(self.topic, key.partition, start if start >= 0 else OFFSET_BEGINNING)
            )
            self.assigned.add(key.partition)
        if tps:
            self.consumer.incremental_assign(tps)
            log.info("feedback partitions %s followed", sorted(tp.partition for tp in tps))

    def drop(self, keys: Iterable[TopicPartitionKey]) -> None:
        parts = [
            k.partition for k in keys if k.topic == self._input and k.partition in self.assigned
        ]
        if parts:
            self.consumer.incremental_unassign([TopicPartition(self.topic, p) for p in parts])
            self.assigned.difference_update(parts)
            for p in parts:
                self.paused.pop(p, None)

    # -- the loop ------------------------------------------------------------------------

    def poll(self) -> int:
        """Consume what is there (no wait) into the states; returns labels read.

        Also sends the dead letters of labels the predictions decided meanwhile (an
        early label whose wait ran out), before the next snapshot can pass them."""
        for key, state in self._states.items():
            if state.label_letters and state.join is not None:
                offsets, reasons = state.drain_label_letters()
                self._letters(key.partition, offsets, reasons, {})
        self._resume_caught_up()
        if not self.assigned or len(self.paused) == len(self.assigned):
            return 0
        msgs = self.consumer.consume(_BATCH, 0)
        by_partition: dict[int, list[Message]] = defaultdict(list)
        for m in msgs:
            err = m.error()
            if err is not None:
                if not err.retriable() and err.code() != -191:  # -191: partition EOF
                    log.warning("feedback fetch error: %s", err)
                continue
            if m.partition() in self.assigned:
                by_partition[m.partition()].append(m)
        for p, part in by_partition.items():
            owner = self._states.get(TopicPartitionKey(self._input, p))
            if owner is not None and owner.join is not None:
                self._ingest(p, owner, part)
        return len(msgs)

    def _ingest(self, p: int, state: PartitionState, msgs: Sequence[Message]) -> None:
        builder = LabelChunkBuilder()
        by_offset = {m.offset(): m for m in msgs}
        for m in msgs:
            try:
                kind, record = self._resolver.read(m.value())
                if kind != SchemaId.LABEL_FEEDBACK:
                    raise DecodeError(
                        "unexpected_schema", f"schema kind {kind} on the feedback topic"
                    )
                builder.add(record, m.offset())
            except DecodeError as exc:
                self._dead_letters.send(m, exc.reason, exc.detail, 1)
        result = state.ingest_labels(builder.build(), msgs[-1].offset() + 1)
        self._letters(p, result.offsets, result.reasons, by_offset)
        join = state.join
        ahead = None if join is None else join.latest_early_ms()
        if (
            join is not None
            and ahead is not None
            and ahead > state.max_event_ms + join.limits.wait_ms
        ):
            self.consumer.pause([TopicPartition(self.topic, p)])
            self.paused[p] = time.monotonic() + _MAX_PAUSE_SECONDS

    def _letters(
        self, p: int, offsets: np.ndarray, reasons: np.ndarray, by_offset: Mapping[int, Message]
    ) -> None:
        for offset, code in zip(offsets.tolist(), reasons.tolist(), strict=True):
            reason = LABEL_REASONS[code]
            m = by_offset.get(offset)
            source = m if m is not None else Coordinates(self.topic, p, offset)
            self._dead_letters.send(source, reason, f"label: {reason}", 1, unreadable=m is None)

    def _resume_caught_up(self) -> None:
        """Resume partitions whose predictions caught up with their early labels, or that
        waited long enough (a label from a clock far ahead must not stall the rest)."""
        now = time.monotonic()
        for p, until in list(self.paused.items()):
            state = self._states.get(TopicPartitionKey(self._input, p))
            ahead = None if state is None or state.join is None else state.join.latest_early_ms()
            if state is None or ahead is None or ahead <= state.max_event_ms or now > until:
                self.consumer.resume([TopicPartition(self.topic, p)])
                del self.paused[p]

    def close(self, seconds: float) -> None:
        try:
            close_bounded(self.consumer, seconds)
        except KafkaException as exc:
            log.warning("feedback consumer close: %s", exc)
