"""Reliability: a soak, steady load on 2 shards; lag, RSS and scrape time stay flat.

Writes ``reliability/results/soak.json`` (RELIABILITY.md); ``--long`` runs the long
form.
"""

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition
from kafka_util import create_topic, unique
from reliability_util import Clock, Scrape, median, rss_bytes, summary, thirds, write_result
from shards import ShardProcess, merged, send_markers, total, wait_assigned, wait_until

from producer import PredictionPublisher, PublisherSettings


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
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess], long: bool
) -> None:
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
