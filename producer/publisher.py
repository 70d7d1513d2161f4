"""``PredictionPublisher``: record predictions without slowing the inference path.

``publish()`` validates its arguments, appends one tuple to a lock-free deque and
returns. A background thread drains the deque every ``linger_seconds`` (sooner when
``batch_max_events`` are waiting), encodes per (model, version) and hands the
messages to librdkafka, which retries on its own. Delivery results are counted,
never raised into the caller.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from itertools import count
from operator import itemgetter
from types import TracebackType
from typing import Any, Self

import numpy as np
from confluent_kafka import KafkaError, Message, Producer

from producer.encode import Row, encode_batch, encode_events, encode_heartbeat, encode_label
from producer.errors import InvalidEvent, PublisherClosed
from producer.settings import PublisherSettings
from schemas.registry import record_subject
from schemas.wire import OUTCOME_CODES, OUTCOMES, SchemaId, raw_schema

__all__ = ["PredictionPublisher", "PublisherStats", "Tracker"]

log = logging.getLogger("modelpulse.producer")

_INF = math.inf
_time = time.time
_key_of = itemgetter(0, 1)
_UNKNOWN_KIND = "unknown"
# Epoch seconds stay below this until the year 5138; epoch milliseconds of any date
# after 1973 are above it, so the two cannot be confused.
_MAX_EPOCH_SECONDS = 1e11
# Generated event ids come from a pool the flusher keeps topped up, in blocks of this many.
_ID_BLOCK = 1024
_ID_POOL_MAX = 65_536


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counts of events since the publisher started.

    ``published`` were accepted by ``publish()``; of those, ``sent`` are acknowledged
    by the broker, ``failed`` could not be delivered (or encoded) and ``queued`` are
    still in the buffer or in flight. ``dropped`` were refused because the buffer was
    full (``publish()`` returned ""). The ``labels_*`` fields count ``label()`` calls
    the same way.
    """

    published: int
    queued: int
    sent: int
    failed: int
    dropped: int
    labels_published: int = 0
    labels_queued: int = 0
    labels_sent: int = 0
    labels_failed: int = 0
    labels_dropped: int = 0


@dataclass(slots=True)
class Tracker:
    """What ``track()`` yields: set the prediction and friends inside the block."""

    prediction: Any = None
    score: float | None = None
    label: Any = None
    outcome: str | None = None
    segment: str | None = None
    features: Mapping[str, float] | None = None
    event_id: str = ""
    latency_seconds: float = field(default=0.0)


class PredictionPublisher:
    """Publish one event per prediction to Kafka, and ground-truth labels that come later.

    >>> with PredictionPublisher(PublisherSettings()) as pub:  # doctest: +SKIP
    ...     event_id = pub.publish("churn", "v3", 0.012, prediction="yes", score=0.91)
    ...     pub.label("churn", event_id, "no")  # later, when the truth is known
    True
    """

    def __init__(self, settings: PublisherSettings | None = None) -> None:
        self.settings = s = settings or PublisherSettings()
        self._queue: deque[tuple[Any, ...]] = deque()
        self._limit = s.max_buffered_events
        self._wake_at = min(s.batch_max_events, max(1, s.max_buffered_events // 2))
        self._max_features = s.max_features
        self._max_len = s.max_string_length
        self._block = s.on_full == "block"
        # (model, version) -> True (regression), False (classification), or unknown yet.
        self._kinds: dict[tuple[str, str], bool | str] = {}
        # (model, version, kind) of the last validated call: the identity fast path.
        self._last: tuple[Any, Any, bool | str | None] = (None, None, None)
        self._closed = False
        self._closing = False
        self._wake = threading.Event()
        self._drain_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._accepted = 0  # updated by the flusher (rows drained) + len(queue)
        self._dropped = 0
        self._sent = 0
        self._failed = 0
        self._in_flight = 0
        self._last_warning = 0.0
        # Generated event ids are hex() of a counter that starts at a random 56-bit
        # multiple of 2**32, so ids of different publishers do not collide. Making a str
        # costs the caller ~0.15 us (measured), so publish() only pops one from a pool
        # that the flusher thread refills between rounds, a block at a time with numpy.
        self._id_base = int.from_bytes(os.urandom(7), "big") << 32
        self._id_blocks = count()
        self._id_pool: deque[str] = deque()
        self._next_id = self._id_pool.popleft
        self._labels: deque[tuple[str, str, Any, float | datetime, str]] = deque()
        self._labels_accepted = 0
        self._labels_dropped = 0
        self._labels_sent = 0
        self._labels_failed = 0
        self._labels_in_flight = 0

        ids = self._schema_ids(s)
        self._batch_id, self._event_id, self._heartbeat_id, self._label_id = ids
        self._top_up_ids(0)
        # librdkafka's own log lines go to Python logging, not to the service's stderr.
        config = s.kafka_config()
        self._producer = Producer(config, logger=log)
        # Stay under the broker's default 1 MB message limit unless told otherwise.
        self._max_message_bytes = int(int(config.get("message.max.bytes", 1_000_000)) * 0.9)
        self._topic = s.topic
        self._feedback_topic = s.feedback_topic
        self._thread = threading.Thread(target=self._run, name="modelpulse-flusher", daemon=True)
        self._thread.start()
        self._heartbeats: threading.Thread | None = None
        if s.heartbeat_seconds > 0:
            _warn_without_psutil()
            self._heartbeats = threading.Thread(
                target=self._beat, name="modelpulse-heartbeat", daemon=True
            )
            self._heartbeats.start()

    @staticmethod
    def _schema_ids(s: PublisherSettings) -> tuple[int, int, int, int]:
        ids = (
            SchemaId.PREDICTION_BATCH,
            SchemaId.PREDICTION_EVENT,
            SchemaId.RESOURCE_HEARTBEAT,
            SchemaId.LABEL_FEEDBACK,
        )
        registry = s.registry_client()
        if registry is None:
            return (int(ids[0]), int(ids[1]), int(ids[2]), int(ids[3]))
        batch, event, beat, label = (
            registry.register(record_subject(raw_schema(i)), raw_schema(i)) for i in ids
        )
        return batch, event, beat, label

    # -- the hot path -----------------------------------------------------------------

    def publish(
        self,
        model: str,
        version: str = "",
        latency_seconds: float = 0.0,
        *,
        prediction: Any = None,
        score: float | None = None,
        label: Any = None,
        outcome: str = "ok",
        event_time: float | datetime | None = None,
        event_id: str = "",
        segment: str | None = None,
        features: Mapping[str, float] | None = None,
    ) -> str:
        """Record one prediction; returns its event id, or "" when it was dropped (buffer full).

        ``prediction``/``label`` are class labels (str or int) for classifiers and
        finite floats for regressors; ``event_time`` is epoch seconds (not
        milliseconds) or a datetime (default now). ``event_id`` is the caller's id of
        the prediction; without one a compact unique id is generated. Either way the id
        is returned: give it to ``label()`` when the ground truth arrives later. Raises
        ``InvalidEvent`` naming the bad field; never blocks on Kafka.
        """
        # The common case is checked first and cheaply: outcome "ok", the same model and
        # version as the previous call (identity), a prediction of the known kind.
        if outcome == "ok":
            code = 0
        else:
            code = OUTCOME_CODES.get(outcome, -1) if outcome.__class__ is str else -1
            if code < 0:
                raise InvalidEvent("outcome", f"{outcome!r} is not one of {', '.join(OUTCOMES)}")
        try:
            if not 0.0 <= latency_seconds < _INF:
                raise InvalidEvent(
                    "latency_seconds", f"must be finite and >= 0, got {latency_seconds!r}"
                )
            if score is not None and not 0.0 <= score <= 1.0:
                raise InvalidEvent("score", f"must be in [0, 1], got {score!r}")
        except TypeError:
            raise InvalidEvent(
                "latency_seconds" if score is None else "latency_seconds/score",
                "must be a number",
            ) from None
        last = self._last
        if last[0] is model and last[1] is version:
            kind = last[2]
        else:
            # A service that alternates between models misses the identity check on
            # every call: the dict of validated (model, version) keys keeps it fast.
            try:
                kind = self._kinds.get((model, version))
            except TypeError:  # unhashable model or version: _check says which
                kind = None
        pc = prediction.__class__
        if kind is False:
            fast = (
                (pc is str and len(prediction) <= self._max_len) or prediction is None or pc is int
            )
        else:
            # The chained comparison is False for NaN as well as for the infinities.
            fast = kind is True and (
                (pc is float and -_INF < prediction < _INF) or prediction is None
            )
        if not fast or (
            label is not None
            and (
                label.__class__ is not pc
                or (pc is str and len(label) > self._max_len)
                or (pc is float and not -_INF < label < _INF)
            )
        ):
            self._check((model, version), prediction, label)
        if segment is not None and (segment.__class__ is not str or len(segment) > self._max_len):
            raise InvalidEvent("segment", f"must be a str of at most {self._max_len} chars")
        if features is not None:
            self._check_features(features)
        if event_id:
            if event_id.__class__ is not str or len(event_id) > self._max_len:
                _check_event_id(event_id, self._max_len)
        else:
            try:
                event_id = self._next_id()
            except IndexError:  # a burst outran the flusher: make a block here
                event_id = self._new_ids()
        if event_time is None:
            event_time = _time()
        elif event_time.__class__ is not float or not 0.0 <= event_time < _MAX_EPOCH_SECONDS:
            _check_event_time(event_time)
        row = (
            model,
            version,
            event_time,
            latency_seconds,
            code,
            prediction,
            score,
            label,
            segment,
            features,
            event_id,
        )
        queue = self._queue
        n = len(queue)
        if n >= self._limit:  # also taken once closed (the limit drops to -1)
            return self._full(row)
        queue.append(row)
        if n >= self._wake_at and not self._wake.is_set():
            self._wake.set()
        return event_id

    def _new_ids(self) -> str:
        """Add one block of fresh ids to the pool and return one of them."""
        start = self._id_base + next(self._id_blocks) * _ID_BLOCK
        high, low = divmod(start, 1 << 32)
        if high == 0 or low + _ID_BLOCK > 1 << 32:  # the prefix would change inside the block
            self._id_pool.extend(map(hex, range(start + 1, start + _ID_BLOCK)))
            return hex(start)
        ids = _hex_block(hex(high), low)
        self._id_pool.extend(ids[1:])
        return ids[0]

    def _top_up_ids(self, drained: int) -> None:
        """Refill the id pool to twice what a flush round consumes (at least two wake-ups)."""
        target = min(_ID_POOL_MAX, 2 * max(drained, self._wake_at, _ID_BLOCK))
        while len(self._id_pool) < target:
            self._new_ids()

    def _check(self, key: tuple[str, str], prediction: Any, label: Any) -> None:
        """The rarely taken part of validation: new (model, version), types, lengths."""
        model, version = key
        if key not in self._kinds:
            if not isinstance(model, str) or not model:
                raise InvalidEvent("model", "must be a non-empty str")
            if not isinstance(version, str):
                raise InvalidEvent("version", "must be a str")
            if len(model) > self._max_len or len(version) > self._max_len:
                raise InvalidEvent(
                    "model" if len(model) > self._max_len else "version",
                    f"longer than {self._max_len} chars",
                )
        kind = self._kinds.get(key, _UNKNOWN_KIND)
        for name, value in (("prediction", prediction), ("label", label)):
            if value is None:
                continue
            if isinstance(value, bool | int | str):
                if isinstance(value, str) and len(value) > self._max_len:
                    raise InvalidEvent(name, f"class label longer than {self._max_len} chars")
                if kind is True and isinstance(value, str):
                    raise InvalidEvent(name, f"{model}/{version} is a regression model: got str")
                if kind is _UNKNOWN_KIND:
                    kind = False
            elif isinstance(value, float):
                if kind is False:
                    raise InvalidEvent(
                        name, f"{model}/{version} is a classification model: got float"
                    )
                if not math.isfinite(value):
                    raise InvalidEvent(name, f"a regression value must be finite, got {value!r}")
                kind = True
            else:
                raise InvalidEvent(name, f"must be str, int or float, got {type(value).__name__}")
        self._kinds[key] = kind
        if kind is not _UNKNOWN_KIND:
            self._last = (model, version, kind)

    def _check_features(self, features: Mapping[str, float]) -> None:
        if len(features) > self._max_features:
            raise InvalidEvent("features", f"more than {self._max_features} features")
        for name, value in features.items():
            if not isinstance(name, str) or not name or len(name) > self._max_len:
                raise InvalidEvent("features", f"bad feature name {name!r}")
            if not isinstance(value, int | float):
                raise InvalidEvent("features", f"{name}: must be a number, got {value!r}")

    def _full(self, row: tuple[Any, ...]) -> str:
        if self._closed:
            raise PublisherClosed("publish() after close()")
        if self._wait_for_room(self._queue, row):
            return str(row[10])
        with self._count_lock:
            self._dropped += 1
        self._warn_full("events", self._dropped)
        return ""

    def _wait_for_room(self, queue: deque[Any], row: tuple[Any, ...]) -> bool:
        """With ``on_full="block"``: append ``row`` once there is room, within the timeout."""
        if not self._block:
            return False
        deadline = time.monotonic() + self.settings.block_timeout_seconds
        self._wake.set()
        while time.monotonic() < deadline:
            time.sleep(0.0005)
            if len(queue) < self._limit:
                queue.append(row)
                return True
        return False

    def _warn_full(self, what: str, dropped: int) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            log.warning(
                "modelpulse buffer full (%d %s): dropping; %d dropped so far",
                self._limit,
                what,
                dropped,
            )

    # -- labels that arrive later -----------------------------------------------------

    def label(
        self,
        model: str,
        event_id: str,
        label: Any,
        label_time: float | datetime | None = None,
        version: str | None = None,
    ) -> bool:
        """Send the ground truth of an earlier prediction; False when dropped (buffer full).

        ``event_id`` is the id ``publish()`` returned (or was given) for the prediction,
        ``model`` the same model name, so the label goes to the same partition number
        of ``feedback_topic`` as the prediction went to in ``topic``. ``label`` is a
        class label (str, or int as ``publish()`` takes it) or a finite float for a
        regression model; ``label_time`` is when the label became known, in epoch
        seconds or a datetime (default now); ``version`` is the model version if known.
        Raises ``InvalidEvent`` naming the bad field; never blocks on Kafka.

        >>> event_id = pub.publish("fraud", "v7", 0.004, prediction="legit")  # doctest: +SKIP
        >>> pub.label("fraud", event_id, "fraud")  # weeks later: a chargeback  # doctest: +SKIP
        True
        """
        max_len = self._max_len
        if model.__class__ is not str or not model or len(model) > max_len:
            _check_name("model", model, max_len)
        if event_id.__class__ is not str or not event_id or len(event_id) > max_len:
            _check_name("event_id", event_id, max_len)
        if version is None:
            version = ""
        elif version.__class__ is not str or len(version) > max_len:
            _check_name("version", version, max_len, empty_ok=True)
        if isinstance(label, str):
            if len(label) > max_len:
                raise InvalidEvent("label", f"class label longer than {max_len} chars")
        elif isinstance(label, bool | int):
            label = str(label)  # as publish() puts an int class on the wire
        elif isinstance(label, float):
            if not math.isfinite(label):
                raise InvalidEvent("label", f"a regression value must be finite, got {label!r}")
            label = float(label)
        else:
            raise InvalidEvent(
                "label", f"must be str, int or a finite float, got {type(label).__name__}"
            )
        if label_time is None:
            label_time = _time()
        else:
            _check_event_time(label_time, "label_time")
        row = (model, event_id, label, label_time, version)
        queue = self._labels
        n = len(queue)
        if n >= self._limit:
            if self._closed:
                raise PublisherClosed("label() after close()")
            if self._wait_for_room(queue, row):
                return True
            with self._count_lock:
                self._labels_dropped += 1
            self._warn_full("labels", self._labels_dropped)
            return False
        queue.append(row)
        if n >= self._wake_at and not self._wake.is_set():
            self._wake.set()
        return True

    @contextmanager
    def track(self, model: str, version: str = "", **fields: Any) -> Iterator[Tracker]:
        """Time the block and publish it; an exception becomes outcome=error and re-raises.

        >>> with pub.track("churn", "v3") as t:  # doctest: +SKIP
        ...     t.prediction, t.score = clf.predict_one(x)
        """
        tracker = Tracker(**fields)
        start = time.perf_counter()
        try:
            yield tracker
        except BaseException as exc:
            tracker.latency_seconds = time.perf_counter() - start
            outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
            self._publish_tracked(model, version, tracker, tracker.outcome or outcome)
            raise
        tracker.latency_seconds = time.perf_counter() - start
        self._publish_tracked(model, version, tracker, tracker.outcome or "ok")

    def _publish_tracked(self, model: str, version: str, t: Tracker, outcome: str) -> None:
        t.event_id = self.publish(
            model,
            version,
            t.latency_seconds,
            prediction=t.prediction,
            score=t.score,
            label=t.label,
            outcome=outcome,
            segment=t.segment,
            features=t.features,
            event_id=t.event_id,
        )

    # -- the background side ----------------------------------------------------------

    def _run(self) -> None:
        linger = self.settings.linger_seconds
        while True:
            self._wake.wait(linger)
            self._wake.clear()
            closing = self._closing
            try:
                self._top_up_ids(self.drain())
            except Exception:  # never let the flusher die; the next round retries
                log.exception("modelpulse flusher failed")
            self._producer.poll(0)
            if closing:
                return

    def drain(self) -> int:
        """Encode and hand to librdkafka everything buffered now; returns the records."""
        with self._drain_lock:
            sent = self._drain_labels() if self._labels else 0
            queue = self._queue
            n = len(queue)
            if n == 0:
                return sent
            pop = queue.popleft
            rows = [pop() for _ in range(n)]
            with self._count_lock:
                self._accepted += n
            keys = set(map(_key_of, rows))
            groups: dict[tuple[str, str], list[Any]]
            if len(keys) == 1:
                groups = {keys.pop(): rows}
            else:
                groups = {}
                for r in rows:
                    groups.setdefault(_key_of(r), []).append(r)
            size = self.settings.batch_max_events
            for (model, _), group in groups.items():
                for start in range(0, len(group), size):
                    self._send(model, group[start : start + size])
            return n + sent

    def _drain_labels(self) -> int:
        """One framed ``LabelFeedback`` per label on the feedback topic, keyed by model."""
        queue = self._labels
        n = len(queue)
        pop = queue.popleft
        rows = [pop() for _ in range(n)]
        with self._count_lock:
            self._labels_accepted += n
        callback = self._label_delivered
        for row in rows:
            try:
                value = encode_label(row, schema_id=self._label_id)
            except Exception:
                log.exception("modelpulse could not encode a label of %s", row[0])
                with self._count_lock:
                    self._labels_failed += 1
                continue
            with self._count_lock:
                self._labels_in_flight += 1
            exc = self._hand_over(self._feedback_topic, value, row[0].encode(), callback)
            if exc is not None:
                log.error("modelpulse produce of a label failed (%s)", exc)
                with self._count_lock:
                    self._labels_in_flight -= 1
                    self._labels_failed += 1
        return n

    def _label_delivered(self, err: KafkaError | None, _msg: Message) -> None:
        with self._count_lock:
            self._labels_in_flight -= 1
            if err is None:
                self._labels_sent += 1
                return
            self._labels_failed += 1
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            log.warning("modelpulse delivery of a label failed: %s", err)

    def _send(self, model: str, rows: list[Row]) -> None:
        s = self.settings
        key = model.encode()
        try:
            if s.mode == "batch":
                pending = [rows]
                while pending:
                    part = pending.pop()
                    value = encode_batch(
                        part, service=s.service, instance=s.instance, schema_id=self._batch_id
                    )
                    if len(value) > self._max_message_bytes and len(part) > 1:
                        # Wide rows (many features, long ids): halve until it fits.
                        half = len(part) // 2
                        pending += [part[half:], part[:half]]
                        continue
                    self._produce(key, value, len(part))
                return
            values = encode_events(
                rows, service=s.service, instance=s.instance, schema_id=self._event_id
            )
        except Exception:
            log.exception("modelpulse could not encode %d events of %s", len(rows), model)
            with self._count_lock:
                self._failed += len(rows)
            return
        # One lock round and one shared callback for the lot: per event, only produce().
        with self._count_lock:
            self._in_flight += len(values)
        hand_over, topic, callback = self._hand_over, self._topic, self._delivered_one
        for value in values:
            exc = hand_over(topic, value, key, callback)
            if exc is not None:
                log.error("modelpulse produce failed (%s); 1 event lost", exc)
                with self._count_lock:
                    self._in_flight -= 1
                    self._failed += 1

    def _produce(self, key: bytes, value: bytes, count: int) -> None:
        callback = partial(self._delivered, count)
        with self._count_lock:
            self._in_flight += count
        exc = self._hand_over(self._topic, value, key, callback)
        if exc is not None:
            log.error("modelpulse produce failed (%s); %d events lost", exc, count)
            with self._count_lock:
                self._in_flight -= count
                self._failed += count

    def _hand_over(
        self, topic: str, value: bytes, key: bytes, callback: Callable[..., None]
    ) -> Exception | None:
        """``produce()``, serving delivery callbacks while librdkafka's queue is full;
        the error that lost the message, or None once it is queued."""
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=callback)
                return None
            except BufferError:  # librdkafka's queue is full: serve callbacks, retry
                self._producer.poll(0.05)
            except Exception as exc:
                return exc

    def _delivered_one(self, err: KafkaError | None, msg: Message) -> None:
        self._delivered(1, err, msg)

    def _delivered(self, count: int, err: KafkaError | None, _msg: Message) -> None:
        with self._count_lock:
            self._in_flight -= count
            if err is None:
                self._sent += count
                return
            self._failed += count
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            log.warning("modelpulse delivery failed for %d events: %s", count, err)

    def _beat(self) -> None:
        from producer.resources import ResourceSampler  # noqa: PLC0415 - optional deps

        sampler = ResourceSampler()
        key = (self.settings.service or self.settings.instance).encode()
        while not self._closing:
            time.sleep(self.settings.heartbeat_seconds)
            if self._closing:
                return
            try:
                value = encode_heartbeat(
                    sampler.sample(self.settings.service, self.settings.instance),
                    schema_id=self._heartbeat_id,
                )
                self._producer.produce(self._topic, value, key)
            except Exception as exc:  # heartbeats are best effort
                log.debug("modelpulse heartbeat not sent: %s", exc)

    # -- lifecycle --------------------------------------------------------------------

    def stats(self) -> PublisherStats:
        """Counts so far (cheap; safe from any thread)."""
        with self._count_lock:
            buffered = len(self._queue)
            labels = len(self._labels)
            return PublisherStats(
                published=self._accepted + buffered,
                queued=buffered + self._in_flight,
                sent=self._sent,
                failed=self._failed,
                dropped=self._dropped,
                labels_published=self._labels_accepted + labels,
                labels_queued=labels + self._labels_in_flight,
                labels_sent=self._labels_sent,
                labels_failed=self._labels_failed,
                labels_dropped=self._labels_dropped,
            )

    def flush(self, timeout_seconds: float = 30.0) -> int:
        """Send everything buffered and wait for the broker; returns records still queued."""
        self.drain()
        self._producer.flush(timeout_seconds)
        stats = self.stats()
        return stats.queued + stats.labels_queued

    def close(self, timeout_seconds: float = 30.0) -> PublisherStats:
        """Flush and stop; events not delivered within the timeout count as queued."""
        if self._closed:
            return self.stats()
        self._closed = True
        self._limit = -1  # publish() now takes its slow path, which raises
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_seconds)
        if self._heartbeats is not None:
            self._heartbeats.join(timeout=1.0)
        self.drain()
        self._producer.flush(timeout_seconds)
        stats = self.stats()
        if stats.queued or stats.labels_queued:
            log.warning(
                "modelpulse closed with %d events and %d labels undelivered",
                stats.queued,
                stats.labels_queued,
            )
        return stats

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NIBBLE_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)


def _hex_block(prefix: str, low: int) -> list[str]:
    """``hex(high << 32 | low + i)`` for i < _ID_BLOCK, ``prefix`` being ``hex(high)``.

    ``hex()`` per id costs the flusher, which shares the caller's core, ~0.1 us; here
    numpy writes the fixed-width low 8 digits of the whole block and Python only slices.
    """
    width = len(prefix) + 8
    # One separator column, so that str.split (in C) cuts the block into ids.
    chars = np.empty((_ID_BLOCK, width + 1), dtype=np.uint8)
    chars[:, : len(prefix)] = np.frombuffer(prefix.encode(), dtype=np.uint8)
    lows = np.arange(low, low + _ID_BLOCK, dtype=np.uint32)
    chars[:, len(prefix) : width] = _HEX_DIGITS[(lows[:, None] >> _NIBBLE_SHIFTS) & 0xF]
    chars[:, width] = ord(" ")
    return chars.tobytes()[:-1].decode("ascii").split(" ")


def _check_event_time(value: Any, name: str = "event_time") -> None:
    """The slow path of ``event_time``: datetimes, ints, numpy numbers, and mistakes."""
    if isinstance(value, datetime):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidEvent(name, f"must be epoch seconds or a datetime, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidEvent(name, f"must be finite epoch seconds >= 0, got {value!r}")
    if seconds >= _MAX_EPOCH_SECONDS:
        unit = "microseconds" if seconds >= _MAX_EPOCH_SECONDS * 1000 else "milliseconds"
        if seconds >= _MAX_EPOCH_SECONDS * 1e6:
            unit = "nanoseconds"
        raise InvalidEvent(
            name,
            f"{value!r} looks like epoch {unit}; epoch seconds are expected (e.g. time.time())",
        )


def _check_event_id(value: Any, max_len: int) -> None:
    """The slow path of a caller's ``event_id``: say what is wrong with it."""
    if not isinstance(value, str):
        raise InvalidEvent("event_id", f"must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise InvalidEvent("event_id", f"longer than {max_len} chars")


def _check_name(field: str, value: Any, max_len: int, *, empty_ok: bool = False) -> None:
    """Raise ``InvalidEvent`` for a name of ``label()`` that is not a short non-empty str."""
    if not isinstance(value, str):
        raise InvalidEvent(field, f"must be a str, got {type(value).__name__}")
    if not value and not empty_ok:
        raise InvalidEvent(field, "must not be empty")
    if len(value) > max_len:
        raise InvalidEvent(field, f"longer than {max_len} chars")


def _warn_without_psutil() -> None:
    """Heartbeats without psutil carry no CPU or memory figure: say so once, at setup."""
    try:
        import psutil  # noqa: F401, PLC0415 - optional dependency, only probed
    except ImportError:
        warnings.warn(
            "heartbeat_seconds is set but psutil is not installed: heartbeats will carry "
            "no CPU or memory usage; install 'modelpulse[resources]' (and "
            "'modelpulse[gpu]' for NVIDIA GPUs)",
            RuntimeWarning,
            stacklevel=3,
        )
