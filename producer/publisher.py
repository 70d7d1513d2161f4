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
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from operator import itemgetter
from types import TracebackType
from typing import Any, Self

from confluent_kafka import KafkaError, Message, Producer

from producer.encode import Row, encode_batch, encode_event, encode_heartbeat
from producer.errors import InvalidEvent, PublisherClosed
from producer.settings import PublisherSettings
from schemas.registry import SchemaRegistry
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


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counts of events since the publisher started.

    ``published`` were accepted by ``publish()``; of those, ``sent`` are acknowledged
    by the broker, ``failed`` could not be delivered (or encoded) and ``queued`` are
    still in the buffer or in flight. ``dropped`` were refused because the buffer was
    full (``publish()`` returned False).
    """

    published: int
    queued: int
    sent: int
    failed: int
    dropped: int


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
    """Publish one event per prediction to Kafka.

    >>> with PredictionPublisher(PublisherSettings()) as pub:  # doctest: +SKIP
    ...     pub.publish("churn", "v3", 0.012, prediction="yes", score=0.91)
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

        self._batch_id, self._event_id, self._heartbeat_id = self._schema_ids(s)
        # librdkafka's own log lines go to Python logging, not to the service's stderr.
        config = s.kafka_config()
        self._producer = Producer(config, logger=log)
        # Stay under the broker's default 1 MB message limit unless told otherwise.
        self._max_message_bytes = int(int(config.get("message.max.bytes", 1_000_000)) * 0.9)
        self._topic = s.topic
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
    def _schema_ids(s: PublisherSettings) -> tuple[int, int, int]:
        ids = (SchemaId.PREDICTION_BATCH, SchemaId.PREDICTION_EVENT, SchemaId.RESOURCE_HEARTBEAT)
        if not s.schema_registry_url:
            return (int(ids[0]), int(ids[1]), int(ids[2]))
        password = s.schema_registry_password
        registry = SchemaRegistry(
            s.schema_registry_url,
            username=s.schema_registry_user,
            password=None if password is None else password.get_secret_value(),
            ca_file=s.schema_registry_ca_file,
        )
        batch, event, beat = (
            registry.register(
                str(raw_schema(i)["namespace"]) + "." + raw_schema(i)["name"], raw_schema(i)
            )
            for i in ids
        )
        return batch, event, beat

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
    ) -> bool:
        """Record one prediction; returns False when it was dropped (buffer full).

        ``prediction``/``label`` are class labels (str or int) for classifiers and
        finite floats for regressors; ``event_time`` is epoch seconds (not
        milliseconds) or a datetime (default now). Raises ``InvalidEvent`` naming the
        bad field; never blocks on Kafka.
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
        kind = last[2] if last[0] is model and last[1] is version else None
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
        if event_id and len(event_id) > self._max_len:
            raise InvalidEvent("event_id", f"longer than {self._max_len} chars")
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
        return True

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

    def _full(self, row: tuple[Any, ...]) -> bool:
        if self._closed:
            raise PublisherClosed("publish() after close()")
        if self._block:
            deadline = time.monotonic() + self.settings.block_timeout_seconds
            self._wake.set()
            while time.monotonic() < deadline:
                time.sleep(0.0005)
                if len(self._queue) < self._limit:
                    self._queue.append(row)
                    return True
        with self._count_lock:
            self._dropped += 1
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            log.warning(
                "modelpulse buffer full (%d events): dropping; %d dropped so far",
                self._limit,
                self._dropped,
            )
        return False

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
        self.publish(
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
                self.drain()
            except Exception:  # never let the flusher die; the next round retries
                log.exception("modelpulse flusher failed")
            self._producer.poll(0)
            if closing:
                return

    def drain(self) -> int:
        """Encode and hand to librdkafka everything buffered now; returns the events."""
        with self._drain_lock:
            queue = self._queue
            n = len(queue)
            if n == 0:
                return 0
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
            return n

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
            values = [
                encode_event(r, service=s.service, instance=s.instance, schema_id=self._event_id)
                for r in rows
            ]
        except Exception:
            log.exception("modelpulse could not encode %d events of %s", len(rows), model)
            with self._count_lock:
                self._failed += len(rows)
            return
        for value in values:
            self._produce(key, value, 1)

    def _produce(self, key: bytes, value: bytes, count: int) -> None:
        callback = partial(self._delivered, count)
        with self._count_lock:
            self._in_flight += count
        while True:
            try:
                self._producer.produce(self._topic, value, key, on_delivery=callback)
                return
            except BufferError:  # librdkafka's queue is full: serve callbacks, retry
                self._producer.poll(0.05)
            except Exception as exc:
                log.error("modelpulse produce failed (%s); %d events lost", exc, count)
                with self._count_lock:
                    self._in_flight -= count
                    self._failed += count
                return

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
            return PublisherStats(
                published=self._accepted + buffered,
                queued=buffered + self._in_flight,
                sent=self._sent,
                failed=self._failed,
                dropped=self._dropped,
            )

    def flush(self, timeout_seconds: float = 30.0) -> int:
        """Send everything buffered and wait for the broker; returns events still queued."""
        self.drain()
        self._producer.flush(timeout_seconds)
        return self.stats().queued

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
        if stats.queued:
            log.warning("modelpulse closed with %d events undelivered", stats.queued)
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


def _check_event_time(value: Any) -> None:
    """The slow path of ``event_time``: datetimes, ints, numpy numbers, and mistakes."""
    if isinstance(value, datetime):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidEvent(
            "event_time", f"must be epoch seconds or a datetime, got {type(value).__name__}"
        )
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidEvent("event_time", f"must be finite epoch seconds >= 0, got {value!r}")
    if seconds >= _MAX_EPOCH_SECONDS:
        unit = "microseconds" if seconds >= _MAX_EPOCH_SECONDS * 1000 else "milliseconds"
        if seconds >= _MAX_EPOCH_SECONDS * 1e6:
            unit = "nanoseconds"
        raise InvalidEvent(
            "event_time",
            f"{value!r} looks like epoch {unit}; epoch seconds are expected (e.g. time.time())",
        )


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
