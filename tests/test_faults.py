"""Crashes and rebalances mid-stream: final counters equal exactly what was produced.

A shard killed with SIGKILL loses nothing and counts nothing twice because its state
and its offsets are one snapshot record; a shard joining or leaving moves partitions
with their state. Long mode (``--long``) runs more events and more kills.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from confluent_kafka import Producer
from shards import (
    Samples,
    ShardProcess,
    merged,
    send_markers,
    total,
    wait_assigned,
    wait_until,
)

from producer.encode import Row, encode_batch

T0_MS = 1_700_000_100_000
PARTITIONS = 4
MODELS = [f"model-{i}" for i in range(8)]
CLASSES = ["a", "b", "c"]


@pytest.fixture
def start_shard(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> Callable[..., ShardProcess]:
    """``start_shard(topic, **flags)``: a shard on the session's broker (conftest's factory)."""
    return functools.partial(shard_factory, kafka_bootstrap, snapshot_interval="500ms")


class Stream:
    """A seeded stream of envelopes, one second of event time per round, and its truth."""

    def __init__(self, rounds: int, per_model: int, seed: int = 5) -> None:
        self.rounds, self.per_model = rounds, per_model
        self.rng = np.random.default_rng(seed)
        self.outcomes: Counter[tuple[str, int]] = Counter()
        self.confusion: Counter[tuple[str, str, str]] = Counter()
        self.sent_rounds = 0

    def envelopes(self, r: int) -> list[tuple[str, bytes]]:
        out = []
        for model in MODELS:
            times = np.sort(self.rng.integers(0, 1000, self.per_model)) + T0_MS + r * 1000
            rows = []
            for t in times.tolist():
                outcome = int(self.rng.choice([0, 0, 0, 0, 1, 2]))
                pred = CLASSES[int(self.rng.integers(3))] if outcome == 0 else None
                label = CLASSES[int(self.rng.integers(3))] if outcome == 0 else None
                rows.append(
                    Row(model, "v1", t / 1000, 0.01, outcome, pred, 0.5, label, None, None, "")
                )
                self.outcomes[(model, outcome)] += 1
                if outcome == 0:
                    self.confusion[(model, str(label), str(pred))] += 1
            out.append((model, encode_batch(rows)))
        return out

    @property
    def events(self) -> int:
        return sum(self.outcomes.values())


def _produce(
    bootstrap: str, topic: str, stream: Stream, pause: float, stop: threading.Event
) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5}
    )
    for r in range(stream.rounds):
        if stop.is_set():
            break
        for model, value in stream.envelopes(r):
            producer.produce(topic, value, model.encode())
        producer.flush(30)
        stream.sent_rounds = r + 1
        time.sleep(pause)
    assert producer.flush(30) == 0


def _check_exact(samples: Samples, stream: Stream) -> None:
    for (model, outcome), want in stream.outcomes.items():
        name = ["ok", "error", "timeout", "rejected"][outcome]
        got = total(samples, "inference_predictions_total", model=model, outcome=name)
        assert got == want, (model, name, got, want)
    for (model, actual, pred), want in stream.confusion.items():
        got = total(samples, "model_confusion_total", model=model, actual=actual, predicted=pred)
        assert got == want, (model, actual, pred)
    assert total(samples, "modelpulse_events_total") == stream.events
    assert total(samples, "modelpulse_late_events_total") == 0


def _owners(shards: list[ShardProcess]) -> dict[str, int]:
    """partition -> number of live shards exporting it (must be exactly 1)."""
    seen: Counter[str] = Counter()
    for s in shards:
        if s.alive():
            for labels, _ in s.scrape().get("modelpulse_events_total", []):
                seen[labels["partition"]] += 1
    return dict(seen)


def _finish(bootstrap: str, topic: str, shards: list[ShardProcess], stream: Stream) -> Samples:
    send_markers(bootstrap, topic, PARTITIONS, T0_MS + stream.rounds * 1000 + 2000)

    def done() -> Samples | None:
        s = merged(shards)
        owners = _owners(shards)
        if total(s, "modelpulse_events_total") >= stream.events and owners == {
            str(p): 1 for p in range(PARTITIONS)
        }:
            return s
        return None

    wait_until(done, 120, f"{stream.events} events counted", shards)
    time.sleep(2.0)  # would anything be counted twice a moment later?
    return merged(shards)


def test_sigkill_of_a_shard_mid_stream_loses_and_duplicates_nothing(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
    request: pytest.FixtureRequest,
) -> None:
    long = request.config.getoption("--long")
    topic = topic_factory("kill", partitions=PARTITIONS)
    shards = [start_shard(topic), start_shard(topic)]
    wait_assigned(shards, PARTITIONS)
    stream = Stream(rounds=60 if long else 24, per_model=1000 if long else 400)
    stop = threading.Event()
    producer = threading.Thread(
        target=_produce, args=(kafka_bootstrap, topic, stream, 0.3, stop), daemon=True
    )
    producer.start()
    kills = 3 if long else 1
    for k in range(kills):
        wait_until(
            lambda k=k: stream.sent_rounds >= stream.rounds * (k + 1) // (kills + 2),
            120,
            "progress",
        )
        victim = next(s for s in reversed(shards) if s.alive())
        victim.kill()
        shards.append(start_shard(topic))
    producer.join(300)
    assert not producer.is_alive()
    samples = _finish(kafka_bootstrap, topic, shards, stream)
    _check_exact(samples, stream)


def test_shards_joining_and_leaving_keep_counts_exact(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    topic = topic_factory("rebalance", partitions=PARTITIONS)
    shards = [start_shard(topic), start_shard(topic)]
    wait_assigned(shards, PARTITIONS)
    stream = Stream(rounds=24, per_model=400)
    stop = threading.Event()
    producer = threading.Thread(
        target=_produce, args=(kafka_bootstrap, topic, stream, 0.3, stop), daemon=True
    )
    producer.start()
    wait_until(lambda: stream.sent_rounds >= 6, 120, "progress")
    third = start_shard(topic)  # joins: partitions move with their snapshots
    shards.append(third)
    wait_assigned(shards, PARTITIONS)
    wait_until(lambda: stream.sent_rounds >= 14, 120, "progress")
    assert shards[0].terminate() == 0  # a clean leave: final snapshot, then revoke
    producer.join(300)
    samples = _finish(kafka_bootstrap, topic, shards, stream)
    _check_exact(samples, stream)
