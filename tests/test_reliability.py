"""Reliability under load, faults and bad input: measured, asserted, written down.

1. Fault suite: a 3-broker cluster, 3 aggregator shards, a seeded stream of both
   wire formats; shards are SIGKILLed, SIGTERMed, joined and left, a broker is
   SIGKILLed and restarted; the merged final counters equal the offline truth.
2. The producer while its broker is down: ``publish()`` never blocks or raises,
   every accepted event arrives, the rest is counted as dropped.
3. Bad input to one shard, and a fuzz of the decoders with mutated valid messages.
4. A soak: steady load on 2 shards; lag, RSS and scrape time stay flat.

Each test writes its figures to ``reliability/results/<name>.json``; RELIABILITY.md
states the promises and the figures of the last run. ``--long`` runs the long forms.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import re
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
from fastavro import schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka_util import consume_all, create_topic, kafka_script, start_local_cluster, unique
from reliability_util import (
    Clock,
    Scrape,
    get,
    median,
    percentile,
    rss_bytes,
    scrape_all,
    summary,
    thirds,
    write_result,
)
from shards import (
    Samples,
    ShardProcess,
    merged,
    parse_metrics,
    send_markers,
    shard_args,
    total,
    wait_assigned,
    wait_until,
)

from aggregator.decode import (
    EventChunkBuilder,
    Heartbeat,
    Marker,
    RowChunk,
    SchemaResolver,
    decode_batch,
)
from aggregator.errors import DecodeError
from aggregator.exposition import LabelCache, render_payload
from aggregator.metrics import build_families
from aggregator.settings import AggregatorSettings
from aggregator.state import PartitionState
from producer import PredictionPublisher, PublisherSettings
from producer.encode import Row, encode_batch, encode_event, encode_heartbeat
from schemas.wire import SchemaId, frame, parsed_schema

ROOT = Path(__file__).resolve().parent.parent
FAULT_CLUSTER = "reliability"
FAULT_PORT = int(os.environ.get("MODELPULSE_RELIABILITY_PORT", "29592"))
OUTAGE_CLUSTER = "rel-outage"
OUTAGE_PORT = int(os.environ.get("MODELPULSE_RELIABILITY_OUTAGE_PORT", "29692"))
OUTCOME_NAMES = ("ok", "error", "timeout", "rejected")
T0_MS = 1_700_000_300_000  # in the past, aligned to panes


def _long(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--long"))


def _test_settings(**overrides: Any) -> AggregatorSettings:
    """The settings a shard started with ``shard_args(..., **overrides)`` runs with."""
    from aggregator.__main__ import parse_settings

    settings, _ = parse_settings(shard_args("127.0.0.1:1", "t", **overrides))
    return settings


LATENCY_BOUNDS = _test_settings().state_config().latency_bounds


# =====================================================================================
# 1. Fault suite
# =====================================================================================

PARTITIONS = 6
CLASSES = ("a", "b", "c", "d")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    regression: bool
    envelope: bool  # columnar PredictionBatch, else one PredictionEvent per event
    partition: int


# 12 models, 2 per partition; 8 send envelopes and 4 send one message per event,
# classification and regression in both formats.
FAULT_MODELS = [
    ModelSpec(
        f"fm-{i:02d}", regression=i % 2 == 1, envelope=i not in {0, 3, 7, 10}, partition=i % 6
    )
    for i in range(12)
]


@dataclass
class Truth:
    """What the shards must export once every pane is closed, computed offline."""

    outcomes: dict[str, np.ndarray] = field(default_factory=dict)  # model -> [4]
    latency: dict[str, np.ndarray] = field(default_factory=dict)  # model -> per bucket
    labelled: Counter[str] = field(default_factory=Counter)
    confusion: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    @property
    def events(self) -> int:
        return int(sum(int(v.sum()) for v in self.outcomes.values()))


class FaultStream:
    """A seeded stream: one round = one second of event time for every model."""

    def __init__(self, seed: int, per_envelope_model: int, per_event_model: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.per_envelope_model = per_envelope_model
        self.per_event_model = per_event_model
        self.truth = Truth()
        self.edges = np.asarray(LATENCY_BOUNDS)
        for m in FAULT_MODELS:
            self.truth.outcomes[m.name] = np.zeros(4, dtype=np.int64)
            self.truth.latency[m.name] = np.zeros(len(LATENCY_BOUNDS) + 1, dtype=np.int64)
        self.messages_per_round: Counter[int] = Counter()
        for m in FAULT_MODELS:
            self.messages_per_round[m.partition] += 1 if m.envelope else per_event_model

    def round(self, r: int) -> list[tuple[int, bytes, bytes]]:
        """(partition, key, value) of round ``r``; adds the round to the truth."""
        out = []
        rng = self.rng
        for m in FAULT_MODELS:
            base = self.per_envelope_model if m.envelope else self.per_event_model
            n = base if not m.envelope else int(rng.integers(base // 2, base * 3 // 2))
            t_ms = np.sort(rng.integers(0, 1000, n)) + T0_MS + r * 1000
            outcome = rng.choice(4, n, p=[0.85, 0.07, 0.05, 0.03])
            lat = rng.lognormal(-4.5, 1.2, n)
            ok = outcome == 0
            has_label = ok & (rng.random(n) < 0.7)
            if m.regression:
                truth_v = rng.normal(50, 10, n)
                preds: list[Any] = [
                    float(x) if o else None for x, o in zip(truth_v, ok, strict=True)
                ]
                labels: list[Any] = [
                    float(x + d) if h else None
                    for x, d, h in zip(truth_v, rng.normal(0, 3, n), has_label, strict=True)
                ]
                scores: list[Any] = [None] * n
            else:
                p_idx = rng.integers(len(CLASSES), size=n)
                right = rng.random(n) < 0.7
                l_idx = np.where(right, p_idx, rng.integers(len(CLASSES), size=n))
                preds = [CLASSES[i] if o else None for i, o in zip(p_idx, ok, strict=True)]
                labels = [CLASSES[i] if h else None for i, h in zip(l_idx, has_label, strict=True)]
                scores = [float(s) if o else None for s, o in zip(rng.random(n), ok, strict=True)]
                for i in np.flatnonzero(has_label).tolist():
                    self.truth.confusion[(m.name, labels[i], preds[i])] += 1
            feats = rng.normal(0, 1, n)
            rows = [
                Row(
                    m.name,
                    "v1",
                    t_ms[i] / 1000.0,
                    float(lat[i]),
                    int(outcome[i]),
                    preds[i],
                    scores[i],
                    labels[i],
                    None,
                    {"x": float(feats[i])},
                    "",
                )
                for i in range(n)
            ]
            self.truth.outcomes[m.name] += np.bincount(outcome, minlength=4)
            self.truth.latency[m.name] += np.bincount(
                np.searchsorted(self.edges, lat, side="left"), minlength=len(self.edges) + 1
            )
            self.truth.labelled[m.name] += int(has_label.sum())
            key = m.name.encode()
            if m.envelope:
                out.append((m.partition, key, encode_batch(rows, service="svc", instance="i")))
            else:
                out += [(m.partition, key, encode_event(row)) for row in rows]
        return out


class SteadyProducer(threading.Thread):
    """Produces rounds at a steady pace (acks=all, idempotent) until told to stop."""

    def __init__(
        self, bootstrap: str, topic: str, stream: FaultStream, period: float, min_rounds: int
    ) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.bootstrap, self.topic, self.stream = bootstrap, topic, stream
        self.period, self.min_rounds = period, min_rounds
        self.may_stop = threading.Event()
        self.rounds = 0
        self.failed = 0
        self.error: BaseException | None = None
        self.unflushed = -1
        self.started_at = 0.0
        self.finished_at = 0.0

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failed += 1

    def run(self) -> None:
        try:
            producer = Producer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "compression.type": "lz4",
                }
            )
            self.started_at = time.monotonic()
            r = 0
            while not (r >= self.min_rounds and self.may_stop.is_set()):
                if r >= self.min_rounds * 10:  # a safety stop for a fault schedule gone wrong
                    break
                for partition, key, value in self.stream.round(r):
                    while True:
                        try:
                            producer.produce(
                                self.topic,
                                value,
                                key,
                                partition=partition,
                                on_delivery=self._delivered,
                            )
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
                r += 1
                self.rounds = r
                delay = self.started_at + r * self.period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.unflushed = producer.flush(180)
            self.finished_at = time.monotonic()
        except BaseException as exc:
            self.error = exc


class OffsetWatch:
    """Committed offsets of the shards' group vs the log end, per partition."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self.consumer: Consumer | None = None

    def lag(self) -> dict[int, int] | None:
        """Log end - committed offset per partition; None when the cluster did not answer.

        A client that knew a dead broker as the group coordinator can keep failing
        after the cluster moved on, so a failed look starts over with a fresh one.
        """
        tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        if self.consumer is None:
            self.consumer = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": self.group,
                    "enable.auto.commit": False,
                }
            )
        try:
            committed = self.consumer.committed(tps, timeout=5)
            out = {}
            for tp in committed:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, tp.partition), timeout=5
                )
                out[tp.partition] = high - max(tp.offset, 0)
            return out
        except Exception:
            self.close()
            return None

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None


class OwnerSampler(threading.Thread):
    """Scrapes every live shard about once a second, all at once; records who exports
    which partition. Two live shards exporting one partition in one sample is a bug."""

    def __init__(self, shards: Callable[[], list[ShardProcess]], clock: Clock) -> None:
        super().__init__(name="owner-sampler", daemon=True)
        self.shards, self.clock = shards, clock
        self.stop = threading.Event()
        self.samples = 0
        self.unowned_samples = 0
        self.violations: list[dict[str, Any]] = []
        self.max_spread = 0.0
        self.errors = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            live = [s for s in self.shards() if s.alive()]
            scrapes = scrape_all([s.url for s in live], timeout=3)
            answered = [(s, x) for s, x in zip(live, scrapes, strict=True) if x.status == 200]
            self.errors += len(live) - len(answered)
            if not answered:
                continue
            spread = max(x.end for _, x in answered) - min(x.start for _, x in answered)
            self.max_spread = max(self.max_spread, spread)
            owners: dict[int, list[str]] = defaultdict(list)
            for s, x in answered:
                for p in x.partitions:
                    owners[p].append(s.log_path.stem)
            self.samples += 1
            if len(owners) < PARTITIONS:
                self.unowned_samples += 1
            double = {p: who for p, who in owners.items() if len(who) > 1}
            if double:
                self.violations.append(
                    {"t": self.clock(), "owners": double, "spread_s": round(spread, 3)}
                )


@pytest.fixture(scope="module")
def cluster3() -> Iterator[str]:
    """A 3-broker KRaft cluster of this module (RF 3, min.insync.replicas 2 by default)."""
    kafka_script("clean", "--name", FAULT_CLUSTER, "--kill")  # what an aborted run left
    bootstrap = start_local_cluster(FAULT_CLUSTER, FAULT_PORT, brokers=3)
    try:
        yield bootstrap
    finally:
        kafka_script("clean", "--name", FAULT_CLUSTER, "--kill")


def _replication(bootstrap: str, topic: str) -> tuple[set[int], str]:
    """(replica counts of the topic's partitions, its min.insync.replicas)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(topic, timeout=10).topics[topic]
    counts = {len(p.replicas) for p in md.partitions.values()}
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    configs = admin.describe_configs([res])[res].result(timeout=30)
    return counts, configs["min.insync.replicas"].value


def _compare(samples: Samples, truth: Truth) -> dict[str, Any]:
    """Mismatches between the merged final scrape and the truth, and lost/duplicated."""
    mismatches: list[str] = []
    lost = duplicated = 0
    for model, want_outcomes in truth.outcomes.items():
        for code, name in enumerate(OUTCOME_NAMES):
            got = total(samples, "inference_predictions_total", model=model, outcome=name)
            want = int(want_outcomes[code])
            lost += max(0, want - int(got))
            duplicated += max(0, int(got) - want)
            if got != want:
                mismatches.append(f"predictions {model}/{name}: got {got}, want {want}")
        cumulative = np.cumsum(truth.latency[model])
        got_buckets: dict[float, float] = defaultdict(float)
        for labels, v in samples.get("inference_latency_seconds_bucket", []):
            if labels.get("model") == model:
                got_buckets[float(labels["le"])] += v
        want_buckets = dict(zip([*LATENCY_BOUNDS, math.inf], cumulative.tolist(), strict=True))
        if dict(got_buckets) != want_buckets:
            mismatches.append(f"latency buckets {model}: got {dict(got_buckets)}")
        got_l = total(samples, "model_labeled_predictions_total", model=model)
        if got_l != truth.labelled[model]:
            mismatches.append(f"labelled {model}: got {got_l}, want {truth.labelled[model]}")
    got_conf: Counter[tuple[str, str, str]] = Counter()
    for labels, v in samples.get("model_confusion_total", []):
        got_conf[(labels["model"], labels["actual"], labels["predicted"])] += int(v)
    if +got_conf != +truth.confusion:
        diff = {
            k: (got_conf[k], truth.confusion[k])
            for k in set(got_conf) | set(truth.confusion)
            if got_conf[k] != truth.confusion[k]
        }
        mismatches.append(f"confusion (got, want): {dict(list(diff.items())[:10])}")
    return {"lost": lost, "duplicated": duplicated, "mismatches": mismatches}


def test_faults_kills_rebalances_and_a_broker_crash_lose_and_duplicate_nothing(
    cluster3: str,
    shard_factory: Callable[..., ShardProcess],
    request: pytest.FixtureRequest,
) -> None:
    long = _long(request)
    clock = Clock()
    bootstrap = cluster3
    rng = random.Random(20240611)
    topic = unique("rel-faults")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics(
        [
            NewTopic(
                topic,
                num_partitions=PARTITIONS,
                replication_factor=3,
                config={"min.insync.replicas": "2"},
            )
        ]
    ).values():
        fut.result(timeout=60)
    group = f"{topic}-agg"

    slots: dict[str, ShardProcess] = {}
    everyone: list[ShardProcess] = []

    def start(slot: str) -> ShardProcess:
        shard = shard_factory(bootstrap, topic)
        slots[slot] = shard
        everyone.append(shard)
        return shard

    for i in range(3):
        start(f"core{i}")
    wait_assigned(list(slots.values()), PARTITIONS, timeout=90)
    state_rf, state_isr = _replication(bootstrap, f"{topic}-state")
    dlq_rf, dlq_isr = _replication(bootstrap, f"{topic}-dlq")
    input_rf, input_isr = _replication(bootstrap, topic)
    assert state_rf == dlq_rf == input_rf == {3}
    assert state_isr == dlq_isr == input_isr == "2"

    stream = FaultStream(seed=7, per_envelope_model=160, per_event_model=25)
    min_events = 520_000 if long else 104_000
    per_round = sum(160 if m.envelope else 25 for m in FAULT_MODELS)
    min_rounds = -(-min_events // per_round)
    producer = SteadyProducer(bootstrap, topic, stream, period=0.6, min_rounds=min_rounds)
    watch = OffsetWatch(bootstrap, topic, group)
    sampler = OwnerSampler(lambda: list(everyone), clock)
    # Recovered = all partitions owned and caught up: every partition's committed offset
    # (committed after each acknowledged snapshot, every second) within ~2.4 s of
    # traffic (4 rounds) of the log end. The shards' own lag gauge reading 0 everywhere
    # is recorded too (consumer_lag_zero_after_s); under a steady stream it is a moment.
    lag_ok = {p: 4 * n + 10 for p, n in stream.messages_per_round.items()}
    faults: list[dict[str, Any]] = []

    def live() -> list[ShardProcess]:
        return [s for s in slots.values() if s.alive()]

    def recovered(what: str, since: float, **info: Any) -> None:
        """Wait until every partition has exactly one live owner, every live shard owns
        some, and the committed offsets caught up; record how long that took."""
        owned_at = caught_at = zero_at = None
        deadline = since + 150
        last: Any = None
        while time.monotonic() < deadline:
            shards = live()
            scrapes = scrape_all([s.url for s in shards], timeout=3)
            now = time.monotonic()
            owners = Counter(p for x in scrapes for p in x.partitions)
            # Every partition exactly once, and every live shard has joined and got some
            # (else a shard just started would look "recovered" before it even joined).
            if (
                owned_at is None
                and owners == dict.fromkeys(range(PARTITIONS), 1)
                and all(x.partitions for x in scrapes)
            ):
                owned_at = now
            if owned_at is None:
                last = dict(owners)
            else:
                # The shards' own modelpulse_consumer_lag, all 0 at one instant.
                lags = [v for x in scrapes for v in x.lag.values()]
                if zero_at is None and len(lags) == PARTITIONS and not any(lags):
                    zero_at = now
                if caught_at is None:
                    lag = last = watch.lag()
                    if lag is not None and all(lag[p] <= lag_ok.get(p, 10) for p in lag):
                        caught_at = now
                if caught_at is not None and (zero_at is not None or now > caught_at + 5):
                    break
            time.sleep(0.25)

        def after(t: float | None) -> float | None:
            return None if t is None else round(t - since, 2)

        faults.append(
            {
                "fault": what,
                "at_s": round(since - clock.started, 1),
                "at_round": producer.rounds,
                "all_partitions_owned_after_s": after(owned_at),
                "consumer_lag_zero_after_s": after(zero_at),
                "recovered_after_s": after(caught_at),
                **info,
            }
        )
        if caught_at is None:
            logs = "\n\n".join(f"--- {s.log_path.name}\n{s.log_tail(30)}" for s in everyone)
            raise AssertionError(f"no recovery after {what} (last: {last})\n{logs}")

    def kill_random_shard() -> None:
        slot = rng.choice(sorted(slots))
        victim = slots[slot]
        t = time.monotonic()
        victim.kill()
        start(slot)
        recovered("shard SIGKILL + replacement", t, victim=victim.log_path.stem, slot=slot)

    def terminate_and_restart() -> None:
        slot = rng.choice(sorted(s for s in slots if s.startswith("core")))
        victim = slots[slot]
        t = time.monotonic()
        code = victim.terminate()
        assert code == 0, victim.log_tail()
        start(slot)
        recovered("shard SIGTERM + restart", t, victim=victim.log_path.stem, exit_code=code)

    def join() -> None:
        t = time.monotonic()
        start("extra")
        recovered("4th shard joins", t)

    def leave() -> None:
        shard = slots.pop("extra")
        t = time.monotonic()
        code = shard.terminate()
        assert code == 0, shard.log_tail()
        recovered("4th shard leaves (SIGTERM)", t, exit_code=code)

    def broker_kill(node: int) -> Callable[[], None]:
        def run() -> None:
            t = time.monotonic()
            kafka_script("stop-node", "--name", FAULT_CLUSTER, "--node", str(node), "--kill")
            recovered(f"broker {node} SIGKILL", t)

        return run

    def broker_start(node: int) -> Callable[[], None]:
        def run() -> None:
            t = time.monotonic()
            kafka_script("start-node", "--name", FAULT_CLUSTER, "--node", str(node))
            up = time.monotonic()  # recovery counts from here: the JVM start is not a fault
            recovered(f"broker {node} back", up, start_seconds=round(up - t, 1))

        return run

    schedule: list[Callable[[], None]] = [
        kill_random_shard,
        broker_kill(2),
        kill_random_shard,  # while broker 2 is down
        broker_start(2),
        terminate_and_restart,
        join,
        kill_random_shard,
        leave,
    ]
    if long:
        schedule += [
            kill_random_shard,
            broker_kill(3),
            kill_random_shard,
            broker_start(3),
            join,
            terminate_and_restart,
            kill_random_shard,
            leave,
        ]

    passed = False
    outcome: dict[str, Any] = {}
    try:
        producer.start()
        sampler.start()
        wait_until(
            lambda: producer.rounds >= min_rounds // 5 or producer.error,
            300,
            "20% of the stream",
        )
        recovered("none (baseline before the first fault)", time.monotonic())
        for step in schedule:
            step()
            assert producer.error is None, producer.error
        producer.may_stop.set()
        producer.join(600)
        assert not producer.is_alive() and producer.error is None, producer.error
        assert producer.unflushed == 0 and producer.failed == 0
        stream_end = time.monotonic()
        # Close every pane: a marker past the last event time + lateness in every partition.
        send_markers(bootstrap, topic, PARTITIONS, T0_MS + (producer.rounds + 5) * 1000)
        want = stream.truth.events

        def settled() -> Samples | None:
            s = merged(live())
            if total(s, "modelpulse_events_total") < want:
                return None
            owners = Counter(labels["partition"] for labels, _ in s["modelpulse_events_total"])
            return s if owners == {str(p): 1 for p in range(PARTITIONS)} else None

        wait_until(settled, 180, f"{want} events counted", live())
        drain_seconds = time.monotonic() - stream_end
        time.sleep(2.0)  # anything counted twice a moment later?
        sampler.stop.set()
        sampler.join(10)
        samples = merged(live())
        outcome = _compare(samples, stream.truth)
        outcome["late"] = total(samples, "modelpulse_late_events_total")
        outcome["dead_lettered"] = total(samples, "modelpulse_dead_lettered_total")
        outcome["events_total_metric"] = total(samples, "modelpulse_events_total")
        outcome["drain_after_stream_s"] = round(drain_seconds, 1)
        assert outcome["mismatches"] == [], outcome["mismatches"]
        assert outcome["lost"] == outcome["duplicated"] == 0
        assert outcome["late"] == 0 and outcome["dead_lettered"] == 0
        assert outcome["events_total_metric"] == want
        assert sampler.violations == [], sampler.violations
        assert sampler.samples > 20
        passed = True
    finally:
        sampler.stop.set()
        producer.may_stop.set()
        watch.close()
        kills = [f for f in faults if "SIGKILL + replacement" in f["fault"]]
        write_result(
            "faults",
            clock,
            long=long,
            passed=passed,
            events=stream.truth.events,
            messages_per_round=sum(stream.messages_per_round.values()),
            rounds=producer.rounds,
            stream_seconds=round(
                (producer.finished_at or time.monotonic()) - producer.started_at, 1
            )
            if producer.started_at
            else None,
            events_per_second=round(
                stream.truth.events / max(1e-9, producer.finished_at - producer.started_at)
            )
            if producer.finished_at
            else None,
            partitions=PARTITIONS,
            models=len(FAULT_MODELS),
            formats={"envelope_models": 8, "per_event_models": 4},
            replication={"input": 3, "state": 3, "dlq": 3, "min_insync": 2},
            shard_processes_started=len(everyone),
            faults_injected=len(faults) - 1,
            faults=faults,
            recovery_after_sigkill_s=[k["recovered_after_s"] for k in kills],
            lost=outcome.get("lost"),
            duplicated=outcome.get("duplicated"),
            mismatches=outcome.get("mismatches", [])[:20],
            late=outcome.get("late"),
            dead_lettered=outcome.get("dead_lettered"),
            drain_after_stream_s=outcome.get("drain_after_stream_s"),
            owner_samples=sampler.samples,
            owner_samples_with_unowned_partitions=sampler.unowned_samples,
            owner_violations=sampler.violations,
            owner_scrape_errors=sampler.errors,
            owner_sample_max_spread_s=round(sampler.max_spread, 3),
        )


# =====================================================================================
# 2. The producer while its broker is down
# =====================================================================================


@pytest.fixture(scope="module")
def outage_broker() -> Iterator[str]:
    """A single broker of this module, so stopping it disturbs nobody else."""
    kafka_script("clean", "--name", OUTAGE_CLUSTER, "--kill")
    bootstrap = start_local_cluster(OUTAGE_CLUSTER, OUTAGE_PORT)
    try:
        yield bootstrap
    finally:
        kafka_script("clean", "--name", OUTAGE_CLUSTER, "--kill")


def _bench_median_publish_us() -> float:
    """The batched publish() wall time per call that bench/bench_producer.py measured."""
    text = (ROOT / "bench" / "results" / "bench_producer.txt").read_text()
    match = re.search(r"^producer_batched_wall_us=([\d.]+)$", text, re.MULTILINE)
    assert match, "bench/results/bench_producer.txt has no producer_batched_wall_us line"
    return float(match.group(1))


class PacedPublisher(threading.Thread):
    """Calls publish() at a steady rate, timing every call, until stopped."""

    def __init__(self, pub: PredictionPublisher, rate: int) -> None:
        super().__init__(name="paced-publisher", daemon=True)
        self.pub, self.rate = pub, rate
        self.stop = threading.Event()
        self.calls: list[tuple[float, float]] = []  # (monotonic time, seconds in publish())
        self.accepted: list[int] = []
        self.raised: list[BaseException] = []

    def run(self) -> None:
        pub, rate = self.pub, self.rate
        calls, accepted = self.calls, self.accepted
        clock, perf = time.monotonic, time.perf_counter
        start = clock()
        i = 0
        while not self.stop.is_set():
            t = perf()
            try:
                ok = pub.publish(
                    "outage-model",
                    "v1",
                    0.004,
                    prediction="yes" if i % 3 else "no",
                    score=0.75,
                    event_id=str(i),
                )
            except BaseException as exc:  # publish() must never raise here
                self.raised.append(exc)
                ok = False
            calls.append((clock(), perf() - t))
            if ok:
                accepted.append(i)
            i += 1
            delay = start + i / rate - clock()
            if delay > 0:
                time.sleep(delay)


def _event_ids(values: list[bytes]) -> list[int]:
    """The event ids of every row of the envelopes (they are the publish() call index)."""
    resolver = SchemaResolver()
    ids: list[int] = []
    for v in values:
        kind, rec = resolver.read(v)
        assert kind == SchemaId.PREDICTION_BATCH
        offsets = np.frombuffer(rec["event_id_offsets"], dtype="<i4")
        data = rec["event_id_data"]
        ids += [int(data[a:b]) for a, b in itertools.pairwise(offsets.tolist())]
    return ids


def test_producer_outage_never_blocks_and_accounts_for_every_event(
    outage_broker: str, request: pytest.FixtureRequest
) -> None:
    long = _long(request)
    clock = Clock()
    outage_s = 30.0 if long else 10.0
    rate = 5000
    topic = create_topic(outage_broker, unique("rel-outage"))
    # A small buffer, so that the outage overflows it: 20k events in the publisher's
    # queue and 20 envelopes (~250 events each) in librdkafka's.
    settings = PublisherSettings(
        bootstrap_servers=outage_broker,
        topic=topic,
        linger_seconds=0.05,
        max_buffered_events=20_000,
        kafka={"queue.buffering.max.messages": 20},
    )
    pub = PredictionPublisher(settings)
    runner = PacedPublisher(pub, rate)
    bench_us = _bench_median_publish_us()
    passed = False
    figures: dict[str, Any] = {}
    try:
        runner.start()
        time.sleep(2.0)
        down_at = time.monotonic()
        kafka_script("stop", "--name", OUTAGE_CLUSTER, "--kill")
        time.sleep(max(0.0, down_at + outage_s - time.monotonic()))
        restart_at = time.monotonic()
        start_local_cluster(OUTAGE_CLUSTER, OUTAGE_PORT)
        up_at = time.monotonic()
        wait_until(lambda: pub.stats().queued < 2 * rate, 120, "the backlog to drain")
        drained_at = time.monotonic()
        time.sleep(3.0)
        runner.stop.set()
        runner.join(30)
        assert not runner.is_alive()
        assert pub.flush(120) == 0
        stats = pub.close()
        calls = len(runner.calls)
        # While the broker is down, and while its JVM starts again on this very machine
        # (which takes the CPUs a service would have, so it is reported apart).
        during = [d for t, d in runner.calls if down_at <= t < restart_at]
        restarting = [d for t, d in runner.calls if restart_at <= t <= up_at]
        before = [d for t, d in runner.calls if t < down_at]
        # The bound: 20x the median call. The median is the bench's (a hot loop's
        # average, 2.4 us), or this run's median before the outage when higher: one
        # paced call costs about twice the hot-loop figure (cold caches, the timer), and
        # more on a loaded machine. The p99 of single calls is ~8-9x their median here
        # even with the broker up (OS preemption on 2 shared cores, GC), hence 20x, not
        # 10x. A call that waited on Kafka would take >= 50 ms (the flusher's poll).
        bound_s = 20 * max(bench_us / 1e6, median(before))
        values = [m.value() for m in consume_all(outage_broker, topic, timeout=120, idle=5.0)]
        ids = _event_ids([v for v in values if v is not None])
        figures = {
            "rate_per_second": rate,
            "outage_seconds": round(up_at - down_at, 1),
            "broker_down_seconds": round(restart_at - down_at, 1),
            "broker_restart_seconds": round(up_at - restart_at, 1),
            "backlog_drained_after_restart_s": round(drained_at - up_at, 1),
            "calls": calls,
            "accepted": len(runner.accepted),
            "published": stats.published,
            "delivered_acked": stats.sent,
            "delivered_consumed": len(ids),
            "duplicates_consumed": len(ids) - len(set(ids)),
            "dropped": stats.dropped,
            "failed": stats.failed,
            "raised": len(runner.raised),
            "bench_median_publish_us": bench_us,
            "median_publish_us_before_outage": round(median(before) * 1e6, 2),
            "p99_bound_us": round(bound_s * 1e6, 2),
            "publish_us_before_outage": summary(before, 1e6, 2),
            "publish_us_broker_down": summary(during, 1e6, 2),
            "publish_us_broker_restarting": summary(restarting, 1e6, 2),
            "p99_publish_us_before": round(percentile(before, 99) * 1e6, 2),
            "p99_publish_us_broker_down": round(percentile(during, 99) * 1e6, 2),
            "p999_publish_us_broker_down": round(percentile(during, 99.9) * 1e6, 2),
            "p99_publish_us_broker_restarting": round(percentile(restarting, 99) * 1e6, 2),
        }
        assert runner.raised == []
        assert calls == stats.published + stats.dropped  # every call: accepted or dropped
        assert len(runner.accepted) == stats.published
        assert stats.failed == 0 and stats.queued == 0
        assert stats.sent == stats.published
        assert sorted(ids) == runner.accepted  # exactly the accepted ones, once each
        assert stats.dropped > 0, "the outage was meant to overflow the buffer"
        assert percentile(during, 99) <= bound_s, figures
        # Never blocks: 100 ms is OS scheduling slack, far below any Kafka timeout.
        assert max(during + restarting) < 0.1, figures
        passed = True
    finally:
        runner.stop.set()
        write_result("producer_outage", clock, long=long, passed=passed, **figures)


# =====================================================================================
# 3. Bad input
# =====================================================================================

BAD_MAX_SERIES = 20_000


def _row(model: str, t_s: float, **kw: Any) -> Row:
    base: dict[str, Any] = dict(
        model=model,
        version="v1",
        time=t_s,
        latency_seconds=0.01,
        outcome=0,
        prediction="x",
        score=0.5,
        label="x",
        segment=None,
        features=None,
        event_id="",
    )
    base.update(kw)
    return Row(**base)


def _framed(schema_id: int, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parsed_schema(schema_id), record)
    return frame(schema_id, out.getvalue())


@dataclass
class BadInputPlan:
    """Messages in log order, what each should become, and the truth of the valid rows."""

    messages: list[tuple[bytes | None, str, str | None]] = field(default_factory=list)
    # (value, kind, expected dead-letter reason or None for valid)
    per_model: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, outcome)
    valid_rows: int = 0
    rejected_rows: Counter[str] = field(default_factory=Counter)  # reason -> rows
    tried: Counter[str] = field(default_factory=Counter)  # kind -> messages

    def add(self, value: bytes | None, kind: str, reason: str | None, rows: int = 0) -> None:
        self.messages.append((value, kind, reason))
        self.tried[kind] += 1
        if reason is not None:
            self.rejected_rows[reason] += max(rows, 1)


def _offline_reason(value: bytes) -> str | None:
    """What the decoder makes of bytes (None: decodes) - for random and cut messages."""
    try:
        kind, rec = SchemaResolver().read(value)
        if kind == SchemaId.PREDICTION_BATCH:
            decode_batch(rec, 0)
        elif kind == SchemaId.PREDICTION_EVENT:
            EventChunkBuilder().add(rec, 0)
        elif kind not in (SchemaId.RESOURCE_HEARTBEAT, SchemaId.WATERMARK_MARKER):
            return "unexpected_schema"
    except DecodeError as exc:
        return exc.reason
    return None


def _bad_input_plan(seed: int, slices: int, copies: int) -> BadInputPlan:
    """Valid traffic of 4 regular models + hostile-but-valid traffic + every poison kind."""
    rng = random.Random(seed)
    plan = BadInputPlan()
    t0 = T0_MS / 1000

    def valid(value: bytes, model: str, outcomes: list[int]) -> None:
        plan.add(value, "valid", None)
        for o in outcomes:
            plan.per_model[(model, OUTCOME_NAMES[o])] += 1
        plan.valid_rows += len(outcomes)

    def event(t: float, **kw: Any) -> bytes:
        return encode_event(_row("cls-b", t, **kw))

    # kind -> (expected dead-letter reason, rows rejected, value at event time t)
    Poison = tuple[str, str | None, int, Callable[[float], bytes | None]]
    feedback = {"event_id": "e", "event_time_ms": T0_MS, "model": "cls-b", "label": "x"}
    poison: list[Poison] = [
        ("bad_magic_byte", "bad_magic", 0, lambda t: b"\x07" + event(t)[1:]),
        ("unknown_schema_id", "unknown_schema", 0, lambda t: frame(999, event(t)[5:])),
        ("truncated_header", "truncated", 0, lambda t: event(t)[:3]),
        ("empty_value", "truncated", 0, lambda t: b""),
        ("null_value", "truncated", 0, lambda t: None),
        (
            "label_feedback_on_input_topic",
            "unexpected_schema",
            0,
            lambda t: _framed(SchemaId.LABEL_FEEDBACK, feedback),
        ),
        ("nan_latency", "invalid_latency", 0, lambda t: event(t, latency_seconds=math.nan)),
        ("inf_latency", "invalid_latency", 0, lambda t: event(t, latency_seconds=math.inf)),
        ("negative_latency", "invalid_latency", 0, lambda t: event(t, latency_seconds=-0.5)),
        ("unknown_outcome", "unknown_outcome", 0, lambda t: event(t, outcome=4)),
        ("score_above_1", "invalid_score", 0, lambda t: event(t, score=1.5)),
        ("score_below_0", "invalid_score", 0, lambda t: event(t, score=-0.1)),
        ("score_inf", "invalid_score", 0, lambda t: event(t, score=math.inf)),
        (
            "float_prediction_for_classifier",
            "kind_mismatch",
            0,
            lambda t: event(t, prediction=3.5, label=None),
        ),
        ("event_time_a_day_ahead", "invalid_event_time", 0, lambda t: event(time.time() + 86_400)),
        ("negative_event_time", "invalid_event_time", 0, lambda t: event(-5.0)),
        (
            # 9 good rows and one with a negative latency: 1 row rejected, 9 counted.
            "envelope_with_one_negative_latency_row",
            "invalid_latency",
            1,
            lambda t: encode_batch(
                [
                    _row("cls-a", t + i / 1000, latency_seconds=-1.0 if i == 4 else 0.01)
                    for i in range(10)
                ]
            ),
        ),
    ]

    def cut_or_noise(kind: str, t: float) -> tuple[bytes, str]:
        """A valid message cut short, or random bytes, and what the decoder says of it."""
        while True:
            if kind == "truncated_body":
                whole = rng.choice(
                    [
                        event(t, features={"f": 1.0}, event_id="abc"),
                        encode_batch([_row("cls-a", t + i / 1000) for i in range(20)]),
                    ]
                )
                value = whole[: rng.randrange(5, len(whole))]
            else:
                value = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            reason = _offline_reason(value)
            if reason is not None:
                return value, reason

    kinds = [p[0] for p in poison] + ["truncated_body", "random_bytes"]

    for s in range(slices):
        t = t0 + s * 0.5
        ts = [t + i / 1000 for i in range(50)]
        outcomes = [rng.choice([0, 0, 0, 0, 1, 2, 3]) for _ in ts]
        rows = [
            _row("cls-a", x, outcome=o, prediction=rng.choice("xyz") if o == 0 else None)
            for x, o in zip(ts, outcomes, strict=True)
        ]
        valid(encode_batch(rows), "cls-a", outcomes)
        regs = [
            _row("reg-a", x, prediction=rng.random(), label=rng.random(), score=None) for x in ts
        ]
        valid(encode_batch(regs), "reg-a", [0] * len(regs))
        for x in ts[:25]:
            valid(encode_event(_row("cls-b", x, prediction=rng.choice("pq"))), "cls-b", [0])
            valid(
                encode_event(_row("reg-b", x, prediction=rng.gauss(0, 1), label=1.0, score=None)),
                "reg-b",
                [0],
            )
        if s == 1:
            # 10k distinct class labels for one model: 10 envelopes of 1000 labels each.
            for e in range(10):
                labels = [f"class-{e * 1000 + i}" for i in range(1000)]
                many = [
                    _row("many-classes", t + i / 1e4, prediction=c, label=labels[-1 - i])
                    for i, c in enumerate(labels)
                ]
                plan.add(encode_batch(many), "10k_distinct_class_labels", None)
                plan.per_model[("many-classes", "ok")] += len(many)
                plan.valid_rows += len(many)
        if s == 2:
            # 10k distinct model names, one event each, some with characters that need
            # escaping in the exposition format.
            odd = ['q"uote', "back\\slash", "new\nline", "émoji-🙂", "tab\there", " ", "}{,="]
            for i in range(10_000):
                name = f"{odd[i % len(odd)]}-{i}" if i % 50 == 0 else f"model-{i}"
                value = encode_event(_row(name, t + i / 1e5, prediction="x"))
                plan.add(value, "10k_distinct_model_names", None)
                plan.valid_rows += 1
        every = max(1, slices // copies)
        for k, kind in enumerate(kinds):
            if (s + k) % every:
                continue
            if k < len(poison):
                _, reason, rows, make = poison[k]
                value = make(t + 0.01)
            else:
                (value, reason), rows = cut_or_noise(kind, t + 0.01), 0
            if kind == "envelope_with_one_negative_latency_row":
                plan.per_model[("cls-a", "ok")] += 9
                plan.valid_rows += 9
            plan.add(value, kind, reason, rows)
    return plan


class Scraper(threading.Thread):
    """GETs /metrics in a loop; counts failures and keeps the times."""

    def __init__(self, shard: ShardProcess, interval: float = 0.05) -> None:
        super().__init__(name="scraper", daemon=True)
        self.shard, self.interval = shard, interval
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.seconds: list[float] = []
        self.max_bytes = 0

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            status, body, seconds = get(self.shard.url + "/metrics", timeout=10)
            if status != 200:
                self.failures.append(f"status {status}")
                continue
            try:
                parse_metrics(body.decode())
            except Exception as exc:
                self.failures.append(f"unparseable: {exc}")
                continue
            self.ok += 1
            self.seconds.append(seconds)
            self.max_bytes = max(self.max_bytes, len(body))


def test_bad_input_is_dead_lettered_valid_input_counted_and_scrapes_never_fail(
    kafka_bootstrap: str,
    shard_factory: Callable[..., ShardProcess],
    request: pytest.FixtureRequest,
) -> None:
    long = _long(request)
    clock = Clock()
    topic = create_topic(kafka_bootstrap, unique("rel-poison"))
    shard = shard_factory(
        kafka_bootstrap,
        topic,
        max_models=20,
        max_classes=8,
        max_series=BAD_MAX_SERIES,
        max_future="1h",
    )
    wait_assigned([shard], 1)
    slices = 200 if long else 40  # of 500 ms of event time each
    plan = _bad_input_plan(seed=3, slices=slices, copies=50 if long else 10)
    scraper = Scraper(shard)
    scraper.start()
    offsets: dict[int, tuple[str, str | None]] = {}

    def delivered(kind: str, reason: str | None, err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        offsets[msg.offset()] = (kind, reason)

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    for value, kind, reason in plan.messages:
        while True:
            try:
                producer.produce(
                    topic,
                    value,
                    b"k",
                    on_delivery=lambda e, m, k=kind, r=reason: delivered(k, r, e, m),
                )
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    produced_at = time.monotonic()
    send_markers(kafka_bootstrap, topic, 1, T0_MS + slices * 500 + 10_000)  # close all panes
    expected_dead = [off for off, (_, r) in offsets.items() if r is not None]
    passed = False
    figures: dict[str, Any] = {
        "messages": len(plan.messages),
        "valid_rows": plan.valid_rows,
        "tried_by_kind": dict(plan.tried),
        "expected_dead_letters": len(expected_dead),
        "expected_rejected_rows_by_reason": dict(plan.rejected_rows),
    }
    try:
        samples = wait_until(
            lambda: (
                (x := shard.scrape())
                and total(x, "inference_predictions_total") >= plan.valid_rows
                and x
            ),
            120,
            f"{plan.valid_rows} valid rows counted",
            [shard],
        )
        figures["ingest_seconds"] = round(time.monotonic() - produced_at, 2)
        dlq = consume_all(
            kafka_bootstrap, f"{topic}-dlq", expected=len(expected_dead), timeout=60, idle=3
        )
        time.sleep(1.0)
        samples = shard.scrape()
        scraper.stop.set()
        scraper.join(30)
        _, body, _ = get(shard.url + "/metrics")
        lines = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
        dead: dict[int, str] = {}
        duplicates = 0
        for m in dlq:
            h = {k: v.decode() for k, v in (m.headers() or [])}
            off = int(h["modelpulse.source.offset"])
            duplicates += off in dead
            dead[off] = h["modelpulse.reason"]
        wrong = {
            off: (offsets[off], got)
            for off, got in dead.items()
            if off not in offsets or offsets[off][1] != got
        }
        missing = sorted(set(expected_dead) - set(dead))
        counted = total(samples, "inference_predictions_total")
        got_reasons = {  # every known reason is exported from the start, at 0
            labels["reason"]: v
            for labels, v in samples.get("modelpulse_dead_lettered_total", [])
            if v
        }
        series = total(samples, "modelpulse_series")
        figures.update(
            {
                "counted_rows": counted,
                "dead_letters": len(dlq),
                "dead_letter_duplicates": duplicates,
                "dead_letters_missing": len(missing),
                "dead_letters_with_wrong_reason": len(wrong),
                "dead_lettered_total_by_reason": got_reasons,
                "folded": {
                    labels["kind"]: v
                    for labels, v in samples.get("modelpulse_folded_total", [])
                    if v
                },
                "series": series,
                "exposed_lines": lines,
                "max_series": BAD_MAX_SERIES,
                "scrapes_ok": scraper.ok,
                "scrape_failures": len(scraper.failures),
                "scrape_ms": summary(scraper.seconds, 1e3, 2),
                "max_scrape_bytes": scraper.max_bytes,
                "shard_alive": shard.alive(),
            }
        )
        assert counted == plan.valid_rows
        for (model, outcome), want in plan.per_model.items():
            got = total(samples, "inference_predictions_total", model=model, outcome=outcome)
            assert got == want, (model, outcome, got, want)
        overflow = total(samples, "inference_predictions_total", model="__overflow__")
        assert overflow > 0 and total(samples, "modelpulse_folded_total", kind="model") > 0
        many = [
            labels
            for labels, _ in samples.get("model_confusion_total", [])
            if labels["model"] == "many-classes"
        ]
        classes = {x["predicted"] for x in many} | {x["actual"] for x in many}
        assert "__overflow__" in classes and len(classes) <= 8  # --max-classes, overflow incl.
        assert total(samples, "model_confusion_total", model="many-classes") == 10_000
        assert missing == [] and wrong == {}, (missing[:10], list(wrong.items())[:10])
        assert got_reasons == dict(plan.rejected_rows), (got_reasons, plan.rejected_rows)
        assert series <= BAD_MAX_SERIES and lines <= BAD_MAX_SERIES
        assert scraper.failures == [] and scraper.ok > 10
        assert shard.alive() and shard.get("/healthz")[0] == 200
        passed = True
    finally:
        scraper.stop.set()
        write_result("bad_input", clock, long=long, passed=passed, **figures)


def _seed_messages() -> list[bytes]:
    """Valid messages of every kind the input topic carries, to be mutated."""
    t = T0_MS / 1000
    cls = [
        _row(
            "fz-cls",
            t + i / 100,
            outcome=i % 5 if i % 7 else 0,
            prediction=["a", "b", None][i % 3],
            label=["b", None, "a"][i % 3],
            segment=["eu", None][i % 2],
            features={"f1": i / 3, "f2": -1.0} if i % 2 else None,
            event_id=f"id-{i}" if i % 3 else "",
        )
        for i in range(12)
    ]
    reg = [
        _row("fz-reg", t + i / 100, prediction=i * 1.5, label=[i * 1.0, None][i % 2], score=None)
        for i in range(12)
    ]
    heartbeat = encode_heartbeat(
        {
            "event_time_ms": T0_MS,
            "service": "svc",
            "instance": "pod-1",
            "cpu_usage_ratio": 0.5,
            "memory_usage_bytes": 10**9,
            "disk_usage_ratio": 0.1,
            "gpus": [{"index": 0, "utilization_ratio": 0.3, "memory_used_bytes": None}],
        }
    )
    marker = _framed(SchemaId.WATERMARK_MARKER, {"event_time_ms": T0_MS + 5000, "origin": "x"})
    return [
        encode_batch(cls, service="svc", instance="i"),
        encode_batch(reg),
        encode_batch(cls[:1]),
        *(encode_event(r, service="svc") for r in cls[:4]),
        *(encode_event(r) for r in reg[:3]),
        heartbeat,
        marker,
    ]


@st.composite
def _mutated(draw: Any, seeds: list[bytes]) -> bytes:
    """A valid message after 1-4 mutations: bit flips, cuts, splices, header swaps..."""
    value = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                ["flip", "byte", "cut", "splice", "header", "insert", "delete", "varint"]
            )
        )
        n = len(value)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            value[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            value[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            value = value[: draw(st.integers(0, n))]
        elif op == "splice":  # a prefix of this one + a suffix of another (either format)
            other = draw(st.sampled_from(seeds))
            value = value[: draw(st.integers(0, n))] + other[draw(st.integers(0, len(other))) :]
        elif op == "header" and n >= 5:  # read the body with another schema
            value[1:5] = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 2**31])).to_bytes(4, "big")
        elif op == "insert":
            i = draw(st.integers(0, n))
            value[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del value[i : i + draw(st.integers(1, 8))]
        elif op == "varint" and n > 5:  # a huge or negative length/count
            i = draw(st.integers(5, n - 1))
            value[i : i + 1] = draw(st.sampled_from([b"\x01", b"\x7f", b"\xff\xff\xff\xff\x0f"]))
    return bytes(value)


def _ingest_like_the_shard(
    state: PartitionState, values: list[bytes], first_offset: int, stats: Counter[str]
) -> None:
    """What Shard._process does with one partition's messages, minus Kafka."""
    items: list[RowChunk | Marker | Heartbeat] = []
    builder = EventChunkBuilder()
    resolver = SchemaResolver()
    non_rows: set[int] = set()
    rows = 0
    for i, value in enumerate(values):
        off = first_offset + i
        try:
            kind, rec = resolver.read(value)
            if kind == SchemaId.PREDICTION_EVENT:
                try:
                    builder.add(rec, off)
                except (KeyError, TypeError) as exc:  # the shard maps these the same way
                    raise DecodeError("undecodable", str(exc)) from None
                rows += 1
                continue
            if len(builder):
                items.append(builder.build())
            if kind == SchemaId.PREDICTION_BATCH:
                chunk = decode_batch(rec, off)
                rows += len(chunk)
                items.append(chunk)
            elif kind == SchemaId.RESOURCE_HEARTBEAT:
                items.append(Heartbeat(off, rec))
                non_rows.add(off)
            elif kind == SchemaId.WATERMARK_MARKER:
                items.append(Marker(off, int(rec["event_time_ms"])))
                non_rows.add(off)
            else:
                raise DecodeError("unexpected_schema", str(kind))
        except DecodeError as exc:
            stats[f"decode_error:{exc.reason}"] += 1
            non_rows.add(off)
    if len(builder):
        items.append(builder.build())
    offsets = np.arange(first_offset, first_offset + len(values), dtype=np.int64)
    stamps = np.full(len(values), T0_MS + 60_000, dtype=np.int64)
    result = state.ingest(items, offsets, stamps, next_offset=first_offset + len(values))
    rejected_rows = sum(1 for off in result.offsets.tolist() if off not in non_rows)
    stats["rows"] += rows
    stats["rows_accepted"] += result.accepted
    stats["rows_rejected"] += rejected_rows
    # Nothing silently lost: every decoded row was accepted or rejected (dead-lettered).
    assert result.accepted + rejected_rows == rows, (result.accepted, rejected_rows, rows)


def test_fuzz_mutated_messages_only_ever_raise_decode_error(
    request: pytest.FixtureRequest,
) -> None:
    long = _long(request)
    clock = Clock()
    examples = 3000 if long else 400
    seeds = _seed_messages()
    config = _test_settings(max_models=8, max_classes=4, max_series=5000).state_config()
    stats: Counter[str] = Counter()
    failures: list[str] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(st.one_of(_mutated(seeds), st.sampled_from(seeds)), min_size=1, max_size=6))
    def run(values: list[bytes]) -> None:
        stats["examples"] += 1
        stats["messages"] += len(values)
        state = PartitionState(config, 0)
        # As in production, numpy's overflow warnings are warnings, not errors (they are
        # counted; what an overflow does to the sums is test_non_finite_regression_...).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            try:
                _check(state, values)
            finally:
                stats["numpy_runtime_warnings"] += len(caught)

    def _check(state: PartitionState, values: list[bytes]) -> None:
        try:
            _ingest_like_the_shard(state, values, 0, stats)
            _ingest_like_the_shard(state, values[::-1], len(values), stats)
            # Every panel's view, the exposition and the snapshot must survive it too.
            families = build_families([state.view()], config)
            render_payload(families, LabelCache())
            restored = PartitionState.from_bytes(state.to_bytes(), config)
            assert restored.events_accepted == state.events_accepted
            open_slots = ~state.slot_closed
            binned = state.cum["outcome"].sum() + state.ring["outcome"][open_slots].sum()
            assert binned == state.events_accepted, (binned, state.events_accepted)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
            raise

    passed = False
    try:
        run()
        passed = True
    finally:
        write_result(
            "decoder_fuzz",
            clock,
            long=long,
            passed=passed,
            examples=stats["examples"],
            messages=stats["messages"],
            rows_decoded=stats["rows"],
            rows_accepted=stats["rows_accepted"],
            rows_rejected=stats["rows_rejected"],
            decode_errors={
                k.split(":", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("decode")
            },
            numpy_runtime_warnings=stats["numpy_runtime_warnings"],
            other_exceptions=len(failures),
            first_failures=failures[:5],
        )


# =====================================================================================
# 4. Soak
# =====================================================================================


class BurstPublisher(threading.Thread):
    """publish() at a steady rate in 10 ms bursts, from precomputed random values."""

    def __init__(self, pub: PredictionPublisher, rate: int, models: list[str], seed: int) -> None:
        super().__init__(name=f"soak-{seed}", daemon=True)
        self.pub, self.rate, self.models = pub, rate, models
        self.stop = threading.Event()
        rng = np.random.default_rng(seed)
        self.lat = rng.lognormal(-4.5, 1.0, 4096).tolist()
        self.score = rng.random(4096).tolist()
        self.value = rng.normal(50, 10, 4096).tolist()
        self.calls = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            pub, models, n_models = self.pub, self.models, len(self.models)
            lat, score, value = self.lat, self.score, self.value
            start = time.monotonic()
            i = 0
            while not self.stop.is_set():
                due = int((time.monotonic() - start) * self.rate)
                while i < due:
                    k = i & 4095
                    model = models[i % n_models]
                    if model.startswith("reg"):
                        pub.publish(model, "v1", lat[k], prediction=value[k], label=value[k - 1])
                    else:
                        cls = "yes" if score[k] > 0.4 else "no"
                        pub.publish(
                            model,
                            "v1",
                            lat[k],
                            prediction=cls,
                            score=score[k],
                            label=cls if k % 5 else "no",
                        )
                    i += 1
                self.calls = i
                time.sleep(0.01)
        except BaseException as exc:
            self.error = exc


def test_soak_lag_memory_and_scrape_time_stay_flat(
    kafka_bootstrap: str,
    shard_factory: Callable[..., ShardProcess],
    request: pytest.FixtureRequest,
) -> None:
    long = _long(request)
    clock = Clock()
    duration = 600.0 if long else 90.0
    interval = 10.0 if long else 3.0
    warmup = max(15.0, duration * 0.15)
    partitions = 4
    topic = create_topic(kafka_bootstrap, unique("rel-soak"), partitions)
    shards = [shard_factory(kafka_bootstrap, topic) for _ in range(2)]
    wait_assigned(shards, partitions)
    batch_pub = PredictionPublisher(
        PublisherSettings(bootstrap_servers=kafka_bootstrap, topic=topic, service="soak")
    )
    event_pub = PredictionPublisher(
        PublisherSettings(
            bootstrap_servers=kafka_bootstrap, topic=topic, service="soak-java", mode="event"
        )
    )
    runners = [
        BurstPublisher(batch_pub, 10_000, [f"cls-{i}" for i in range(4)] + ["reg-0", "reg-1"], 1),
        BurstPublisher(event_pub, 500, ["cls-ev", "reg-ev"], 2),
    ]
    samples: list[dict[str, Any]] = []
    passed = False
    figures: dict[str, Any] = {"duration_s": duration, "shards": 2, "partitions": partitions}
    try:
        for r in runners:
            r.start()
        started = time.monotonic()
        while time.monotonic() - started < duration:
            time.sleep(interval - (time.monotonic() - started) % interval)
            # Three scrapes of each shard; a scrape's time is their median (one GET is
            # at the mercy of the shard's GIL and of this busy machine's scheduler).
            scrapes = [[Scrape.of(s.url, timeout=10) for _ in range(3)] for s in shards]
            ok = all(x.status == 200 for xs in scrapes for x in xs)
            assert ok, [s.log_tail(20) for s in shards]
            samples.append(
                {
                    "t": time.monotonic() - started,
                    "lag": sum(sum(xs[-1].lag.values()) for xs in scrapes),
                    "rss": [rss_bytes(s.proc.pid) for s in shards if s.proc is not None],
                    "scrape_s": max(median(x.seconds for x in xs) for xs in scrapes),
                }
            )
        for r in runners:
            r.stop.set()
            r.join(30)
            assert r.error is None, r.error
        stats = [batch_pub.close(), event_pub.close()]
        sent = sum(x.sent for x in stats)
        elapsed = time.monotonic() - started
        admin_consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": unique("w")})
        messages = sum(
            admin_consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        )
        admin_consumer.close()
        send_markers(kafka_bootstrap, topic, partitions, int(time.time() * 1000) + 5000)
        final = wait_until(
            lambda: (x := merged(shards)) and total(x, "inference_predictions_total") >= sent and x,
            120,
            f"{sent} events counted",
            shards,
        )
        counted = total(final, "inference_predictions_total")
        steady = [s for s in samples if s["t"] >= warmup]
        lag = [float(s["lag"]) for s in steady]
        msgs_per_s = messages / elapsed
        lag_bound = 2 * msgs_per_s
        rss_growth = []
        for i in range(len(shards)):
            first, last = thirds([float(s["rss"][i]) for s in steady])
            rss_growth.append(median(last) / median(first) - 1)
        scrape_first, scrape_last = thirds([s["scrape_s"] for s in steady])
        figures.update(
            {
                "events_published": sum(x.published for x in stats),
                "events_sent": sent,
                "events_counted": counted,
                "dropped": sum(x.dropped for x in stats),
                "failed": sum(x.failed for x in stats),
                "events_per_second": round(sent / elapsed),
                "kafka_messages": messages,
                "messages_per_second": round(msgs_per_s),
                "samples": len(samples),
                "warmup_s": warmup,
                "lag_messages": summary(lag),
                "lag_bound_messages": round(lag_bound),
                "rss_mib_first_third_median": [
                    round(median(thirds([s["rss"][i] for s in steady])[0]) / 2**20, 1)
                    for i in range(len(shards))
                ],
                "rss_mib_last_third_median": [
                    round(median(thirds([s["rss"][i] for s in steady])[1]) / 2**20, 1)
                    for i in range(len(shards))
                ],
                "rss_growth_pct": [round(g * 100, 1) for g in rss_growth],
                "scrape_ms": summary([s["scrape_s"] for s in steady], 1e3, 2),
                "scrape_ms_first_third_median": round(median(scrape_first) * 1e3, 2),
                "scrape_ms_last_third_median": round(median(scrape_last) * 1e3, 2),
                "series": [
                    {
                        "t": round(s["t"], 1),
                        "lag": s["lag"],
                        "rss_mib": [round(x / 2**20, 1) for x in s["rss"]],
                        "scrape_ms": round(s["scrape_s"] * 1e3, 2),
                    }
                    for s in samples
                ],
            }
        )
        assert counted == sent and sum(x.failed for x in stats) == 0
        assert lag[-1] < lag_bound, (lag[-1], lag_bound)
        assert not all(b > a for a, b in itertools.pairwise(lag)), lag  # not always growing
        assert max(lag) < 5 * lag_bound, lag
        assert all(g <= 0.25 for g in rss_growth), rss_growth
        assert median(scrape_last) <= 2 * median(scrape_first) + 0.005
        passed = True
    finally:
        for r in runners:
            r.stop.set()
        write_result("soak", clock, long=long, passed=passed, **figures)


# =====================================================================================
# Bugs found by this suite (each test fails until the bug is fixed)
# =====================================================================================


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
    topic = create_topic(bootstrap, unique("rel-bug"), partitions)
    shard = shard_factory(bootstrap, topic, **flags)
    wait_assigned([shard], partitions)
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4_000_000})
    for i, value in enumerate(values):
        producer.produce(topic, value, b"k", partition=i % partitions)
    assert producer.flush(30) == 0
    send_markers(bootstrap, topic, partitions, T0_MS + 60_000)

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
    huge_model = encode_event(_row("m" * 100_000, t, prediction="a", label="a"))
    huge_class = encode_event(_row("normal", t, prediction="c" * 100_000, label="a"))
    good = [encode_event(_row("normal", t + i / 100, prediction="a")) for i in range(10)]
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
        encode_event(_row("reg", t + i / 100, prediction=1.0, label=1.5, score=None))
        for i in range(10)
    ]
    bad = [
        encode_event(_row("reg", t + 0.5, prediction=math.inf, label=1.0, score=None)),
        encode_event(_row("reg", t + 0.6, prediction=1.0, label=-math.inf, score=None)),
        encode_event(_row("reg", t + 0.7, prediction=1e200, label=-1e200, score=None)),
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
            _row(
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
    topic = create_topic(kafka_bootstrap, unique("rel-series"), partitions)
    shard = shard_factory(kafka_bootstrap, topic, max_series=max_series)
    wait_assigned([shard], partitions)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 4_000_000})
    for beat in heartbeats:
        producer.produce(topic, beat, b"svc", partition=0)
    for i, value in enumerate(values):
        producer.produce(topic, value, b"k", partition=i % partitions)
    assert producer.flush(30) == 0
    send_markers(kafka_bootstrap, topic, partitions, T0_MS + 60_000)

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
        rows = [_row(f"m{i % 8}", T0_MS / 1000 + i / 10, prediction="a")] * 20
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
