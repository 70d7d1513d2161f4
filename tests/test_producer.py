"""The producer library against a real broker: round trips, bad input, outages."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from kafka_util import consume_all

from aggregator.decode import EventChunkBuilder, RowChunk, SchemaResolver, decode_batch
from producer import (
    InvalidEvent,
    PredictionPublisher,
    PublisherClosed,
    PublisherSettings,
)
from schemas.wire import OUTCOMES, SchemaId

T0 = 1_760_000_000.0


def _publisher(bootstrap: str, topic: str, **kw: Any) -> PredictionPublisher:
    kw.setdefault("linger_seconds", 0.02)
    return PredictionPublisher(PublisherSettings(bootstrap_servers=bootstrap, topic=topic, **kw))


def _events(n: int) -> list[dict[str, Any]]:
    """A mix of classification and regression events with every optional field."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        if i % 3 == 2:
            model, version = "price", "r1"
            pred: Any = float(rng.normal(100, 10))
            label: Any = float(pred + rng.normal()) if i % 2 else None
        else:
            model, version = "churn", "v2" if i % 2 else "v1"
            pred = ["yes", "no", "maybe"][i % 3 if i % 5 else 1]
            label = ["yes", "no"][i % 2] if i % 4 else None
        out.append(
            {
                "model": model,
                "version": version,
                "latency_seconds": float(abs(rng.normal(0.02, 0.01))),
                "prediction": pred,
                "score": float(rng.random()) if i % 7 else None,
                "label": label,
                "outcome": OUTCOMES[i % 4] if i % 11 == 0 else "ok",
                "event_time": T0 + i * 0.01,
                "event_id": f"id-{i}" if i % 2 else "",
                "segment": ["eu", "us", None][i % 3],
                "features": {"age": float(i % 50), "income": float(i)} if i % 5 else None,
            }
        )
    return out


def _decode_all(values: list[bytes]) -> list[dict[str, Any]]:
    """Decode messages of either format back into per-event dicts (via the aggregator's code)."""
    resolver = SchemaResolver()
    rows: list[dict[str, Any]] = []
    for value in values:
        kind, rec = resolver.read(value)
        if kind == SchemaId.PREDICTION_BATCH:
            chunk = decode_batch(rec, 0)
        else:
            assert kind == SchemaId.PREDICTION_EVENT
            builder = EventChunkBuilder()
            builder.add(rec, 0)
            chunk = builder.build()
        rows.extend(_chunk_rows(chunk))
    return rows


def _chunk_rows(c: RowChunk) -> list[dict[str, Any]]:
    out = []
    feats: dict[int, dict[str, float]] = {}
    for r, f, v in zip(
        c.feat_row.tolist(), c.feat_code.tolist(), c.feat_value.tolist(), strict=True
    ):
        feats.setdefault(r, {})[c.feature_names[f]] = v
    for i in range(len(c)):
        model, version = c.mv_keys[int(c.mv[i])]
        regression = c.regression[int(c.mv[i])]
        if regression:
            pv, lv = c.pred_value[i], c.label_value[i]
            pred = None if math.isnan(pv) else float(pv)
            label = None if math.isnan(lv) else float(lv)
        else:
            pc, lc = int(c.pred_code[i]), int(c.label_code[i])
            pred = None if pc < 0 else c.classes[pc]
            label = None if lc < 0 else c.classes[lc]
        score = float(c.score[i])
        seg = int(c.segment[i])
        out.append(
            {
                "model": model,
                "version": version,
                "latency_seconds": float(c.latency_seconds[i]),
                "prediction": pred,
                "score": None if math.isnan(score) else score,
                "label": label,
                "outcome": OUTCOMES[int(c.outcome[i])],
                "event_time_ms": int(c.event_time_ms[i]),
                "segment": None if seg < 0 else c.segments[seg],
                "features": feats.get(i),
            }
        )
    return out


def _expected(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": e["model"],
        "version": e["version"],
        "latency_seconds": e["latency_seconds"],
        "prediction": e["prediction"],
        "score": e["score"],
        "label": e["label"],
        "outcome": e["outcome"],
        "event_time_ms": math.floor(e["event_time"] * 1000),
        "segment": e["segment"],
        "features": e["features"] or None,
    }


def _key(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["model"], e["version"], e["event_time_ms"])


@pytest.mark.parametrize("mode", ["batch", "event"])
def test_round_trip_through_kafka(
    mode: str, kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("roundtrip", partitions=3)
    events = _events(3000)
    with _publisher(kafka_bootstrap, topic, mode=mode, batch_max_events=700) as pub:
        for e in events:
            event_id = pub.publish(**e)
            assert event_id == (e["event_id"] or event_id) and event_id
    stats = pub.stats()
    assert (stats.published, stats.sent, stats.failed, stats.dropped, stats.queued) == (
        3000,
        3000,
        0,
        0,
        0,
    )
    msgs = consume_all(kafka_bootstrap, topic, expected=3000 if mode == "event" else None)
    # Kafka key = model name, so each model's events stay in one partition, in order.
    partitions: dict[bytes, set[int]] = {}
    for m in msgs:
        partitions.setdefault(m.key() or b"", set()).add(m.partition())
    assert set(partitions) == {b"churn", b"price"}
    assert all(len(p) == 1 for p in partitions.values())
    if mode == "batch":
        assert len(msgs) < 30  # envelopes, not one message per event
    decoded = sorted(_decode_all([m.value() for m in msgs]), key=_key)  # type: ignore[misc]
    expected = sorted((_expected(e) for e in events), key=_key)
    assert decoded == expected


def test_both_formats_decode_to_the_same_columns(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    events = _events(500)
    decoded = []
    for mode in ("batch", "event"):
        topic = topic_factory(f"same-{mode}")
        with _publisher(kafka_bootstrap, topic, mode=mode) as pub:
            for e in events:
                pub.publish(**e)
        msgs = consume_all(kafka_bootstrap, topic, expected=500 if mode == "event" else None)
        decoded.append(sorted(_decode_all([m.value() for m in msgs]), key=_key))  # type: ignore[misc]
    assert decoded[0] == decoded[1]
    assert len(decoded[0]) == 500


def test_close_flushes_everything(kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("flush", partitions=2)
    n = 50_000
    pub = _publisher(kafka_bootstrap, topic, linger_seconds=5.0)  # nothing leaves on its own
    for i in range(n):
        pub.publish(f"m{i % 5}", "v1", 0.001, prediction="a", event_time=T0 + i / 1000)
    stats = pub.close()
    assert stats.sent == n and stats.queued == 0 and stats.failed == 0
    rows = _decode_all([m.value() for m in consume_all(kafka_bootstrap, topic)])  # type: ignore[misc]
    assert len(rows) == n
    with pytest.raises(PublisherClosed):
        pub.publish("m0", "v1", 0.001)


def test_track_times_and_records_errors(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("track")
    with _publisher(kafka_bootstrap, topic, mode="event") as pub:
        with pub.track("clf", "v1") as t:
            time.sleep(0.02)
            t.prediction, t.score = "cat", 0.8
        with pytest.raises(ZeroDivisionError), pub.track("clf", "v1"):
            _ = 1 / 0
        with pytest.raises(TimeoutError), pub.track("clf", "v1"):
            raise TimeoutError
    rows = _decode_all([m.value() for m in consume_all(kafka_bootstrap, topic, expected=3)])  # type: ignore[misc]
    rows.sort(key=lambda r: r["event_time_ms"])
    assert [r["outcome"] for r in rows] == ["ok", "error", "timeout"]
    assert rows[0]["prediction"] == "cat" and rows[0]["score"] == 0.8
    assert 0.02 <= rows[0]["latency_seconds"] < 1.0


# -- bad input: raised at the call site, nothing buffered ----------------------------


@pytest.fixture
def offline() -> Any:
    pub = PredictionPublisher(
        PublisherSettings(bootstrap_servers="127.0.0.1:1", max_string_length=32, max_features=2)
    )
    yield pub
    pub.close(timeout_seconds=0.1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"latency_seconds": math.nan}, "latency_seconds"),
        ({"latency_seconds": math.inf}, "latency_seconds"),
        ({"latency_seconds": -0.001}, "latency_seconds"),
        ({"latency_seconds": "fast"}, "latency_seconds"),
        ({"outcome": "exploded"}, "outcome"),
        ({"outcome": None}, "outcome"),
        ({"model": ""}, "model"),
        ({"model": "m" * 33}, "model"),
        ({"version": "v" * 33}, "version"),
        ({"score": 1.5}, "score"),
        ({"score": -0.1}, "score"),
        ({"score": math.nan}, "score"),
        ({"features": {"a": 1.0, "b": 2.0, "c": 3.0}}, "features"),
        ({"features": {"a": "x"}}, "features"),
        ({"prediction": "p" * 33}, "prediction"),
        ({"label": "l" * 33}, "label"),
        ({"segment": "s" * 33}, "segment"),
        ({"event_id": "e" * 33}, "event_id"),
        ({"prediction": [1, 2]}, "prediction"),
        ({"prediction": math.nan}, "prediction"),
        ({"prediction": math.inf}, "prediction"),
        ({"event_time": T0 * 1000}, "event_time"),
        ({"event_time": math.nan}, "event_time"),
        ({"event_time": -1.0}, "event_time"),
        ({"event_time": "now"}, "event_time"),
    ],
)
def test_bad_input_raises_naming_the_field(
    offline: PredictionPublisher, kwargs: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {
        "model": "m",
        "version": "v",
        "latency_seconds": 0.01,
        "prediction": "a",
    }
    args.update(kwargs)
    with pytest.raises(InvalidEvent) as info:
        offline.publish(**args)
    assert info.value.field.startswith(field)
    assert isinstance(info.value, ValueError)
    assert offline.stats().published == 0


def test_kind_mismatch_is_caught(offline: PredictionPublisher) -> None:
    offline.publish("m", "v", 0.01, prediction="cat")
    with pytest.raises(InvalidEvent, match="classification"):
        offline.publish("m", "v", 0.01, prediction=0.5)
    offline.publish("r", "v", 0.01, prediction=0.5)
    with pytest.raises(InvalidEvent, match="regression"):
        offline.publish("r", "v", 0.01, prediction="cat")
    assert offline.stats().published == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_regression_values_are_refused(offline: PredictionPublisher, bad: float) -> None:
    """NaN and infinities are refused on the fast path too (the kind already known)."""
    assert offline.publish("r", "v", 0.01, prediction=1.5, label=2.0)
    for kwargs, field in (
        ({"prediction": bad}, "prediction"),
        ({"prediction": 1.0, "label": bad}, "label"),
        ({"label": bad}, "label"),  # a late label on its own
    ):
        with pytest.raises(InvalidEvent, match="finite") as info:
            offline.publish("r", "v", 0.01, **kwargs)
        assert info.value.field == field
    with pytest.raises(InvalidEvent, match="finite"):  # first call of a new model
        offline.publish("r2", "v", 0.01, prediction=np.float64(bad))
    assert offline.stats().published == 1


@pytest.mark.parametrize(
    ("scale", "unit"),
    [(1e3, "milliseconds"), (1e6, "microseconds"), (1e9, "nanoseconds")],
)
def test_event_time_in_the_wrong_unit_is_named(
    offline: PredictionPublisher, scale: float, unit: str
) -> None:
    for value in (T0 * scale, int(T0 * scale), np.int64(T0 * scale)):
        with pytest.raises(InvalidEvent, match=f"looks like epoch {unit}.*seconds are expected"):
            offline.publish("m", "v", 0.01, prediction="a", event_time=value)
    assert offline.stats().published == 0


def test_event_time_accepts_seconds_of_every_type(offline: PredictionPublisher) -> None:
    for value in (T0, int(T0), np.float64(T0), np.int64(T0), datetime.now(UTC), 0.0):
        assert offline.publish("m", "v", 0.01, prediction="a", event_time=value)
    assert offline.stats().published == 6


def test_heartbeats_without_psutil_warn_once_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PublisherSettings(bootstrap_servers="127.0.0.1:1", heartbeat_seconds=3600)
    PredictionPublisher(settings).close(timeout_seconds=0.1)  # psutil installed: no warning
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    with pytest.warns(RuntimeWarning, match=r"psutil.*modelpulse\[resources\]") as record:
        pub = PredictionPublisher(settings)
    pub.close(timeout_seconds=0.1)
    assert len(record) == 1 and record[0].filename == __file__


def test_full_buffer_drops_and_counts() -> None:
    pub = PredictionPublisher(
        PublisherSettings(
            bootstrap_servers="127.0.0.1:1", max_buffered_events=100, linger_seconds=60
        )
    )
    try:
        results = [pub.publish("m", "v", 0.01, prediction="a") for _ in range(250)]
        stats = pub.stats()
        assert results.count("") == stats.dropped
        assert stats.dropped > 0
        assert stats.published + stats.dropped == 250
    finally:
        pub.close(timeout_seconds=0.1)


def test_settings_errors_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="linger_seconds"):
        PublisherSettings(linger_seconds=0)
    monkeypatch.setenv("MODELPULSE_MODE", "avro-please")
    with pytest.raises(ValueError, match="mode"):
        PublisherSettings()
    monkeypatch.setenv("MODELPULSE_MODE", "event")
    monkeypatch.setenv("MODELPULSE_KAFKA", '{"client.id": "svc-7"}')
    s = PublisherSettings()
    assert s.mode == "event" and s.kafka_config()["client.id"] == "svc-7"


def test_wide_envelopes_are_split_to_fit_the_message_limit(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("wide")
    features = {f"feature_{i}": float(i) for i in range(30)}
    with _publisher(
        kafka_bootstrap, topic, batch_max_events=20_000, max_features=30, linger_seconds=5.0
    ) as pub:
        for i in range(20_000):
            pub.publish("m", "v", 0.01, prediction="a", features=features, event_time=T0 + i)
    stats = pub.stats()
    assert stats.sent == 20_000 and stats.failed == 0
    msgs = consume_all(kafka_bootstrap, topic)
    assert len(msgs) > 1 and all(len(m.value() or b"") < 1_000_000 for m in msgs)
    assert len(_decode_all([m.value() for m in msgs])) == 20_000  # type: ignore[misc]
