"""Reliability, fault suite: shards SIGKILLed, SIGTERMed, joined and left, a broker crash.

A 3-broker cluster, 3 aggregator shards, a seeded stream of both wire formats; shards
are SIGKILLed, SIGTERMed, joined and left, a broker is SIGKILLed and restarted; the
merged final counters equal the offline truth. Writes
``reliability/results/faults.json`` (RELIABILITY.md); ``--long`` runs the long form.
"""

import math
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
from kafka_util import PrivateCluster, kafka_script, unique
from reliability_util import OUTCOME_NAMES, T0_MS, Clock, scrape_all, shard_settings, write_result
from shards import Samples, ShardProcess, merged, send_markers, total, wait_assigned, wait_until

from producer.encode import Row, encode_batch, encode_event

FAULT_CLUSTER = "reliability"
FAULT_PORT = int(os.environ.get("MODELPULSE_RELIABILITY_PORT", "29592"))
LATENCY_BOUNDS = shard_settings().state_config().latency_bounds
# A 3-broker KRaft cluster of this module (RF 3, min.insync.replicas 2 by default).
cluster3 = PrivateCluster(FAULT_CLUSTER, FAULT_PORT, brokers=3).fixture()


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
    cluster3: str, shard_factory: Callable[..., ShardProcess], long: bool
) -> None:
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
