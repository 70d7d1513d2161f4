"""Aggregator shards against the real broker: exact metrics, late events, dead letters."""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka_util import consume_all
from shards import (
    Samples,
    ShardProcess,
    make_row,
    merged,
    send_markers,
    total,
    wait_assigned,
    wait_until,
)
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
)

from producer.encode import Row, encode_batch, encode_event

T0_MS = 1_700_000_000_000  # in the past, aligned to panes and windows
PANE_MS, LATENESS_MS = 1000, 2000
MODELS = {
    "fraud": ["ok", "fraud"],
    "churn": ["stay", "leave"],
    "intent": ["buy", "browse", "support", "cancel"],
    "topic": ["a", "b", "c"],
    "price": None,  # regression
    "eta": None,
}


def _generate(seed: int = 11, per_model: int = 1500) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    events = []
    for model, classes in MODELS.items():
        times = np.sort(rng.integers(T0_MS, T0_MS + 10_000, per_model))
        for t in times.tolist():
            outcome = rng.choice(["ok", "ok", "ok", "ok", "ok", "ok", "error", "timeout"])
            if classes is None:
                truth = float(rng.normal(50, 10))
                pred: Any = truth + float(rng.normal(0, 3))
                label: Any = truth if rng.random() < 0.6 else None
                score = None
            else:
                truth = classes[int(rng.integers(len(classes)))]
                pred = truth if rng.random() < 0.7 else classes[int(rng.integers(len(classes)))]
                label = truth if rng.random() < 0.8 else None
                score = float(rng.random())
            events.append(
                {
                    "model": model,
                    "version": "v1",
                    "latency_seconds": float(rng.lognormal(-4, 0.5)),
                    "prediction": pred if outcome == "ok" else None,
                    "label": label,
                    "score": score,
                    "outcome": str(outcome),
                    "event_time": t / 1000.0,
                    "features": {"x": float(rng.normal())},
                }
            )
    return events


@pytest.fixture
def start_shard(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> Callable[..., ShardProcess]:
    """``start_shard(topic, **flags)``: a shard on the session's broker (conftest's factory)."""
    return functools.partial(shard_factory, kafka_bootstrap)


def _row(e: dict[str, Any]) -> Row:
    return Row(
        e["model"],
        e["version"],
        e["event_time"],
        e["latency_seconds"],
        ["ok", "error", "timeout", "rejected"].index(e["outcome"]),
        e["prediction"],
        e["score"],
        e["label"],
        None,
        e["features"],
        "",
    )


def _produce_in_time_order(
    bootstrap: str, topic: str, events: list[dict[str, Any]], late: list[dict[str, Any]]
) -> None:
    """Both wire formats, interleaved in event-time order as live services would send them.

    Classifiers send columnar envelopes (one per 250 ms slice), regressors one
    Confluent-framed event per prediction. ``late`` goes last: its panes are closed.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    ordered = sorted(events, key=lambda e: e["event_time"])
    for start in range(T0_MS, T0_MS + 10_000, 250):
        in_slice = [e for e in ordered if start <= e["event_time"] * 1000 < start + 250]
        for model, classes in MODELS.items():
            rows = [_row(e) for e in in_slice if e["model"] == model]
            if not rows:
                continue
            if classes is None:
                for r in rows:
                    producer.produce(topic, encode_event(r), model.encode())
            else:
                producer.produce(topic, encode_batch(rows), model.encode())
    for e in late:
        producer.produce(topic, encode_event(_row(e)), e["model"].encode())
    assert producer.flush(30) == 0


def _on_time(
    events: list[dict[str, Any]], model: str, start_ms: int, end_ms: int
) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["model"] == model and start_ms <= round(e["event_time"] * 1000) < end_ms
    ]


def _gauge(samples: Samples, name: str, **labels: str) -> float | None:
    rows = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(rows) <= 1, (name, labels, rows)
    return rows[0] if rows else None


def test_windowed_metrics_equal_sklearn_over_two_shards(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    topic = topic_factory("exact", partitions=2)
    shards = [start_shard(topic), start_shard(topic)]
    wait_assigned(shards, 2)
    events = _generate()
    late = [dict(e, event_time=T0_MS / 1000 + 0.5) for e in events[:: len(events) // 12]][:12]
    _produce_in_time_order(kafka_bootstrap, topic, events, late)
    send_markers(kafka_bootstrap, topic, 2, T0_MS + 10_000 + LATENESS_MS)

    end_s = (T0_MS + 10_000) / 1000

    def complete() -> Samples | None:
        s = merged(shards)
        ends = [
            v
            for lab, v in s.get("model_window_end_timestamp_seconds", [])
            if lab["window"] == "10s"
        ]
        models = {lab["model"] for lab, _ in s.get("model_info", [])}
        closed = models == set(MODELS) and ends and all(v == end_s for v in ends)
        if closed and total(s, "modelpulse_late_events_total") == len(late):
            return s
        return None

    samples = wait_until(complete, 90, "all windows closed", shards)
    owners = {lab["partition"] for lab, _ in samples["model_info"]}
    assert owners == {"0", "1"}, "models should spread over both partitions"
    per_shard_models = [
        {lab["model"] for lab, _ in sh.scrape().get("model_info", [])} for sh in shards
    ]
    assert all(per_shard_models), "both shards should own a partition with models"
    assert not (per_shard_models[0] & per_shard_models[1])

    for model, classes in MODELS.items():
        for window_ms in (5000, 10_000):
            wl = f"{window_ms // 1000}s"
            sel = _on_time(events, model, T0_MS + 10_000 - window_ms, T0_MS + 10_000)
            labels = dict(model=model, version="v1", window=wl)
            assert _gauge(samples, "model_window_predictions", **labels) == len(sel)
            assert _gauge(samples, "inference_throughput", **labels) == pytest.approx(
                len(sel) / (window_ms / 1000)
            )
            scored = [e for e in sel if e["outcome"] == "ok" and e["label"] is not None]
            if classes is None:
                err = np.array([e["prediction"] - e["label"] for e in scored])
                assert _gauge(samples, "model_mae", **labels) == pytest.approx(
                    np.abs(err).mean(), rel=1e-9
                )
                assert _gauge(samples, "model_rmse", **labels) == pytest.approx(
                    math.sqrt((err**2).mean()), rel=1e-9
                )
                continue
            y_true = [e["label"] for e in scored]
            y_pred = [e["prediction"] for e in scored]
            accuracy = accuracy_score(y_true, y_pred)
            assert _gauge(samples, "model_accuracy", **labels) == pytest.approx(accuracy)
            # Calibration and the label-free estimate (every classification row has a score).
            ok_scores = [e["score"] for e in sel if e["outcome"] == "ok"]
            estimated = _gauge(samples, "model_estimated_accuracy", **labels)
            assert estimated == pytest.approx(np.mean(ok_scores), rel=1e-9)
            gap = _gauge(samples, "model_accuracy_gap", **labels)
            assert gap == pytest.approx(np.mean(ok_scores) - accuracy, abs=1e-9)
            correct = np.array(y_true) == np.array(y_pred)
            score = np.array([e["score"] for e in scored])
            brier = _gauge(samples, "model_brier_score", **labels)
            assert brier == pytest.approx(brier_score_loss(correct, score), rel=1e-9)
            prob_true, prob_pred = calibration_curve(correct, score, n_bins=10)
            n_b = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], score), minlength=10)
            ece = np.sum(n_b[n_b > 0] / len(score) * np.abs(prob_true - prob_pred))
            got_ece = _gauge(samples, "model_expected_calibration_error", **labels)
            assert got_ece == pytest.approx(ece, rel=1e-9)
            present = sorted(set(y_true) | set(y_pred))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                for fn, name in (
                    (precision_score, "model_precision"),
                    (recall_score, "model_recall"),
                    (f1_score, "model_f1_score"),
                ):
                    per = fn(y_true, y_pred, labels=present, average=None, zero_division=np.nan)
                    for cls, want in zip(present, per, strict=True):
                        got = _gauge(samples, name, **labels, **{"class": cls})
                        if math.isnan(want):
                            assert got is None, (name, cls)
                        else:
                            assert got == pytest.approx(want), (model, wl, name, cls)
                    macro = fn(y_true, y_pred, average="macro")
                    assert _gauge(samples, name, **labels, **{"class": "macro"}) == pytest.approx(
                        macro
                    )
            mcm = multilabel_confusion_matrix(y_true, y_pred, labels=present)
            for cls, m in zip(present, mcm, strict=True):
                (tn, fp), (fn_, tp) = m
                if fp + tn:
                    fpr = _gauge(samples, "model_false_positive_rate", **labels, **{"class": cls})
                    assert fpr == pytest.approx(fp / (fp + tn))
                if fn_ + tp:
                    fnr = _gauge(samples, "model_false_negative_rate", **labels, **{"class": cls})
                    assert fnr == pytest.approx(fn_ / (fn_ + tp))

        # Counters over all closed panes equal the on-time events, by outcome.
        sel = _on_time(events, model, T0_MS, T0_MS + 10_000)
        for outcome in ("ok", "error", "timeout", "rejected"):
            want = sum(1 for e in sel if e["outcome"] == outcome)
            assert (
                total(samples, "inference_predictions_total", model=model, outcome=outcome) == want
            )
        assert total(samples, "inference_latency_seconds_count", model=model) == len(sel)
        assert total(samples, "inference_latency_seconds_sum", model=model) == pytest.approx(
            sum(e["latency_seconds"] for e in sel)
        )
        labelled = [e for e in sel if e["outcome"] == "ok" and e["label"] is not None]
        assert total(samples, "model_labeled_predictions_total", model=model) == len(labelled)
        if classes is not None:
            for a in classes:
                for p in classes:
                    want = sum(1 for e in labelled if e["label"] == a and e["prediction"] == p)
                    got = total(
                        samples, "model_confusion_total", model=model, actual=a, predicted=p
                    )
                    assert got == want
            cal = [e for e in labelled if e["score"] is not None]
            bins = np.searchsorted(np.linspace(0, 1, 11)[1:-1], [e["score"] for e in cal])
            for k in range(10):
                for flag in ("true", "false"):
                    want = sum(
                        1
                        for e, b in zip(cal, bins, strict=True)
                        if b == k and (e["label"] == e["prediction"]) == (flag == "true")
                    )
                    got = total(
                        samples,
                        "model_calibration_total",
                        model=model,
                        bin=format((k + 1) / 10, "g"),
                        correct=flag,
                    )
                    assert got == want, (model, k, flag)
        else:
            assert total(samples, "model_prediction_error_count", model=model) == len(labelled)
        # A drift reference exists (first full 5 s window) and yields finite scores.
        drift = [
            (lab["method"], v)
            for lab, v in samples.get("model_drift_score", [])
            if lab["model"] == model
        ]
        assert drift and all(math.isfinite(v) and v >= 0 for _, v in drift)
        assert {m for m, _ in drift} == {"psi", "js", "ks", "wasserstein"}

    # Late events went to the dead-letter topic with their reason and origin.
    dlq = consume_all(kafka_bootstrap, f"{topic}-dlq", expected=None, timeout=20)
    reasons = [dict(m.headers() or {}).get("modelpulse.reason") for m in dlq]
    assert reasons.count(b"late") == len(late)
    head = dict(dlq[0].headers() or {})
    assert head["modelpulse.source.topic"] == topic.encode()
    for shard in shards:
        assert shard.get("/healthz")[0] == 200
        assert shard.get("/readyz")[0] == 200
        assert shard.terminate() == 0


def test_bad_input_is_dead_lettered_and_the_shard_keeps_counting(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    from confluent_kafka import Producer

    topic = topic_factory("poison")
    shard = start_shard(topic, max_future="1h")
    t = T0_MS / 1000 + 1

    row = functools.partial(make_row, "m", t, version="v", prediction="a", label="a")

    poison = {
        "truncated": b"\x00\x00",
        "bad_magic": b"\x07\x00\x00\x00\x01" + encode_event(row())[5:],
        "unknown_schema": b"\x00\x00\x00\x04\x00" + encode_event(row())[5:],
        "undecodable": b"\x00\x00\x00\x00\x01\xff\xfe\xfd",
        "invalid_latency": encode_event(row(latency_seconds=math.nan)),
        "unknown_outcome": encode_event(row(outcome=4)),
        "invalid_score": encode_event(row(score=1.5)),
        "invalid_event_time": encode_event(row(time=time.time() + 86_400)),
        "kind_mismatch": encode_event(row(prediction=3.5, label=None)),
    }
    good = [row(time=t + i / 1000) for i in range(300)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i, g in enumerate(good):
        producer.produce(topic, encode_event(g), b"m")
        if i % 30 == 0:
            for value in poison.values():
                producer.produce(topic, value, b"m")
    # A negative latency inside an otherwise good envelope: only that row is rejected.
    producer.produce(topic, encode_batch([row(time=t + 0.5), row(latency_seconds=-1.0)]), b"m")
    assert producer.flush(30) == 0
    send_markers(kafka_bootstrap, topic, 1, T0_MS + 20_000)
    rounds = len(range(0, 300, 30))

    def settled() -> Samples | None:
        s = shard.scrape()
        if total(s, "inference_predictions_total", model="m") == 301:
            return s
        return None

    samples = wait_until(settled, 60, "valid events counted", [shard])
    for reason in poison:
        extra = 1 if reason == "invalid_latency" else 0  # the envelope's one bad row
        assert total(samples, "modelpulse_dead_lettered_total", reason=reason) == rounds + extra
    dlq = consume_all(
        kafka_bootstrap, f"{topic}-dlq", expected=rounds * len(poison) + 1, timeout=30
    )
    by_reason: dict[str, int] = {}
    for m in dlq:
        h = dict(m.headers() or {})
        by_reason[h["modelpulse.reason"].decode()] = (
            by_reason.get(h["modelpulse.reason"].decode(), 0) + 1
        )
        assert h["modelpulse.source.partition"] == b"0"
        assert int(h["modelpulse.source.offset"]) >= 0
    assert by_reason.pop("invalid_latency") == rounds + 1  # + the envelope with one bad row
    assert by_reason == {r: rounds for r in poison if r != "invalid_latency"}
    assert shard.get("/healthz")[0] == 200


def test_bad_configuration_is_refused_naming_the_flag(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "aggregator", "--pane", "10s", "--windows", "15s"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "windows" in proc.stderr and "multiple of pane" in proc.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "aggregator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert helped.returncode == 0
    for flag in (
        "--bootstrap-servers",
        "--pane",
        "--windows",
        "--lateness",
        "--max-series",
        "--state-topic",
        "--dead-letter-topic",
        "--drift-reference",
        "MODELPULSE_",
    ):
        assert flag in helped.stdout


def test_heartbeats_and_idle_markers(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    """Resource heartbeats become gauges; an idle partition's windows still close."""
    from producer import PredictionPublisher, PublisherSettings

    topic = topic_factory("idle")
    shard = start_shard(topic, idle_timeout="2s", max_future="1h")
    wait_assigned([shard], 1)
    settings = PublisherSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=topic,
        service="svc",
        instance="pod-1",
        heartbeat_seconds=0.5,
        linger_seconds=0.05,
    )
    with PredictionPublisher(settings) as pub:
        now = time.time()
        for i in range(50):
            pub.publish("m", "v1", 0.01, prediction="a", label="a", event_time=now - 1 + i / 100)
        time.sleep(1.5)  # a few heartbeats
    # No more events: only the shard's watermark marker can close the pane of `now`.
    end = wait_until(
        lambda: (
            (
                _gauge(
                    shard.scrape(), "model_window_end_timestamp_seconds", model="m", window="10s"
                )
                or 0
            )
            > now
        ),
        60,
        "windows closed by a watermark marker",
        [shard],
    )
    assert end
    s = shard.scrape()
    assert total(s, "inference_predictions_total", model="m") == 50
    cpu = _gauge(s, "inference_cpu_usage_ratio", service="svc", instance="pod-1")
    mem = _gauge(s, "inference_memory_usage_bytes", service="svc", instance="pod-1")
    assert cpu is not None and 0 <= cpu <= 1
    assert mem is not None and mem > 10e6


def test_cardinality_caps_fold_into_overflow(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    from confluent_kafka import Producer

    topic = topic_factory("caps")
    shard = start_shard(topic, max_models=5, max_classes=4, max_series=20_000)
    t = T0_MS / 1000
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    rows = [
        Row(
            f"model-{i}",
            "v1",
            t + i / 1e4,
            0.01,
            0,
            f"class-{i % 50}",
            None,
            "class-0",
            None,
            None,
            "",
        )
        for i in range(2000)
    ]
    for i in range(0, 2000, 100):
        for r in rows[i : i + 100]:
            producer.produce(topic, encode_event(r), b"k")
    assert producer.flush(30) == 0
    send_markers(kafka_bootstrap, topic, 1, T0_MS + 10_000)
    s = wait_until(
        lambda: (x := shard.scrape()) and total(x, "inference_predictions_total") == 2000 and x,
        60,
        "events counted",
        [shard],
    )
    models = {lab["model"] for lab, _ in s["model_info"]}
    assert len(models) == 6 and "__overflow__" in models  # 5 admitted + the overflow bucket
    assert total(s, "modelpulse_folded_total", kind="model") == 2000 - 5
    classes = {
        lab["predicted"] for lab, _ in s["model_confusion_total"] if lab["model"] == "__overflow__"
    }
    assert "__overflow__" in classes and len(classes - {"__overflow__"}) == 3  # 4 = 3 + overflow
    assert total(s, "modelpulse_folded_total", kind="class") > 0
    series = _gauge(s, "modelpulse_series")
    lines = shard.get()[1].count("\n") - shard.get()[1].count("\n#")
    assert series is not None and series <= 20_000 and lines <= 20_000


def test_changed_config_refuses_the_snapshot_unless_rebuilding(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    from confluent_kafka import Producer

    topic = topic_factory("config")
    first = start_shard(topic)
    wait_assigned([first], 1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(10):
        r = Row("m", "v1", T0_MS / 1000 + i, 0.01, 0, "a", None, None, None, None, "")
        producer.produce(topic, encode_event(r), b"m")
    assert producer.flush(30) == 0
    wait_until(
        lambda: (
            total(first.scrape(), "modelpulse_snapshot_age_seconds") < 1.0
            and total(first.scrape(), "modelpulse_model_versions") == 1
        ),
        60,
        "a snapshot",
        [first],
    )
    assert first.terminate() == 0
    changed = start_shard(topic, pane="2s", windows="4s,10s", drift_reference="4s")
    assert changed.proc is not None
    assert changed.proc.wait(60) == 1
    assert "snapshot made with config" in changed.log_path.read_text()
    rebuilt = start_shard(
        topic, pane="2s", windows="4s,10s", drift_reference="4s", rebuild_state=True
    )
    wait_until(
        lambda: total(rebuilt.scrape(), "modelpulse_events_total") == 10, 60, "rebuilt", [rebuilt]
    )


def test_a_backlog_larger_than_one_ingest_is_counted_exactly(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    """A shard that starts behind gets huge consumed batches, ingested in bounded groups."""
    from confluent_kafka import Producer

    topic = topic_factory("backlog")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50})
    n_env, rows_per = 40, 5000  # 200k rows: several ingest groups in one batch
    for e in range(n_env):
        rows = [
            Row(
                "m",
                "v1",
                T0_MS / 1000 + (e * rows_per + i) / 1e4,
                0.01,
                0,
                "a",
                0.5,
                "b",
                None,
                None,
                "",
            )
            for i in range(rows_per)
        ]
        producer.produce(topic, encode_batch(rows), b"m")
    assert producer.flush(30) == 0
    send_markers(kafka_bootstrap, topic, 1, T0_MS + 60_000)
    shard = start_shard(topic)
    s = wait_until(
        lambda: (
            (x := shard.scrape()) and total(x, "modelpulse_events_total") == n_env * rows_per and x
        ),
        90,
        "the backlog counted",
        [shard],
    )
    assert total(s, "model_confusion_total", actual="b", predicted="a") == n_env * rows_per
    assert total(s, "modelpulse_late_events_total") == 0
