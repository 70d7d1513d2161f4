"""Labels that arrive later, joined to their predictions by event id, on the real broker.

Predictions without labels, then their labels seconds later on the co-partitioned
feedback topic: out of order, some before their prediction, some twice, some for ids
nobody predicted; one shard SIGKILLed and another joining in the middle. The joined
counters equal scikit-learn's confusion matrix of the pairs the test joins itself, and
every unmatched label is counted once by reason.
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
from confluent_kafka.admin import AdminClient, NewTopic
from shards import ShardProcess, merged, send_markers, total, wait_assigned, wait_until
from sklearn.metrics import confusion_matrix

from producer.encode import Row, encode_batch
from schemas.codec import encode_label

T0_MS = 1_700_000_200_000
PARTITIONS = 4
MODELS = [f"fraud-{i}" for i in range(6)]
CLASSES = ["legit", "fraud"]
ROUNDS = 16
PER_MODEL = 120  # predictions per model and round (one second of event time)


class Plan:
    """The seeded predictions and labels, and what the shards must count of them."""

    def __init__(self, seed: int = 11) -> None:
        rng = np.random.default_rng(seed)
        self.rows: list[list[Row]] = []  # per round
        self.labels: list[list[tuple[str, str, str, int]]] = [[] for _ in range(ROUNDS + 3)]
        self.pairs: dict[str, list[tuple[str, str]]] = {m: [] for m in MODELS}
        self.unmatched: Counter[str] = Counter()
        for r in range(ROUNDS):
            rows = []
            for model in MODELS:
                for i in range(PER_MODEL):
                    t = T0_MS + r * 1000 + int(rng.integers(1000))
                    pred = CLASSES[int(rng.random() < 0.3)]
                    eid = f"{model}-{r}-{i}"
                    rows.append(Row(model, "v1", t / 1000, 0.01, 0, pred, 0.8, None, None, None,
                                    eid))  # fmt: skip
                    if rng.random() < 0.6:
                        truth = pred if rng.random() < 0.85 else CLASSES[1 - CLASSES.index(pred)]
                        # 2-3 rounds later; every 4th round's labels come one round early,
                        # i.e. before their predictions (the early path).
                        due = r - 1 if r % 4 == 3 else r + 2 + int(rng.integers(2))
                        self.labels[max(due, 0)].append((model, eid, truth, t + 2500))
                        self.pairs[model].append((truth, pred))
            rows.sort(key=lambda row: float(row.time))
            self.rows.append(rows)
        for r, batch in enumerate(self.labels):
            rng.shuffle(batch)  # out of order within a round
            if batch and r % 3 == 1:
                model, eid, truth, t = batch[0]
                batch.append((model, eid, truth, t + 10))  # a second label for one id
                self.unmatched["duplicate_label"] += 1
            if r % 5 == 2:
                batch.append((MODELS[r % len(MODELS)], f"nobody-{r}", "fraud", T0_MS + r * 1000))
                self.unmatched["unknown_prediction"] += 1

    @property
    def joined(self) -> int:
        return sum(len(p) for p in self.pairs.values())


def _produce(bootstrap: str, topic: str, feedback: str, plan: Plan, progress: list[int]) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5}
    )
    for r in range(ROUNDS + 3):
        for model, eid, truth, t in plan.labels[r]:
            producer.produce(feedback, encode_label((model, eid, truth, t / 1000, "")),
                             model.encode())  # fmt: skip
        if r < ROUNDS:
            by_model: dict[str, list[Row]] = {}
            for row in plan.rows[r]:
                by_model.setdefault(row.model, []).append(row)
            for model, rows in by_model.items():
                producer.produce(topic, encode_batch(rows), model.encode())
        assert producer.flush(30) == 0
        progress.append(r)
        time.sleep(0.3)


@pytest.fixture
def start_shard(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> Callable[..., ShardProcess]:
    return functools.partial(shard_factory, kafka_bootstrap, snapshot_interval="500ms")


def test_late_labels_join_exactly_through_a_sigkill_and_a_rebalance(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    topic = topic_factory("labels", partitions=PARTITIONS)
    feedback = f"{topic}-feedback"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(feedback, num_partitions=PARTITIONS)])[feedback].result(30)
    flags = {"feedback_topic": feedback, "label_wait": "3s"}
    shards = [start_shard(topic, **flags), start_shard(topic, **flags)]
    wait_assigned(shards, PARTITIONS)
    plan = Plan()
    progress: list[int] = []
    sender = threading.Thread(
        target=_produce, args=(kafka_bootstrap, topic, feedback, plan, progress), daemon=True
    )
    sender.start()
    wait_until(lambda: len(progress) >= 6, 120, "progress")
    shards[0].kill()  # SIGKILL: its partitions restart from their last snapshots
    shards.append(start_shard(topic, **flags))
    wait_assigned([s for s in shards if s.alive()], PARTITIONS)
    sender.join(300)
    assert len(progress) == ROUNDS + 3
    live = [s for s in shards if s.alive()]
    waiting = ROUNDS * PER_MODEL * len(MODELS) - plan.joined
    # Every label read: only the predictions without one still wait...
    wait_until(
        lambda: total(merged(live), "model_pending_predictions") == waiting,
        120,
        f"{plan.joined} labels joined",
        live,
    )
    # ...then markers close the panes the last labels went to (counters hold closed
    # panes) and end the wait of the labels nobody predicted.
    send_markers(kafka_bootstrap, topic, PARTITIONS, T0_MS + (ROUNDS + 20) * 1000)

    def done() -> bool:
        s = merged(live)
        counted = total(s, "model_joined_labels_total")
        unmatched = total(s, "modelpulse_unmatched_labels_total")
        return counted >= plan.joined and unmatched >= sum(plan.unmatched.values())

    wait_until(done, 120, "joined labels in closed panes", live)
    time.sleep(2.0)  # would anything be counted twice a moment later?
    samples = merged(live)
    assert total(samples, "model_joined_labels_total") == plan.joined
    for model, pairs in plan.pairs.items():
        y_true, y_pred = zip(*pairs, strict=True)
        want = confusion_matrix(y_true, y_pred, labels=CLASSES)
        for i, actual in enumerate(CLASSES):
            for j, predicted in enumerate(CLASSES):
                got = total(samples, "model_confusion_total", model=model, actual=actual,
                            predicted=predicted)  # fmt: skip
                assert got == want[i, j], (model, actual, predicted, got, want[i, j])
        joined = total(samples, "model_joined_labels_total", model=model)
        assert total(samples, "model_labeled_predictions_total", model=model) == joined
        assert total(samples, "model_pending_predictions", model=model) == (
            ROUNDS * PER_MODEL - len(pairs)
        )
    for reason, want_n in plan.unmatched.items():
        got = total(samples, "modelpulse_unmatched_labels_total", reason=reason)
        assert got == want_n, (reason, got, want_n)
    assert total(samples, "modelpulse_unmatched_labels_total") == sum(plan.unmatched.values())
    delays = total(samples, "model_label_delay_seconds_count")
    assert delays == plan.joined


def test_a_feedback_topic_with_another_partition_count_is_refused(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    topic = topic_factory("copart", partitions=2)
    feedback = topic_factory("copart-feedback", partitions=3)
    shard = start_shard(topic, feedback_topic=feedback)
    wait_until(lambda: not shard.alive(), 60, "the shard to refuse to start", [shard])
    tail = shard.log_tail()
    assert "co-partitioned" in tail and "3 partitions" in tail and "has 2" in tail, tail
