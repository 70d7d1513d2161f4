"""One aggregator shard: the consume loop, rebalance wiring and render scheduling.

The work is elsewhere: ``route`` (pure: messages -> what the state ingests, and the
dead-letter records), ``deadletters``, ``snapshots`` (restore, write, commit: offsets
live with the state), ``edge`` (input topics, client configs, topic admin) and
``partitions`` (consume errors, idle markers, lag). Partitions are keyed by
(topic, partition) throughout; each input topic maps to its handler in
``Shard.inputs`` (today only the predictions; docs/architecture.md says where a
second one goes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from aggregator.deadletters import DeadLetter, DeadLetters
from aggregator.edge import (
    STATE_MAX_BYTES,
    InputTopic,
    TopicPartitionKey,
    close_bounded,
    consumer_config,
    ensure_topics,
    loop_limits,
    max_message_bytes,
    producer_config,
    reference_reader,
    restore_config,
)
from aggregator.errors import AggregatorError
from aggregator.feedback import Feedback, ensure_feedback_topic
from aggregator.metrics import ShardHealth
from aggregator.partitions import (
    UNREADABLE,
    FetchErrors,
    IdleMarkers,
    Owned,
    split_batch,
    update_lag,
)
from aggregator.references import TrainingReference
from aggregator.render import RenderSchedule
from aggregator.resolver import SchemaResolver
from aggregator.route import Decoders, MessageLike, ingest, route
from aggregator.server import MetricsServer
from aggregator.settings import AggregatorSettings
from aggregator.snapshots import Snapshots, Stopping
from aggregator.state import PartitionState
from aggregator.webconfig import load_web_config
from schemas.codec import MARKER_GROUP_HEADER

__all__ = ["MARKER_HEADER", "SHUTDOWN_BOUND_SECONDS", "Shard"]

log = logging.getLogger("modelpulse.aggregator")

# Message bytes per consumed batch (see Shard.process_batch).
_BATCH_BYTES = 16 * 1024 * 1024
# Header that marks a watermark marker as written by a shard of this group.
MARKER_HEADER = MARKER_GROUP_HEADER
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
# The feedback reader (late labels) has no group to leave: its close is short.
_FEEDBACK_CLOSE_SECONDS = 1.0
SHUTDOWN_BOUND_SECONDS = (
    _SNAPSHOT_SECONDS
    + _FINAL_SNAPSHOT_SECONDS
    + _CLOSE_SECONDS
    + _FINAL_FLUSH_SECONDS
    + _FEEDBACK_CLOSE_SECONDS
)
Key = TopicPartitionKey
_UNREADABLE = UNREADABLE  # the dead-letter reasons of fetch errors (tests read them)


class Shard:
    """An aggregator process: owns some partitions of the input topics.

    >>> Shard(AggregatorSettings(http_port=9464)).run()  # doctest: +SKIP
    """

    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = s = settings
        self.config = s.state_config()
        self.resolver = SchemaResolver(s.schema_registry())
        self._decoders = Decoders(self.resolver, ids=self.config.join is not None)
        # Each input topic and its handler; a second one (e.g. the label feedback of
        # issue 9) is one more entry here (docs/architecture.md).
        self.inputs = {
            t.name: t for t in [InputTopic(s.input_topic, s.state_topic, self._ingest_predictions)]
        }
        self._topics = list(self.inputs)
        self.health = ShardHealth(up_since=time.time())
        self.server = MetricsServer(s.http_host, s.http_port)
        if s.web_config_file:  # TLS and basic auth whoever builds the shard
            self.server.use_web_config(load_web_config(s.web_config_file))
        self._stop = threading.Event()
        self._fatal: Exception | None = None
        self._last_snapshot = time.monotonic()
        self._closing = False
        self.close_timed_out = False  # the entry point then exits without waiting on it
        self.batch_limit = s.batch_size  # messages per consume(); adapted to their size
        consumer_conf = consumer_config(s)
        self.consumer = Consumer(consumer_conf, logger=log)
        gap, confirm = loop_limits(consumer_conf)
        self.server.watch_loop(gap)
        self._render = RenderSchedule(
            self.config,
            self.server,
            max_series=s.max_series,
            references=self.training_references,
            interval=s.render_interval_seconds,
            poll_gap_limit=gap,
            confirm_seconds=confirm,
        )
        self.producer = Producer(producer_config(s), logger=log)
        self.dead_letters = DeadLetters(
            self.producer, s.dead_letter_topic, self.health, self._refresh_health
        )
        self.snapshots = Snapshots(
            self.config,
            {t.name: t.state_topic for t in self.inputs.values()},
            producer=self.producer,
            consumer=self.consumer,
            restore_conf=restore_config(s),
            dead_letters=self.dead_letters,
            stop=self._stop,
            rebuild=s.rebuild_state,
        )
        self._fetch_errors = FetchErrors(
            self.consumer, self.dead_letters, self.health, self._refresh_health
        )
        self._markers = IdleMarkers(s, self.resolver, self.producer)
        self.owned = Owned(self.snapshots, self._markers, self.health)
        self.states = self.owned.states  # the same dict: (topic, partition) -> state
        self._admin = AdminClient({**s.kafka_config(), "logger": log})
        self._references = reference_reader(s, self.config)
        # Late labels: their partitions follow the input partitions this shard owns.
        self.feedback = (
            Feedback(s, self.resolver, self.dead_letters, self.states) if s.feedback_topic else None
        )

    def ensure_topics(self, wait_seconds: float = 60.0) -> int:
        """Wait for the input topics; create the state and dead-letter topics if missing.
        Returns the partition count of the (first) input topic."""
        s = self.settings
        inputs = list(self.inputs.values())
        partitions = ensure_topics(self._admin, inputs, s.dead_letter_topic, wait_seconds)
        self.dead_letters.set_max_bytes(
            min(max_message_bytes(self._admin, s.dead_letter_topic), STATE_MAX_BYTES)
        )
        if s.feedback_topic:
            ensure_feedback_topic(
                self._admin, s.feedback_topic, s.input_topic, partitions[s.input_topic]
            )
        return partitions[inputs[0].name]

    # -- rebalance ---------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.server.set_ready(False, "restoring partitions")
        mine = [Key(tp.topic, tp.partition) for tp in partitions if tp.topic in self.inputs]
        try:
            self.owned.take(partitions, self.snapshots.restore(mine))
        except Stopping:
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
        consumer.incremental_assign(partitions)
        if self.feedback is not None:
            self.feedback.follow(mine)
        self._render.rebalanced(assigned=True)
        self.server.set_ready(True)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = [k for k in (Key(tp.topic, tp.partition) for tp in partitions) if k in self.states]
        # The next owner may serve them as soon as this returns: stop serving them now.
        self._render.refuse("partitions moving to another shard")
        if not self._closing:  # on shutdown the final snapshot was just written
            try:
                self.snapshots.write(self.states, gone, force=True, timeout=_FINAL_SNAPSHOT_SECONDS)
            except Exception as exc:  # the next owner replays from the previous snapshot
                log.warning("final snapshot on revoke failed: %s", exc)
        if self.feedback is not None:
            self.feedback.drop(gone)
        self.owned.drop(gone)
        self._render.rebalanced()
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another shard may own them already: writing a snapshot now could go back in time.
        self._render.refuse("partitions lost to another shard")
        log.warning("partitions %s lost (session expired)", [tp.partition for tp in partitions])
        lost = [Key(tp.topic, tp.partition) for tp in partitions]
        if self.feedback is not None:
            self.feedback.drop(lost)
        self.owned.drop(lost)
        self._render.rebalanced()
        consumer.incremental_unassign(partitions)

    # -- the loop ----------------------------------------------------------------------

    def process_batch(self, msgs: list[Message]) -> None:
        """Route one consumed batch to its partitions' handlers (``run`` does it per poll).

        Also adapts ``batch_limit`` so that one batch holds about ``_BATCH_BYTES`` of
        message values: envelopes are ~1000x larger than single events, and a count
        limit alone would let memory grow with the backlog.
        """
        start = time.perf_counter()
        by_key, nbytes = split_batch(msgs, self.states, self._fetch_errors, self._topics)
        for key, part_msgs in by_key.items():
            self.inputs[key.topic].handle(key, self.states[key], part_msgs)
        if msgs:
            self.health.batches += 1
            self.health.messages += len(msgs)
            self.health.batch_seconds_sum += time.perf_counter() - start
            if nbytes:
                wanted = len(msgs) * _BATCH_BYTES // nbytes
                self.batch_limit = max(16, min(self.settings.batch_size, wanted))

    def _ingest_predictions(self, key: Key, state: PartitionState, msgs: list[Message]) -> None:
        """The predictions handler: route, ingest group by group, dead-letter.

        ``--max-future`` is measured against min(Kafka timestamp, this shard's clock at
        ingest), the clock read once per call (``route``; RELIABILITY.md).
        """
        groups = route(
            msgs,
            self._decoders,
            self.settings.group_id,
            max_rows_per_envelope=state.config.max_rows_per_envelope,
            ingest_ms=int(time.time() * 1000),
        )
        self.dead_letters.send_all(ingest(state, groups))

    def _maybe_render(self) -> None:
        if self._render.due(self.owned.versions()):
            update_lag(self.consumer, self.states, self.snapshots.snapshotted, self.health)
            self._render.submit(self.owned.views(), self.health)

    def _refresh_health(self) -> None:
        stuck = sorted(p for p, v in self.health.stuck_partitions.items() if v)
        if stuck:
            self.server.set_healthy(False, f"partitions stuck: {stuck}")
        elif self.dead_letters.stalled:
            self.server.set_healthy(False, "dead letters refused; snapshots held back")
        elif self._fatal is None:
            self.server.set_healthy(True)
        self._render.force = True

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
        self._render.renderer.start()
        self.consumer.subscribe(
            list(self.inputs),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "shard %s consuming %s as %s; metrics on %s",
            s.shard_id,
            ", ".join(self.inputs),
            s.group_id,
            self.server.url,
        )
        self.server.set_ready(True)
        try:
            while not self._stop.is_set():
                self._render.watch_gap()
                msgs = self.consumer.consume(self.batch_limit, 0.1)
                self.process_batch(msgs)
                if self.feedback is not None:
                    self.feedback.poll()
                self.producer.poll(0)
                now = time.monotonic()
                if now - self._last_snapshot >= s.snapshot_interval_seconds:
                    self._last_snapshot = now
                    try:
                        self._snapshot(timeout=_SNAPSHOT_SECONDS)
                    except (AggregatorError, KafkaException) as exc:
                        log.error("snapshot failed (will retry): %s", exc)
                    self._markers.tick(self.states, self.health.lag)
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
        if self.feedback is not None:
            self.feedback.close(_FEEDBACK_CLOSE_SECONDS)
        if not close_bounded(self.consumer, _CLOSE_SECONDS):
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

    # -- names tests reach for ---------------------------------------------------------

    def _process(self, partition: int, state: PartitionState, msgs: list[MessageLike]) -> None:
        self._ingest_predictions(Key(self.settings.input_topic, partition), state, msgs)

    def _snapshot(self, *, force: bool = False, timeout: float = 30.0) -> None:
        self.snapshots.write(self.states, force=force, timeout=timeout)

    def _dead_letter(self, m: MessageLike, reason: str, detail: str, rows: int) -> None:
        self.dead_letters.send(m, reason, detail, rows)

    @property
    def _dead_letter_max_bytes(self) -> int:
        return self.dead_letters.max_bytes

    @_dead_letter_max_bytes.setter
    def _dead_letter_max_bytes(self, value: int) -> None:
        self.dead_letters.max_bytes = value

    @property
    def _unacked_dead_letters(self) -> list[DeadLetter]:
        return self.dead_letters.unacked
