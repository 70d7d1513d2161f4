"""Reliability: bugs found by the reliability suite (each test failed until the bug was fixed).

RELIABILITY.md lists them.
"""

import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Producer
from kafka_util import consume_all, create_topic, unique
from reliability_util import T0_MS, Scrape, scrape_all
from shards import Samples, ShardProcess, make_row, send_markers, total, wait_assigned, wait_until

from aggregator.settings import AggregatorSettings
from producer import PredictionPublisher, PublisherSettings
from producer.encode import encode_batch, encode_event, encode_heartbeat


def _one_shard(
    bootstrap: str,
    shard_factory: Callable[..., ShardProcess],
    prefix: str,
    partitions: int,
    **flags: Any,
) -> tuple[ShardProcess, str]:
    """A new topic and one shard that owns all its partitions."""
    topic = create_topic(bootstrap, unique(prefix), partitions)
    shard = shard_factory(bootstrap, topic, **flags)
    wait_assigned([shard], partitions)
    return shard, topic


def _produce_and_close_panes(
    bootstrap: str,
    topic: str,
    values: list[bytes],
    partitions: int,
    heartbeats: Sequence[bytes] = (),
) -> None:
    """``heartbeats`` to partition 0, then ``values`` round-robin over the partitions, then
    a marker on every partition that closes all their panes."""
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4_000_000})
    for beat in heartbeats:
        producer.produce(topic, beat, b"svc", partition=0)
    for i, value in enumerate(values):
        producer.produce(topic, value, b"k", partition=i % partitions)
    assert producer.flush(30) == 0
    send_markers(bootstrap, topic, partitions, T0_MS + 60_000)


def _feed_one_shard(
    bootstrap: str,
    shard_factory: Callable[..., ShardProcess],
    values: list[bytes],
    expected_rows: int,
    partitions: int = 1,
    **flags: Any,
) -> tuple[ShardProcess, str, Samples]:
    """Start a shard, produce ``values`` (round-robin over partitions), close every pane,
    wait until ``expected_rows`` are counted or dead-lettered; return the last scrape."""
    shard, topic = _one_shard(bootstrap, shard_factory, "rel-bug", partitions, **flags)
    _produce_and_close_panes(bootstrap, topic, values, partitions)

    def done() -> Samples | None:
        x = shard.scrape()
        seen = total(x, "inference_predictions_total") + total(x, "modelpulse_dead_lettered_total")
        return x if seen >= expected_rows else None

    return shard, topic, wait_until(done, 60, f"{expected_rows} rows seen", [shard])


def test_oversize_names_are_dead_lettered_not_exported(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> None:
    """A 100 kB model name or class label (a Java service can send one; publish() refuses
    it) would become a label value of every series of the model: one event turned
    /metrics into megabytes. Now such rows are dead-lettered as ``name_too_long``
    (``--max-name-length``, 256 characters) before they reach the catalog."""
    t = T0_MS / 1000 + 1
    huge_model = encode_event(make_row("m" * 100_000, t, prediction="a", label="a"))
    huge_class = encode_event(make_row("normal", t, prediction="c" * 100_000, label="a"))
    good = [encode_event(make_row("normal", t + i / 100, prediction="a")) for i in range(10)]
    shard, topic, samples = _feed_one_shard(
        kafka_bootstrap, shard_factory, [*good, huge_model, huge_class], 12
    )
    body = shard.get()[1]
    longest = max(
        len(v) for rows in samples.values() for labels, _ in rows for v in labels.values()
    )
    dlq = consume_all(kafka_bootstrap, f"{topic}-dlq", expected=2, timeout=10, idle=2)
    assert longest <= 1024 and len(body) < 1_000_000, (
        f"a label value of {longest} chars is exported; /metrics is {len(body)} bytes"
    )
    assert total(samples, "inference_predictions_total", model="normal") == 10
    assert len(dlq) == 2 and all(dict(m.headers() or [])["modelpulse.reason"] for m in dlq)
    assert {dict(m.headers() or [])["modelpulse.reason"] for m in dlq} == {b"name_too_long"}
    assert total(samples, "modelpulse_dead_lettered_total", reason="name_too_long") == 2


def test_non_finite_regression_values_are_dead_lettered_not_summed(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> None:
    """An infinite (or 1e200) prediction or label of a regression model was accepted and
    summed: model_prediction_error_sum and the MAE/RMSE gauges became +Inf or NaN, for
    good. Now such rows are dead-lettered as ``invalid_value`` (finite, |x| <= 1e100)."""
    t = T0_MS / 1000 + 1
    good = [
        encode_event(make_row("reg", t + i / 100, prediction=1.0, label=1.5, score=None))
        for i in range(10)
    ]
    bad = [
        encode_event(make_row("reg", t + 0.5, prediction=math.inf, label=1.0, score=None)),
        encode_event(make_row("reg", t + 0.6, prediction=1.0, label=-math.inf, score=None)),
        encode_event(make_row("reg", t + 0.7, prediction=1e200, label=-1e200, score=None)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _shard, _topic, samples = _feed_one_shard(kafka_bootstrap, shard_factory, good + bad, 13)
    sums = [v for labels, v in samples.get("model_prediction_error_sum", [])]
    gauges = [v for name in ("model_mae", "model_rmse") for _, v in samples.get(name, [])]
    assert sums and all(math.isfinite(v) for v in sums + gauges), (sums, gauges)
    assert total(samples, "inference_predictions_total", model="reg") == 10
    assert total(samples, "modelpulse_dead_lettered_total") == 3
    assert total(samples, "modelpulse_dead_lettered_total", reason="invalid_value") == 3


def test_publish_refuses_non_finite_regression_values() -> None:
    """publish() names the bad field for a NaN/inf latency or an out-of-range score, and
    for an infinite prediction or label of a regressor, which the aggregator would
    otherwise have to dead-letter (see the test above)."""
    pub = PredictionPublisher(PublisherSettings(bootstrap_servers="127.0.0.1:1"))
    try:
        refused = []
        cases: list[dict[str, Any]] = [
            {"prediction": math.inf, "label": 1.0},
            {"prediction": 1.0, "label": -math.inf},
        ]
        for kw in cases:
            try:
                pub.publish("reg", "v1", 0.01, **kw)
            except ValueError:
                refused.append(kw)
        assert refused == cases, f"accepted {len(cases) - len(refused)} non-finite values"
    finally:
        pub.close(timeout_seconds=0.1)


def test_max_series_caps_the_shard_not_each_partition(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> None:
    """README: --max-series is the "cap of one shard's sample lines". It used to become a
    cap on model versions per *partition* (settings.state_config: max_series // worst
    case per model version), so a shard that owned P partitions exposed up to P x
    max_series lines, and heartbeat series did not count at all. Now the whole render
    is capped; what is left out is counted, and counting itself stays exact."""
    # Enough partitions that the per-partition memory bound (max_series // the worst
    # case per model version, about 18 versions) times the real lines of a version
    # (~280) exceeds the shard's cap: only the per-shard cap keeps /metrics under it.
    partitions, max_series = 6, 20_000
    per_partition = AggregatorSettings(max_series=max_series).state_config().limits
    assert partitions * per_partition.max_model_versions * 250 > max_series
    t = T0_MS / 1000 + 1
    rng = random.Random(5)
    values = []
    for m in range(40 * partitions):  # 40 models per partition, 16 classes each
        rows = [
            make_row(
                f"model-{m}",
                t + i / 1000,
                prediction=f"c{rng.randrange(16)}",
                label=f"c{rng.randrange(16)}",
            )
            for i in range(600)
        ]
        values.append(encode_batch(rows))
    gpus = [{"index": g, "utilization_ratio": 0.5, "memory_used_bytes": 1} for g in range(64)]
    heartbeats = [  # two big ones: every family counts against the cap
        encode_heartbeat(
            {
                "event_time_ms": int(t * 1000),
                "service": "svc",
                "instance": pod,
                "cpu_usage_ratio": 0.5,
                "memory_usage_bytes": 1 << 30,
                "disk_usage_ratio": 0.5,
                "gpus": gpus,
            }
        )
        for pod in ("pod-a", "pod-b")
    ]
    expected_rows = 40 * partitions * 600
    shard, topic = _one_shard(
        kafka_bootstrap, shard_factory, "rel-series", partitions, max_series=max_series
    )
    _produce_and_close_panes(kafka_bootstrap, topic, values, partitions, heartbeats)

    def done() -> Samples | None:
        # Hidden model versions are not in inference_predictions_total: wait on the
        # per-partition counter, and on every partition's panes being closed.
        x = shard.scrape()
        marks = [v for _, v in x.get("modelpulse_watermark_timestamp_seconds", [])]
        closed = len(marks) == partitions and min(marks) >= t + 30
        return x if total(x, "modelpulse_events_total") >= expected_rows and closed else None

    samples = wait_until(done, 60, f"{expected_rows} rows counted", [shard])
    body = shard.get()[1]
    lines = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    series = total(samples, "modelpulse_series")
    assert series <= max_series and lines <= max_series, (series, lines)
    assert total(samples, "modelpulse_events_total") == expected_rows  # counting is exact
    shown = {labels["model"] for labels, _ in samples["model_info"]} - {"__overflow__"}
    assert 0 < len(shown) < 40 * partitions
    for model in shown:  # a model version is shown whole or not at all
        assert total(samples, "inference_predictions_total", model=model) == 600, model
    dropped = {labels["reason"]: v for labels, v in samples["modelpulse_series_dropped"]}
    assert dropped["model_version"] > 0
    # The two 64-GPU heartbeats' 2 x (3 + 64) lines are shown or counted as left out.
    resource_lines = sum(
        len(samples.get(f"inference_{what}", []))
        for what in ("cpu_usage_ratio", "memory_usage_bytes", "disk_usage_ratio", "gpu_usage_ratio")
    )
    assert resource_lines + dropped["resource_instance"] == 2 * (3 + 64), dropped
    # Model versions come first: resources only got room that no model version could use
    # (whether that room fits both heartbeats depends on the lines per model version).
    per_model = Counter(
        labels["model"] for rows in samples.values() for labels, _ in rows if "model" in labels
    )
    room = max_series - series + resource_lines
    assert room < min(per_model[m] for m in shown), (room, dropped)


def test_a_frozen_shard_that_wakes_up_never_exports_partitions_it_lost(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> None:
    """A shard frozen longer than the session timeout (SIGSTOP here; a VM pause or a
    swap storm in life) loses its partitions to the other shard. It used to serve its
    last rendered /metrics on waking - with the partitions it no longer owns - until its
    loop had handled the loss, so two live shards exported the same partition. Now its
    HTTP thread refuses /metrics (503) while the loop's last poll is older than the
    session allows, and the loop keeps refusing until the group has confirmed what the
    shard owns and a fresh payload is rendered."""
    import signal

    topic = create_topic(kafka_bootstrap, unique("rel-frozen"), 4)
    shards = [shard_factory(kafka_bootstrap, topic) for _ in range(2)]
    wait_assigned(shards, 4)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(40):
        rows = [make_row(f"m{i % 8}", T0_MS / 1000 + i / 10, prediction="a")] * 20
        producer.produce(topic, encode_batch(rows), f"m{i % 8}".encode())
    assert producer.flush(30) == 0
    frozen, other = shards
    assert frozen.proc is not None
    wait_until(lambda: Scrape.of(frozen.url).partitions, 30, "partitions owned", shards)
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(
            lambda: len(Scrape.of(other.url).partitions) == 4,
            60,
            "the other shard to take every partition",
            shards,
        )
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    woke = time.monotonic()
    double: list[tuple[float, dict[int, int]]] = []
    while time.monotonic() < woke + 3:
        scrapes = scrape_all([frozen.url, other.url], timeout=3)
        owners = Counter(p for x in scrapes for p in x.partitions)
        if any(n > 1 for n in owners.values()):
            double.append((round(scrapes[0].start - woke, 3), dict(owners)))
    assert double == [], (
        f"{len(double)} scrapes from {double[0][0]} s to {double[-1][0]} s after the wake-up "
        f"saw a partition exported by both shards: {double[0][1]}"
    )

    def settled() -> bool:  # and the woken shard serves again, its share of the partitions
        scrapes = scrape_all([frozen.url, other.url], timeout=3)
        owners = Counter(p for x in scrapes for p in x.partitions)
        return all(x.status == 200 for x in scrapes) and owners == dict.fromkeys(range(4), 1)

    wait_until(settled, 60, "both shards serving, each partition once", shards)


def test_a_dead_letter_the_dlq_topic_refuses_is_not_silently_lost(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> None:
    """The input topic may take bigger messages than the broker's default limit. The
    dead-letter topic used to be created with that default (1 MB), so a 2 MB bad message
    was refused without a delivery callback and the next snapshot moved past it. Now the
    dead-letter topic gets the input topic's max.message.bytes and the letters are
    acknowledged before any snapshot that covers them."""
    topic = create_topic(
        kafka_bootstrap, unique("rel-bigbad"), 1, **{"max.message.bytes": "4000000"}
    )
    shard = shard_factory(kafka_bootstrap, topic)
    wait_assigned([shard], 1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 5_000_000})
    big = b"\x07" + random.Random(1).randbytes(2_000_000)  # bad magic byte
    producer.produce(topic, big, b"k")
    producer.produce(topic, b"\x07small", b"k")
    assert producer.flush(30) == 0
    wait_until(
        lambda: total(shard.scrape(), "modelpulse_dead_lettered_total") == 2,
        60,
        "2 messages dead-lettered",
        [shard],
    )
    dlq = consume_all(kafka_bootstrap, f"{topic}-dlq", expected=2, timeout=30, idle=3)
    sizes = sorted(len(m.value() or b"") for m in dlq)
    assert sizes == [6, len(big)], f"the dead-letter topic holds messages of sizes {sizes}"
