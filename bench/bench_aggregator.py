"""Benchmark: aggregator throughput per core and memory, against two baselines.

One run pre-fills two 1-partition topics on a real broker with the same E events
(three classifiers with labels, scores and one feature; one regressor; equal
traffic, event time advancing ``--event-rate`` events/s):

* ``envelopes``: columnar ``PredictionBatch`` envelopes of 5000 rows (``encode_batch``);
* ``events``: one Confluent-framed ``PredictionEvent`` per prediction (``encode_event``),
  same rows in the same order, keyed by model.

Each path then runs in a fresh subprocess pinned to one core, consuming a whole topic
from the beginning; CPU is the child's process time (all threads, librdkafka's too),
peak RSS its ``ru_maxrss``:

* ``ours/batched``, ``ours/per-event``: a real ``aggregator.shard.Shard`` (its
  consumer, settings and resolver) whose ``process_batch()`` runs on every consumed batch;
  the consume loop is ``Shard.run``'s body without the time-driven work (snapshots,
  markers, /metrics rendering), with ``batch_size``/timeout as in ``Shard.run``;
* ``naive``: hand-written per event: fastavro ``schemaless_reader`` then
  prometheus_client ``Histogram.labels().observe()`` (latency; regression error) and
  ``Counter.labels().inc()`` (outcome; confusion cell), cumulative only (no windows);
* ``quix``: Quix Streams ``Application``, fastavro value deserializer, event-time
  tumbling window (pane size, grace = lateness) per model with a ``reduce`` keeping
  counts per outcome and latency bucket; local RocksDB state, no changelog topic;
  timed from its first processed message (its group join is not counted);
* ``ceiling/per-event``, ``ceiling/batched``: raw consume, ``len()`` of each value.

A second table puts each path next to the ceiling of its own topic from the same run
(share = its events/s / the ceiling's) and next to the naive and Quix baselines.

    python bench/bench_aggregator.py                 # E=1M, 3 repeats, RSS check
    python bench/bench_aggregator.py --quick         # CI smoke, ~1-2 minutes
    python bench/bench_aggregator.py --profile --out bench/results

Ends with ``key=value`` lines for scripts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _util import create_topic, default_core, machine_line, median, pin_to_core, run_id, table

HERE = Path(__file__).resolve().parent
ENVELOPE_ROWS = 5000
MODELS: tuple[tuple[str, str, tuple[str, ...] | None, str], ...] = (
    ("fraud", "v7", ("legit", "fraud"), "amount"),
    ("churn", "v3", ("stay", "leave"), "tenure_days"),
    ("intent", "v1", ("buy", "browse", "support", "cancel"), "tokens"),
    ("eta", "v2", None, "distance_km"),  # regression
)
SLICE = ENVELOPE_ROWS * len(MODELS)  # events per slice: one envelope per model
PATHS = ("ours_batched", "ours_event", "naive", "quix", "ceiling_event", "ceiling_batched")
LABELS = {
    "ours_batched": "ours/batched",
    "ours_event": "ours/per-event",
    "naive": "naive fastavro+prometheus_client",
    "quix": "Quix Streams tumbling reduce",
    "ceiling_event": "ceiling: raw consume, per-event topic",
    "ceiling_batched": "ceiling: raw consume, envelope topic",
}
TOPIC_OF = {
    "ours_batched": "envelopes",
    "ours_event": "events",
    "naive": "events",
    "quix": "events",
    "ceiling_event": "events",
    "ceiling_batched": "envelopes",
}
GOALS = {"ours_batched": 5_000_000, "ours_event": 120_000}
GOAL_RATIO_NAIVE = 30.0
# Share of the raw consume of the same topic in the same run (issue 11's goals).
GOAL_SHARES = {"ours_batched": 0.40, "ours_event": 0.25}
CONSUME_TIMEOUT = 0.1  # as Shard.run
FETCH_CONF = {"fetch.queue.backoff.ms": 20, "max.partition.fetch.bytes": 8 * 1024 * 1024}


# -- data ------------------------------------------------------------------------------


def slices(events: int, rate: float, seed: int = 3) -> Iterator[list[tuple[str, list[Any]]]]:
    """The event stream, slice by slice: per slice one list of ``ENVELOPE_ROWS`` rows per model.

    Event i belongs to model ``i % 4`` and happened at ``start + i / rate`` (plus up to
    200 ms of jitter); the stream ends a minute before now, so every event is on time
    and none is in the future of its Kafka timestamp.
    """
    import numpy as np  # noqa: PLC0415

    from producer.encode import Row  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    n_slices = -(-events // SLICE)
    start = time.time() - n_slices * SLICE / rate - 60.0
    for k in range(n_slices):
        groups = []
        for m, (model, version, classes, feature) in enumerate(MODELS):
            n = ENVELOPE_ROWS
            idx = k * SLICE + m + len(MODELS) * np.arange(n)
            t = (start + idx / rate + rng.random(n) * 0.2).tolist()
            lat = rng.lognormal(-4.0, 0.7, n).tolist()
            u = rng.random(n)
            outcome = np.where(u < 0.98, 0, np.where(u < 0.99, 1, 2)).tolist()
            labelled = (rng.random(n) < 0.7).tolist()
            feat = rng.lognormal(3.0, 1.0, n).tolist()
            rows = []
            if classes is None:
                value = rng.normal(600.0, 120.0, n)
                pred = (value + rng.normal(0.0, 30.0, n)).tolist()
                value = value.tolist()
                for i in range(n):
                    ok = outcome[i] == 0
                    rows.append(
                        Row(model, version, t[i], lat[i], outcome[i], pred[i] if ok else None,
                            None, value[i] if labelled[i] else None, None,
                            {feature: feat[i]}, "")
                    )  # fmt: skip
            else:
                c = len(classes)
                truth = rng.integers(0, c, n)
                pred_i = np.where(rng.random(n) < 0.8, truth, rng.integers(0, c, n)).tolist()
                truth = truth.tolist()
                score = rng.random(n).tolist()
                for i in range(n):
                    ok = outcome[i] == 0
                    rows.append(
                        Row(model, version, t[i], lat[i], outcome[i],
                            classes[pred_i[i]] if ok else None, score[i] if ok else None,
                            classes[truth[i]] if labelled[i] else None, None,
                            {feature: feat[i]}, "")
                    )  # fmt: skip
            groups.append((model, rows))
        yield groups


def prefill(
    bootstrap: str, topics: dict[str, str], events: int, rate: float, seed: int = 3
) -> dict[str, int]:
    """Write the stream to the topics named (``envelopes``, ``events``); messages per topic."""
    from confluent_kafka import Producer  # noqa: PLC0415

    from producer.encode import encode_batch, encode_event  # noqa: PLC0415

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "compression.type": "lz4",  # the publisher's default
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    counts = dict.fromkeys(topics, 0)

    def send(topic: str, value: bytes, key: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value, key)
                return
            except BufferError:
                producer.poll(0.05)

    for groups in slices(events, rate, seed):
        for model, rows in groups:
            key = model.encode()
            if "envelopes" in topics:
                send(topics["envelopes"], encode_batch(rows, instance="bench"), key)
                counts["envelopes"] += 1
            if "events" in topics:
                for r in rows:
                    send(topics["events"], encode_event(r, instance="bench"), key)
                counts["events"] += len(rows)
        producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"prefill: {left} messages not acknowledged")
    return counts


# -- the measured paths (run in the child) -----------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Meter:
    """CPU and wall clocks of the measured span, and time spent waiting in consume()."""

    def __init__(self) -> None:
        self.consume_s = 0.0
        self.calls = 0

    def start(self) -> None:
        gc.collect()
        self.rss_start_mb = _rss_mb()
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        return {
            "cpu_s": time.process_time() - self.cpu0,
            "wall_s": time.perf_counter() - self.wall0,
            "consume_s": self.consume_s,
            "consume_calls": self.calls,
            "rss_start_mb": self.rss_start_mb,
        }

    def consume(self, consumer: Any, n: int) -> list[Any]:
        t = time.perf_counter()
        msgs: list[Any] = consumer.consume(n, CONSUME_TIMEOUT)
        self.consume_s += time.perf_counter() - t
        self.calls += 1
        return msgs


def _plain_consumer(bootstrap: str, group: str) -> Any:
    from confluent_kafka import Consumer  # noqa: PLC0415

    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **FETCH_CONF,
        }
    )


def _high(consumer: Any, topic: str) -> int:
    from confluent_kafka import TopicPartition  # noqa: PLC0415

    _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
    return int(high)


def _assign(consumer: Any, topic: str) -> None:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition  # noqa: PLC0415

    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])


def child_ours(args: argparse.Namespace, profiler: Any) -> dict[str, Any]:

    from aggregator.edge import TopicPartitionKey  # noqa: PLC0415
    from aggregator.settings import AggregatorSettings  # noqa: PLC0415
    from aggregator.shard import Shard  # noqa: PLC0415
    from aggregator.state import PartitionState  # noqa: PLC0415

    topic = args.topic
    settings = AggregatorSettings(
        bootstrap_servers=args.bootstrap,
        input_topic=topic,
        group_id=f"bench-{args.group}",
        state_topic=f"{topic}-state",
        dead_letter_topic=f"{topic}-dlq",
        http_host="127.0.0.1",
        http_port=0,
        batch_size=args.batch_size,
        shard_id="bench",
        kafka=json.loads(args.kafka),
    )
    shard = Shard(settings)  # the HTTP server and render thread are only started by run()
    consumer = shard.consumer
    high = _high(consumer, topic)  # connects to the broker before the clock starts
    state = PartitionState(shard.config, 0)
    shard.states[TopicPartitionKey(topic, 0)] = state
    meter = Meter()
    batches = 0
    meter.start()
    if profiler is not None:
        profiler.enable()
    _assign(consumer, topic)
    while state.next_offset < high:
        msgs = meter.consume(consumer, shard.batch_limit)
        # Shard.run's per-batch work, the very method it calls.
        shard.process_batch(msgs)
        if msgs:
            batches += 1
    if profiler is not None:
        profiler.disable()
    out = meter.stop()
    out.update(
        events=state.events_accepted,
        messages=high,
        rejected=sum(state.rejected.values()),
        batches=batches,
    )
    consumer.close()
    return out


def child_naive(args: argparse.Namespace, profiler: Any) -> dict[str, Any]:
    import io  # noqa: PLC0415

    from fastavro import schemaless_reader  # noqa: PLC0415
    from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: PLC0415

    from aggregator.state import StateConfig  # noqa: PLC0415 - same bucket bounds
    from schemas.wire import SchemaId, parsed_schema  # noqa: PLC0415

    cfg = StateConfig()
    registry = CollectorRegistry()
    labels = ["model", "model_version"]
    latency = Histogram(
        "inference_latency_seconds",
        "Latency",
        labels,
        buckets=cfg.latency_bounds,
        registry=registry,
    )
    predictions = Counter(
        "inference_predictions", "Predictions", [*labels, "outcome"], registry=registry
    )
    confusion = Counter(
        "inference_confusion",
        "Confusion cells",
        [*labels, "label", "prediction"],
        registry=registry,
    )
    error = Histogram(
        "inference_error", "Prediction - label", labels, buckets=cfg.error_bounds, registry=registry
    )
    schema = parsed_schema(SchemaId.PREDICTION_EVENT)
    consumer = _plain_consumer(args.bootstrap, f"bench-naive-{args.group}")
    high = _high(consumer, args.topic)
    meter = Meter()
    events = 0
    last = -1
    meter.start()
    if profiler is not None:
        profiler.enable()
    _assign(consumer, args.topic)
    while last < high - 1:
        for m in meter.consume(consumer, args.batch_size):
            if m.error() is not None:
                continue
            rec = schemaless_reader(io.BytesIO(m.value()[5:]), schema, None)
            model, version = rec["model"], rec["model_version"]
            latency.labels(model, version).observe(rec["latency_seconds"])
            predictions.labels(model, version, rec["outcome"]).inc()
            pred, label = rec["prediction"], rec["label"]
            if pred is not None and label is not None:
                if isinstance(pred, float):
                    error.labels(model, version).observe(pred - label)
                else:
                    confusion.labels(model, version, label, pred).inc()
            events += 1
            last = m.offset()
    if profiler is not None:
        profiler.disable()
    out = meter.stop()
    out.update(events=events, messages=high, rejected=0, batches=meter.calls)
    consumer.close()
    return out


def child_ceiling(args: argparse.Namespace, profiler: Any) -> dict[str, Any]:
    consumer = _plain_consumer(args.bootstrap, f"bench-raw-{args.group}")
    high = _high(consumer, args.topic)
    meter = Meter()
    nbytes = 0
    last = -1
    meter.start()
    _assign(consumer, args.topic)
    while last < high - 1:
        for m in meter.consume(consumer, args.batch_size):
            if m.error() is not None:
                continue
            nbytes += len(m.value())
            last = m.offset()
    out = meter.stop()
    out.update(events=args.events, messages=high, rejected=0, batches=meter.calls, bytes=nbytes)
    consumer.close()
    return out


def child_quix(args: argparse.Namespace, profiler: Any) -> dict[str, Any]:
    import bisect  # noqa: PLC0415
    import io  # noqa: PLC0415
    import logging  # noqa: PLC0415

    from fastavro import schemaless_reader  # noqa: PLC0415
    from quixstreams import Application  # noqa: PLC0415
    from quixstreams.models.serializers import Deserializer  # noqa: PLC0415

    from aggregator.state import StateConfig  # noqa: PLC0415
    from schemas.wire import OUTCOME_CODES, SchemaId, parsed_schema  # noqa: PLC0415

    cfg = StateConfig()
    bounds = list(cfg.latency_bounds)
    schema = parsed_schema(SchemaId.PREDICTION_EVENT)

    class AvroEvent(Deserializer):
        def __call__(self, value: bytes, ctx: Any) -> Any:
            return schemaless_reader(io.BytesIO(value[5:]), schema, None)

    def event_time(value: Any, _headers: Any, _ts: int, _ts_type: Any) -> int:
        return int(value["event_time_ms"])

    def reducer(agg: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
        agg["outcome"][OUTCOME_CODES[value["outcome"]]] += 1
        lat = value["latency_seconds"]
        agg["latency"][bisect.bisect_left(bounds, lat)] += 1
        agg["latency_sum"] += lat
        agg["count"] += 1
        return agg

    def initializer(value: dict[str, Any]) -> dict[str, Any]:
        agg = {
            "outcome": [0] * len(OUTCOME_CODES),
            "latency": [0] * (len(bounds) + 1),
            "latency_sum": 0.0,
            "count": 0,
        }
        return reducer(agg, value)

    high_consumer = _plain_consumer(args.bootstrap, f"bench-quix-probe-{args.group}")
    high = _high(high_consumer, args.topic)
    high_consumer.close()
    meter = Meter()
    seen = {"n": 0}
    app: Any = None

    def processed(_topic: str, _partition: int, offset: int) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            meter.start()
            if profiler is not None:
                profiler.enable()
        if offset >= high - 1:
            if profiler is not None:
                profiler.disable()
            seen["result"] = meter.stop()
            app.stop()

    state_dir = tempfile.mkdtemp(prefix="bench-quix-")
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=f"bench-quix-{args.group}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        use_changelog_topics=False,
        consumer_extra_config=dict(FETCH_CONF),
        loglevel=logging.WARNING,
        on_message_processed=processed,
    )
    topic = app.topic(
        args.topic,
        value_deserializer=AvroEvent(),
        key_deserializer="bytes",
        timestamp_extractor=event_time,
    )
    sdf = app.dataframe(topic)
    sdf = (
        sdf.tumbling_window(duration_ms=cfg.pane_ms, grace_ms=cfg.lateness_ms)
        .reduce(reducer, initializer)
        .final()
    )
    app.run()
    if "result" not in seen:
        raise RuntimeError(f"Quix stopped after {seen['n']} of {high} messages")
    out: dict[str, Any] = seen["result"]
    # The first message started the clock: it is not counted.
    out.update(events=seen["n"] - 1, messages=high, rejected=0, batches=0)
    return out


CHILDREN: dict[str, Callable[[argparse.Namespace, Any], dict[str, Any]]] = {
    "ours_batched": child_ours,
    "ours_event": child_ours,
    "naive": child_naive,
    "quix": child_quix,
    "ceiling_event": child_ceiling,
    "ceiling_batched": child_ceiling,
}


def child_main(args: argparse.Namespace) -> int:
    pinned = pin_to_core(args.cpu)
    profiler = None
    if args.profile_to:
        import cProfile  # noqa: PLC0415

        # ours/batched mostly waits inside consume(): profile CPU time (all threads) so
        # waiting does not count; ours/per-event is CPU-bound, and the wall timer is far
        # cheaper per call (millions of calls there).
        cpu_timer = args.child == "ours_batched"
        profiler = cProfile.Profile(time.process_time) if cpu_timer else cProfile.Profile()
    out = CHILDREN[args.child](args, profiler)
    out["rss_peak_mb"] = _rss_mb()
    out["pinned"] = pinned
    if profiler is not None:
        profiler.dump_stats(args.profile_to)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# -- the parent ---------------------------------------------------------------------------


def spawn(path: str, topic: str, events: int, args: argparse.Namespace, **extra: Any) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        path,
        "--topic",
        topic,
        "--events",
        str(events),
        "--bootstrap",
        args.bootstrap,
        "--cpu",
        str(args.cpu),
        "--batch-size",
        str(extra.get("batch_size", args.batch_size)),
        "--kafka",
        args.kafka,
        "--group",
        run_id(),
    ]
    if extra.get("profile_to"):
        cmd += ["--profile-to", str(extra["profile_to"])]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.child_timeout, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res: dict[str, Any] = json.loads(line[len("RESULT ") :])
            res["path"] = path
            return res
    raise RuntimeError(
        f"{path} child failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-3000:]}"
    )


def describe(res: dict[str, Any]) -> str:
    return (
        f"{res['events'] / res['cpu_s']:>12,.0f} ev/s cpu  {res['events'] / res['wall_s']:>12,.0f} "
        f"ev/s wall  cpu {res['cpu_s']:.2f}s wall {res['wall_s']:.2f}s "
        f"(in consume {res['consume_s']:.2f}s, {res['consume_calls']} calls)  "
        f"rss {res['rss_peak_mb']:.0f} MB  rejected {res['rejected']}"
    )


def calibrate(core: int, n: int = 20_000) -> float:
    """us per fastavro ``schemaless_reader`` of one event on ``core``: the machine's speed
    in the unit of docs/architecture.md's reference figures (4-5 us there), median of 5."""
    import io  # noqa: PLC0415

    from fastavro import schemaless_reader  # noqa: PLC0415

    from producer.encode import Row, encode_event  # noqa: PLC0415
    from schemas.wire import SchemaId, parsed_schema  # noqa: PLC0415

    schema = parsed_schema(SchemaId.PREDICTION_EVENT)
    body = encode_event(
        Row("fraud", "v7", time.time(), 0.01, 0, "fraud", 0.9, "legit", None, {"amount": 3.0}, "")
    )[5:]
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pin_to_core(core)
    try:
        times = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(n):
                schemaless_reader(io.BytesIO(body), schema, None)
            times.append((time.process_time() - t) / n * 1e6)
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    return median(times)


def profile_report(paths: list[Path], top: int = 10) -> str:
    """Top functions by own time (tottime), with their share of the profiled total."""
    import pstats  # noqa: PLC0415

    stats = pstats.Stats(*(str(p) for p in paths))
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in entries[:top]:
        where = func if file == "~" else f"{Path(file).name}:{line}({func})"
        rows.append([where, f"{nc:,}", f"{tt:.3f}", f"{100 * tt / total:.1f}%", f"{ct:.3f}"])
    return f"profile total {total:.3f} s (cProfile overhead included)\n" + table(
        ["function", "calls", "tottime s", "share", "cumtime s"], rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Aggregator events/s per core and peak RSS, ours (batched envelopes and "
        "per-event messages) against a naive fastavro+prometheus_client consumer, Quix "
        "Streams, and raw consume, on a real broker; each path in a fresh pinned subprocess.",
        epilog="Start a broker first: scripts/kafka.sh start --name bench --port 49192",
    )
    parser.add_argument("--bootstrap", default="127.0.0.1:49192", help="Kafka bootstrap servers")
    parser.add_argument(
        "--events", type=int, default=None, help="events per topic (default 1M; --quick 100k)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per path, median reported (default 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke: 100k events, 1 repeat, small RSS check"
    )
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}"
    )
    parser.add_argument(
        "--rss-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run ours/batched on --rss-events and 10x that, compare peak RSS",
    )
    parser.add_argument(
        "--rss-events", type=int, default=None, help="small size of the RSS check (200k; quick 20k)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="extra cProfile'd runs of ours/batched and ours/per-event (those in --paths); "
        "top 10 by tottime",
    )
    parser.add_argument(
        "--event-rate", type=float, default=10_000.0, help="events per second of event time"
    )
    parser.add_argument(
        "--batch-size", type=int, default=20_000, help="messages per consume() (Shard's default)"
    )
    parser.add_argument(
        "--cpu", type=int, default=default_core(), help="core for the children (-1: unpinned)"
    )
    parser.add_argument(
        "--kafka",
        default="{}",
        metavar="JSON",
        help="extra librdkafka settings for ours/* (AggregatorSettings.kafka), e.g. "
        "'{\"queued.max.messages.kbytes\": 16384}'",
    )
    parser.add_argument(
        "--rss-batch-sizes",
        default=None,
        help="comma-separated consume() batch sizes for the RSS check (default: --batch-size)",
    )
    parser.add_argument("--child-timeout", type=float, default=900.0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="also write results to this dir")
    # Internal: run one path in this process.
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="x", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    events = args.events or (100_000 if args.quick else 1_000_000)
    events = -(-events // SLICE) * SLICE
    repeats = args.repeats or (1 if args.quick else 3)
    rss_small = args.rss_events or (20_000 if args.quick else 200_000)
    rss_small = -(-rss_small // SLICE) * SLICE
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    out_lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        out_lines.append(text)

    rid = run_id()
    say(f"# bench_aggregator: {machine_line()}")
    say(
        f"# events={events:,} repeats={repeats} event_rate={args.event_rate:,.0f}/s "
        f"batch_size={args.batch_size} children pinned to core {args.cpu} "
        f"bootstrap={args.bootstrap}"
    )
    t0 = time.perf_counter()
    cal = calibrate(args.cpu)
    say(f"# calibration: fastavro schemaless_reader {cal:.2f} us/event (reference: 4-5 us)")
    topics = {
        "envelopes": create_topic(args.bootstrap, f"bench-agg-envelopes-{rid}"),
        "events": create_topic(args.bootstrap, f"bench-agg-events-{rid}"),
    }
    counts = prefill(args.bootstrap, topics, events, args.event_rate)
    say(
        f"# prefill: {counts['envelopes']:,} envelopes and {counts['events']:,} event messages "
        f"of the same {events:,} events in {time.perf_counter() - t0:.1f}s"
    )

    results: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for r in range(repeats):  # paths interleaved, so drift hits them alike
        for p in paths:
            res = spawn(p, topics[TOPIC_OF[p]], events, args)
            results[p].append(res)
            say(f"  run {r + 1}/{repeats} {LABELS[p]:38s} {describe(res)}")

    def med(p: str, key: str) -> float:
        vals = (
            [x["events"] / x[key] for x in results[p]]
            if key in ("cpu_s", "wall_s")
            else [x[key] for x in results[p]]
        )
        return median(vals)

    kv: dict[str, str] = {"agg_events": str(events), "agg_repeats": str(repeats)}
    kv["agg_calibration_fastavro_read_us"] = f"{cal:.2f}"
    base_cpu = med("ours_batched", "cpu_s") if "ours_batched" in paths else None
    base_wall = med("ours_batched", "wall_s") if "ours_batched" in paths else None
    rows = []
    for p in paths:
        cpu_rate, wall_rate = med(p, "cpu_s"), med(p, "wall_s")
        rss, rss0 = med(p, "rss_peak_mb"), med(p, "rss_start_mb")
        rows.append(
            [
                LABELS[p],
                f"{cpu_rate:,.0f}",
                f"{wall_rate:,.0f}",
                f"{1e6 / cpu_rate:.3f}",
                f"{rss:.0f} ({rss0:.0f})",
                f"{base_cpu / cpu_rate:.1f}x" if base_cpu else "-",
                f"{base_wall / wall_rate:.1f}x" if base_wall else "-",
                str(sum(x["rejected"] for x in results[p])),
            ]
        )
        key = p
        kv[f"agg_{key}_events_per_cpu_s"] = f"{cpu_rate:.0f}"
        kv[f"agg_{key}_events_per_wall_s"] = f"{wall_rate:.0f}"
        kv[f"agg_{key}_us_per_event_cpu"] = f"{1e6 / cpu_rate:.3f}"
        kv[f"agg_{key}_rss_peak_mb"] = f"{rss:.1f}"
        kv[f"agg_{key}_rss_start_mb"] = f"{rss0:.1f}"
        kv[f"agg_{key}_consume_wait_share"] = (
            f"{median(x['consume_s'] / x['wall_s'] for x in results[p]):.2f}"
        )
    say()
    say(
        table(
            [
                "path",
                "events/s per core (cpu)",
                "events/s (wall)",
                "us/event (cpu)",
                "peak RSS MB (at start)",
                "ours/batched is x faster (cpu)",
                "(wall)",
                "rejected",
            ],
            rows,
        )
    )
    say(
        "cpu = child process time, all threads (librdkafka's too), one core; "
        "medians of the runs above; ratio = ours/batched rate / this path's rate"
    )
    # Each path against the raw consume of its own topic in this run (what any consumer
    # of that topic pays before doing anything) and against the two baselines.
    ceiling_of = {"envelopes": "ceiling_batched", "events": "ceiling_event"}
    share_rows = []
    for p in paths:
        if p.startswith("ceiling_"):
            continue
        rate = med(p, "cpu_s")
        ceil_path = ceiling_of[TOPIC_OF[p]]
        ceil = med(ceil_path, "cpu_s") if ceil_path in paths else None
        share_rows.append(
            [
                LABELS[p],
                f"{rate:,.0f}",
                f"{ceil:,.0f}" if ceil else "-",
                f"{100 * rate / ceil:.1f} %" if ceil else "-",
                f"{rate / med('naive', 'cpu_s'):.1f}x" if "naive" in paths else "-",
                f"{rate / med('quix', 'cpu_s'):.1f}x" if "quix" in paths else "-",
            ]
        )
        if ceil:
            kv[f"agg_{p}_share_of_ceiling"] = f"{rate / ceil:.3f}"
    if share_rows:
        say()
        say(
            table(
                [
                    "path",
                    "events/s per core (cpu)",
                    "ceiling: raw consume of its topic, same run",
                    "share of ceiling",
                    "vs naive",
                    "vs Quix",
                ],
                share_rows,
            )
        )
    if base_cpu and "naive" in paths:
        ratio = base_cpu / med("naive", "cpu_s")
        kv["agg_ratio_batched_over_naive_cpu"] = f"{ratio:.1f}"
        kv["agg_goal_batched_ge_30x_naive"] = "pass" if ratio >= GOAL_RATIO_NAIVE else "miss"
    if "ours_event" in paths and "naive" in paths:
        kv["agg_ratio_event_over_naive_cpu"] = (
            f"{med('ours_event', 'cpu_s') / med('naive', 'cpu_s'):.2f}"
        )
    if "quix" in paths and "ours_event" in paths:
        kv["agg_ratio_event_over_quix_cpu"] = (
            f"{med('ours_event', 'cpu_s') / med('quix', 'cpu_s'):.1f}"
        )
    if base_cpu and "quix" in paths:
        kv["agg_ratio_batched_over_quix_cpu"] = f"{base_cpu / med('quix', 'cpu_s'):.1f}"
    for p, goal_share in GOAL_SHARES.items():
        if p in paths and f"agg_{p}_share_of_ceiling" in kv:
            share = float(kv[f"agg_{p}_share_of_ceiling"])
            kv[f"agg_goal_{p}_ge_{goal_share:.2f}_of_ceiling"] = (
                "pass" if share >= goal_share else "miss"
            )
    for p, goal in GOALS.items():
        if p in paths:
            kv[f"agg_goal_{p}_ge_{goal}"] = "pass" if med(p, "cpu_s") >= goal else "miss"

    if args.rss_check:
        say()
        sizes = {"small": rss_small, "large": 10 * rss_small}
        rss_topics = {}
        for name, n in sizes.items():
            rss_topics[name] = create_topic(args.bootstrap, f"bench-agg-rss-{name}-{rid}")
            prefill(args.bootstrap, {"envelopes": rss_topics[name]}, n, args.event_rate, seed=5)
        batch_sizes = [int(b) for b in (args.rss_batch_sizes or str(args.batch_size)).split(",")]
        for bs in batch_sizes:
            say(
                f"# RSS check: ours/batched on {rss_small:,} and {10 * rss_small:,} events, "
                f"consume() batches of {bs} messages (up to {bs * ENVELOPE_ROWS:,} rows)"
            )
            peaks: dict[str, list[float]] = {"small": [], "large": []}
            for r in range(repeats):
                for name, n in sizes.items():
                    res = spawn("ours_batched", rss_topics[name], n, args, batch_size=bs)
                    peaks[name].append(res["rss_peak_mb"])
                    say(f"  run {r + 1}/{repeats} ours/batched {n:>10,} events  {describe(res)}")
            small, large = median(peaks["small"]), median(peaks["large"])
            say(
                f"peak RSS: {small:.0f} MB at {rss_small:,} events, {large:.0f} MB at "
                f"{10 * rss_small:,} events: ratio {large / small:.2f}"
            )
            suffix = "" if bs == args.batch_size else f"_batch{bs}"
            kv[f"agg_rss_small_events{suffix}"] = str(rss_small)
            kv[f"agg_rss_small_mb{suffix}"] = f"{small:.1f}"
            kv[f"agg_rss_large_mb{suffix}"] = f"{large:.1f}"
            kv[f"agg_rss_ratio_10x{suffix}"] = f"{large / small:.2f}"

    if args.profile:
        prof_dir = Path(tempfile.mkdtemp(prefix="bench-prof-"))
        for p in [q for q in ("ours_batched", "ours_event") if q in paths]:
            # The batched runs are short: add up several so one hiccup does not decide.
            runs = repeats if p == "ours_batched" else 1
            targets = [prof_dir / f"profile_{p}_{i}.pstats" for i in range(runs)]
            head = [f"# cProfile of {LABELS[p]} ({runs} run(s) of {events:,} events, "]
            head[0] += "CPU-time timer)" if p == "ours_batched" else "wall-clock timer)"
            for target in targets:
                res = spawn(p, topics[TOPIC_OF[p]], events, args, profile_to=target)
                head.append(f"#   profiled run: {describe(res)}")
            say()
            for line in head:
                say(line)
            say(profile_report(targets))
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"profile_{p}.txt").write_text(
                    "\n".join(head) + "\n" + profile_report(targets, top=30) + "\n"
                )

    say()
    for k, v in kv.items():
        say(f"{k}={v}")
    say(f"# total time {time.perf_counter() - t0:.0f}s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_aggregator.txt").write_text("\n".join(out_lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
