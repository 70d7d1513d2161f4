"""The Kafka edge of a shard: input topics, client configs, topic admin.

Everything is keyed by ``TopicPartitionKey`` (topic, partition): the shard consumes
a list of input topics (``InputTopic``, today only the predictions), each with its
own handler and its own compacted state topic, co-partitioned with it. The owned
partitions' consume errors, idle markers and lag are in ``partitions``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from aggregator.deadletters import BROKER_DEFAULT_MAX_BYTES
from aggregator.errors import AggregatorError
from aggregator.references import ReferenceReader
from aggregator.settings import AggregatorSettings
from aggregator.state import PartitionState, StateConfig

__all__ = [
    "STATE_MAX_BYTES",
    "InputTopic",
    "TopicPartitionKey",
    "close_bounded",
    "consumer_config",
    "ensure_topics",
    "loop_limits",
    "max_message_bytes",
    "producer_config",
    "reference_reader",
    "restore_config",
]

log = logging.getLogger("modelpulse.aggregator")

STATE_MAX_BYTES = 64 * 1024 * 1024


class TopicPartitionKey(NamedTuple):
    """One input partition: the key of states, snapshots, commits, lag and errors."""

    topic: str
    partition: int


@dataclass(frozen=True)
class InputTopic:
    """An input topic, its state topic, and what turns its messages into state."""

    name: str
    state_topic: str
    handle: Callable[[TopicPartitionKey, PartitionState, list[Message]], None]


def consumer_config(s: AggregatorSettings) -> dict[str, Any]:
    return {
        **s.kafka_config(),
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


def producer_config(s: AggregatorSettings) -> dict[str, Any]:
    """Snapshots, dead letters and markers."""
    return {
        **s.kafka_config(),
        "client.id": f"modelpulse-{s.shard_id}-out",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.max.bytes": STATE_MAX_BYTES,
        "compression.type": "lz4",
        **s.kafka,
    }


def restore_config(s: AggregatorSettings) -> dict[str, Any]:
    """The snapshot reader: assigned by hand, never commits."""
    return {
        **s.kafka_config(),
        "group.id": f"{s.group_id}-restore",
        "enable.auto.commit": False,
        "fetch.max.bytes": STATE_MAX_BYTES * 2,
        "max.partition.fetch.bytes": STATE_MAX_BYTES * 2,
        **s.kafka,
    }


def _partitions(admin: AdminClient, topic: str, deadline: float) -> int:
    while True:
        md = admin.list_topics(timeout=10)
        found = md.topics.get(topic)
        if found is not None and found.error is None and found.partitions:
            return len(found.partitions)
        if time.monotonic() > deadline:
            raise AggregatorError(f"input topic {topic!r} does not exist")
        log.info("waiting for topic %s", topic)
        time.sleep(1.0)


def ensure_topics(
    admin: AdminClient,
    inputs: Sequence[InputTopic],
    dead_letter_topic: str,
    wait_seconds: float = 60.0,
) -> dict[str, int]:
    """Wait for the input topics; create their state topics and the dead-letter topic
    if missing. Returns each input topic's partition count."""
    deadline = time.monotonic() + wait_seconds
    partitions = {t.name: _partitions(admin, t.name, deadline) for t in inputs}
    existing = admin.list_topics(timeout=10).topics
    wanted = {
        t.state_topic: NewTopic(
            t.state_topic,
            num_partitions=partitions[t.name],
            config={
                "cleanup.policy": "compact",
                "max.message.bytes": str(STATE_MAX_BYTES),
                "min.cleanable.dirty.ratio": "0.1",
                "segment.ms": "600000",
            },
        )
        for t in inputs
    }
    # Every message the inputs take must fit as a dead letter.
    wanted[dead_letter_topic] = NewTopic(
        dead_letter_topic,
        num_partitions=partitions[inputs[0].name],
        config={"max.message.bytes": str(max(max_message_bytes(admin, t.name) for t in inputs))},
    )
    missing = [t for name, t in wanted.items() if name not in existing]
    if missing:
        for name, fut in admin.create_topics(missing).items():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                log.debug("topic %s created concurrently", name)
    for t in inputs:
        _wait_copartitioned(admin, t, partitions[t.name])
    return partitions


def _wait_copartitioned(admin: AdminClient, t: InputTopic, partitions: int) -> None:
    have = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a topic just created shows up in steps
        md = admin.list_topics(t.state_topic, timeout=10)
        found = md.topics.get(t.state_topic)
        have = len(found.partitions) if found is not None and found.error is None else 0
        if have == partitions:
            return
        time.sleep(0.2)
    raise AggregatorError(
        f"state topic {t.state_topic!r} has {have} partitions but input topic "
        f"{t.name!r} has {partitions}: they must be co-partitioned"
    )


def max_message_bytes(admin: AdminClient, topic: str) -> int:
    """The topic's max.message.bytes, or the broker default if it cannot be read."""
    resource = ConfigResource(ResourceType.TOPIC, topic)
    deadline = time.monotonic() + 30
    while True:
        try:
            configs = admin.describe_configs([resource])[resource].result(timeout=10)
            return int(configs["max.message.bytes"].value)
        except (KafkaException, KeyError, ValueError) as exc:
            # A topic just created answers "unknown" for a moment.
            if time.monotonic() > deadline:
                log.warning(
                    "max.message.bytes of %s unreadable (%s); assuming %d",
                    topic,
                    exc,
                    BROKER_DEFAULT_MAX_BYTES,
                )
                return BROKER_DEFAULT_MAX_BYTES
            time.sleep(0.5)


def loop_limits(consumer_conf: dict[str, Any]) -> tuple[float, float]:
    """(poll gap, confirm seconds) for the frozen-loop watch (``RenderSchedule``).

    Heartbeats stop only when the whole process stops (SIGSTOP, a VM pause), and the
    loop then stops too: a loop silent longer than the gap may have lost its
    partitions. The confirm time is long enough for a heartbeat to answer and
    librdkafka to report a lost session.
    """
    session_s = float(consumer_conf["session.timeout.ms"]) / 1000
    heartbeat_s = float(consumer_conf["heartbeat.interval.ms"]) / 1000
    return max(1.0, session_s - 2 * heartbeat_s), max(3.0, 3 * heartbeat_s)


def reference_reader(s: AggregatorSettings, config: StateConfig) -> ReferenceReader | None:
    """The drift references reader, if a reference topic is set."""
    if not s.reference_topic:
        return None
    return ReferenceReader(
        s.reference_topic,
        {**s.kafka_config(), "client.id": f"modelpulse-{s.shard_id}-references", **s.kafka},
        config,
        s.schema_registry(),
        group_id=f"{s.group_id}-references",
    )


def close_bounded(consumer: Consumer, seconds: float) -> bool:
    """Close the consumer (leave the group) within ``seconds``; False if it took longer.

    close() runs the revoke callback and waits for the coordinator; a group in the
    middle of a rebalance can keep it waiting. The final snapshot is what the next
    owner resumes from, so giving up on a slow goodbye loses nothing.
    """

    def close() -> None:
        try:
            consumer.close()
        except Exception as exc:
            log.warning("consumer close: %s", exc)

    closer = threading.Thread(target=close, name="modelpulse-close", daemon=True)
    closer.start()
    closer.join(seconds)
    return not closer.is_alive()
