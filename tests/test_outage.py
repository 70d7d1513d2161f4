"""The producer while its broker is down: never blocks or raises, counts, recovers.

Uses a broker of its own (scripts/kafka.sh, cluster "outage") so that stopping it
does not disturb the session's broker.
"""

from __future__ import annotations

import os
import time

from kafka_util import PrivateCluster, consume_all, create_topic, unique

from producer import PredictionPublisher, PublisherSettings

OUTAGE = PrivateCluster("outage", int(os.environ.get("MODELPULSE_TEST_OUTAGE_PORT", "29192")))
outage_bootstrap = OUTAGE.fixture()


def _publish_for(pub: PredictionPublisher, seconds: float, rate: int) -> tuple[int, list[float]]:
    """Publish at ``rate``/s for ``seconds``; returns (accepted, per-call durations)."""
    calls: list[float] = []
    accepted = 0
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        t = time.perf_counter()
        ok = pub.publish("svc-model", "v1", 0.01, prediction="a", score=0.5)
        calls.append(time.perf_counter() - t)
        accepted += bool(ok)  # publish() returns the event id, "" when dropped
        i += 1
        next_at = start + i / rate
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return accepted, calls


def test_broker_down_then_back_delivers_everything_buffered(outage_bootstrap: str) -> None:
    topic = create_topic(outage_bootstrap, unique("outage"))
    pub = PredictionPublisher(
        PublisherSettings(bootstrap_servers=outage_bootstrap, topic=topic, linger_seconds=0.05)
    )
    before, _ = _publish_for(pub, 1.0, 2000)
    assert pub.flush(30) == 0
    OUTAGE.stop()
    during, calls = _publish_for(pub, 4.0, 2000)  # publish() keeps returning at once
    calls.sort()
    p99 = calls[int(len(calls) * 0.99)]
    assert p99 < 0.005, f"p99 publish() call {p99 * 1e6:.0f} us while the broker is down"
    assert pub.stats().sent == before
    OUTAGE.start()
    assert pub.flush(60) == 0
    stats = pub.close()
    assert stats.dropped == 0 and stats.failed == 0
    assert stats.sent == before + during
    values = consume_all(outage_bootstrap, topic, timeout=60)
    from aggregator.decode import SchemaResolver, decode_batch

    resolver = SchemaResolver()
    assert sum(len(decode_batch(resolver.read(m.value())[1], 0)) for m in values) == before + during


def test_broker_down_past_the_delivery_timeout_counts_failures(outage_bootstrap: str) -> None:
    topic = create_topic(outage_bootstrap, unique("outage"))
    OUTAGE.stop()
    try:
        pub = PredictionPublisher(
            PublisherSettings(
                bootstrap_servers=outage_bootstrap,
                topic=topic,
                linger_seconds=0.05,
                delivery_timeout_seconds=2.0,
                max_buffered_events=1000,
            )
        )
        accepted, _ = _publish_for(pub, 1.0, 3000)
        time.sleep(0.5)
        dropped_now = pub.stats().dropped
        deadline = time.monotonic() + 30
        while pub.stats().failed < accepted and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = pub.close(timeout_seconds=5)
        assert stats.failed == accepted, stats
        assert stats.sent == 0 and stats.queued == 0
        assert stats.dropped == dropped_now  # buffer-full drops are counted, not failures
        assert stats.published == accepted
    finally:
        OUTAGE.start()
