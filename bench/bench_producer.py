"""Benchmark: cost of ``PredictionPublisher.publish()`` against a real broker.

Three ways of recording N predictions, same inputs, same broker, same run:

* ``batched``: ``PredictionPublisher`` in ``mode="batch"`` (columnar envelopes);
* ``event``: ``PredictionPublisher`` in ``mode="event"`` (one framed PredictionEvent
  per prediction, encoded by the background flusher);
* ``naive``: what tutorials do: per prediction, fastavro ``schemaless_writer`` of the
  PredictionEvent schema into a BytesIO, the 5-byte Confluent header, then
  ``Producer.produce()`` (with a delivery callback) and ``poll(0)``; same librdkafka
  settings as the publisher's (lz4, acks=all, idempotence, linger 5 ms);
* ``publish_only`` (diagnostic): ``batched`` with the flusher held off until
  ``close()``, so ``wall`` is ``publish()`` itself without the encoding thread
  taking the GIL in between; its ``cpu`` still includes the encoding at close.

Two numbers per path: ``wall`` is what the caller sees, the wall time of the publish
loop / N (the flusher thread steals GIL time from it, which counts); ``cpu`` is the
process CPU time (all threads, librdkafka's included) from the first call until
everything is acknowledged by the broker (``close()``/``flush()``), / N. Also shown:
the wall time of that ``close()``/``flush()`` / N (for ``publish_only``: encoding and
sending everything after the loop). The loop overhead (the same loop calling a no-op)
is reported, not subtracted.

    python bench/bench_producer.py --bootstrap 127.0.0.1:49192
    python bench/bench_producer.py --events 50000 --repeats 3

Ends with ``key=value`` lines for scripts.
"""

from __future__ import annotations

import argparse
import gc
import io
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _util import create_topic, default_core, machine_line, median, pin_to_core, run_id, table
from confluent_kafka import Producer
from fastavro import schemaless_writer

from producer import PredictionPublisher, PublisherSettings
from schemas.wire import HEADER, MAGIC_BYTE, SchemaId, parsed_schema

PATHS = ("batched", "event", "naive", "publish_only")
GOAL_WALL_US = 1.0
GOAL_RATIO = 5.0

Inputs = list[tuple[str, str, float, Any, Any, Any, float]]


def make_inputs(n: int, seed: int = 7) -> Inputs:
    """N predictions of three classifiers and one regressor, as a service would send them."""
    rng = np.random.default_rng(seed)
    models = [
        ("fraud", "v7", ("legit", "fraud")),
        ("churn", "v3", ("stay", "leave")),
        ("intent", "v1", ("buy", "browse", "support", "cancel")),
        ("eta", "v2", None),
    ]
    which = rng.integers(0, len(models), n).tolist()
    latency = rng.lognormal(-4.5, 0.6, n).tolist()
    score = rng.random(n).tolist()
    truth = rng.integers(0, 4, n).tolist()
    hit = (rng.random(n) < 0.8).tolist()
    labelled = (rng.random(n) < 0.5).tolist()
    value = rng.normal(600.0, 120.0, n).tolist()
    noise = rng.normal(0.0, 30.0, n).tolist()
    now = time.time()
    rows: Inputs = []
    for i in range(n):
        model, version, classes = models[which[i]]
        t = now + i * 1e-5
        if classes is None:
            rows.append(
                (model, version, latency[i], value[i] + noise[i], None,
                 value[i] if labelled[i] else None, t)
            )  # fmt: skip
        else:
            c = classes[truth[i] % len(classes)]
            pred = c if hit[i] else classes[(truth[i] + 1) % len(classes)]
            rows.append((model, version, latency[i], pred, score[i], c if labelled[i] else None, t))
    return rows


def _loop(publish: Callable[..., Any], inputs: Inputs) -> float:
    """The timed publish loop (the same for every path); returns its wall seconds."""
    start = time.perf_counter()
    for model, version, latency, pred, score, label, t in inputs:
        publish(model, version, latency, prediction=pred, score=score, label=label, event_time=t)
    return time.perf_counter() - start


def _noop(
    model: str,
    version: str = "",
    latency_seconds: float = 0.0,
    *,
    prediction: Any = None,
    score: Any = None,
    label: Any = None,
    event_time: Any = None,
) -> bool:
    return True


def run_publisher(
    bootstrap: str, topic: str, mode: str, inputs: Inputs, *, park: bool = False
) -> dict[str, float]:
    """``park``: hold the flusher off until ``close()``, to time ``publish()`` alone."""
    extra: dict[str, Any] = {}
    if park:
        extra = {"linger_seconds": 60.0, "max_buffered_events": len(inputs) + 10}
    pub = PredictionPublisher(
        PublisherSettings(
            bootstrap_servers=bootstrap, topic=topic, mode=mode, instance="bench", **extra
        )
    )
    pub.publish("warmup", "v0", 0.001, prediction="a", score=0.5)  # connect, first kinds
    pub.flush(30)
    if park:
        # Private knob, bench only: the flusher otherwise wakes at batch_max_events
        # queued, and a larger batch_max_events would make envelopes too big to send.
        pub._wake_at = 1 << 62
    gc.collect()
    cpu0 = time.process_time()
    wall = _loop(pub.publish, inputs)
    closing = time.perf_counter()
    stats = pub.close(120)
    close = time.perf_counter() - closing
    cpu = time.process_time() - cpu0
    n = len(inputs)
    return {
        "wall_us": wall / n * 1e6,
        "cpu_us": cpu / n * 1e6,
        "close_us": close / n * 1e6,
        "sent": stats.sent - 1,
        "dropped": stats.dropped,
        "failed": stats.failed,
        "queued": stats.queued,
    }


def run_naive(bootstrap: str, topic: str, inputs: Inputs) -> dict[str, float]:
    """The tutorial way: encode and produce one Avro message per prediction, in the caller."""
    conf = PublisherSettings(bootstrap_servers=bootstrap, topic=topic).kafka_config()
    producer = Producer(conf)
    schema = parsed_schema(SchemaId.PREDICTION_EVENT)
    header = HEADER.pack(MAGIC_BYTE, SchemaId.PREDICTION_EVENT)
    counts = {"sent": 0, "failed": 0}

    def delivery_report(err: Any, _msg: Any) -> None:
        counts["failed" if err is not None else "sent"] += 1

    produce, poll = producer.produce, producer.poll

    def publish(
        model: str,
        version: str = "",
        latency_seconds: float = 0.0,
        *,
        prediction: Any = None,
        score: Any = None,
        label: Any = None,
        event_time: Any = None,
    ) -> bool:
        record = {
            "event_id": "",
            "event_time_ms": int((time.time() if event_time is None else event_time) * 1000),
            "model": model,
            "model_version": version,
            "latency_seconds": latency_seconds,
            "outcome": "ok",
            "prediction": prediction,
            "score": score,
            "label": label,
            "segment": None,
            "features": {},
            "service": "",
            "instance": "bench",
        }
        out = io.BytesIO()
        schemaless_writer(out, schema, record)
        value = header + out.getvalue()
        while True:
            try:
                produce(topic, value, model.encode(), on_delivery=delivery_report)
                break
            except BufferError:  # librdkafka's queue is full: serve callbacks, retry
                poll(0.05)
        poll(0)
        return True

    publish("warmup", "v0", 0.001, prediction="a", score=0.5)
    producer.flush(30)
    gc.collect()
    cpu0 = time.process_time()
    wall = _loop(publish, inputs)
    closing = time.perf_counter()
    left = producer.flush(120)
    close = time.perf_counter() - closing
    cpu = time.process_time() - cpu0
    n = len(inputs)
    return {
        "wall_us": wall / n * 1e6,
        "cpu_us": cpu / n * 1e6,
        "close_us": close / n * 1e6,
        "sent": counts["sent"] - 1,
        "dropped": 0,
        "failed": counts["failed"],
        "queued": left,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Per-call cost of PredictionPublisher.publish() (batched and per-event "
        "modes) against the naive fastavro + Producer.produce() baseline, on a real broker.",
        epilog="Start a broker first: scripts/kafka.sh start --name bench --port 49192",
    )
    parser.add_argument("--bootstrap", default="127.0.0.1:49192", help="Kafka bootstrap servers")
    parser.add_argument("--events", type=int, default=200_000, help="publish() calls per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per path (median reported)")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}"
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=default_core(),
        help="pin the process to this core (default: the last one; -1: do not pin)",
    )
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")

    pinned = pin_to_core(args.cpu)
    rid = run_id()
    topics = {p: create_topic(args.bootstrap, f"bench-producer-{p}-{rid}") for p in paths}
    inputs = make_inputs(args.events)
    print(f"# bench_producer: {machine_line()}")
    print(
        f"# events={args.events} repeats={args.repeats} pinned={pinned} bootstrap={args.bootstrap}",
        flush=True,
    )

    noop = [_loop(_noop, inputs) / len(inputs) * 1e6 for _ in range(3)]
    results: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    for r in range(args.repeats):  # paths interleaved, so drift hits them alike
        for p in paths:
            if p == "naive":
                res = run_naive(args.bootstrap, topics[p], inputs)
            elif p == "publish_only":
                res = run_publisher(args.bootstrap, topics[p], "batch", inputs, park=True)
            else:
                res = run_publisher(
                    args.bootstrap, topics[p], "batch" if p == "batched" else "event", inputs
                )
            results[p].append(res)
            print(
                f"  run {r + 1}/{args.repeats} {p:8s} wall {res['wall_us']:.3f} us/call  "
                f"cpu {res['cpu_us']:.3f} us/event  close/flush {res['close_us']:.3f} us/event  "
                f"sent {res['sent']:.0f} "
                f"dropped {res['dropped']:.0f} failed {res['failed']:.0f}",
                flush=True,
            )

    keys = ("wall_us", "cpu_us", "close_us")
    med = {p: {k: median(x[k] for x in results[p]) for k in keys} for p in paths}
    rows = []
    for p in paths:
        runs = results[p]
        rows.append(
            [
                p,
                f"{med[p]['wall_us']:.3f}",
                f"{min(x['wall_us'] for x in runs):.3f}-{max(x['wall_us'] for x in runs):.3f}",
                f"{med[p]['cpu_us']:.3f}",
                f"{min(x['cpu_us'] for x in runs):.3f}-{max(x['cpu_us'] for x in runs):.3f}",
                f"{med[p]['close_us']:.3f}",
                f"{sum(x['sent'] for x in runs):.0f}/{len(runs) * args.events}",
                f"{sum(x['dropped'] for x in runs):.0f}",
                f"{sum(x['failed'] for x in runs):.0f}",
            ]
        )
    print()
    print(
        table(
            [
                "path",
                "wall us/call (median)",
                "range",
                "cpu us/event (median)",
                "range",
                "close/flush wall us/event",
                "acked",
                "dropped",
                "failed",
            ],
            rows,
        )
    )
    print(f"\nloop overhead (the same loop calling a no-op): {median(noop):.3f} us/call, included")

    kv: dict[str, str] = {"producer_events": str(args.events)}
    kv["producer_repeats"] = str(args.repeats)
    kv["producer_loop_overhead_us"] = f"{median(noop):.3f}"
    for p in paths:
        kv[f"producer_{p}_wall_us"] = f"{med[p]['wall_us']:.3f}"
        kv[f"producer_{p}_cpu_us"] = f"{med[p]['cpu_us']:.3f}"
        kv[f"producer_{p}_close_us"] = f"{med[p]['close_us']:.3f}"
        kv[f"producer_{p}_dropped"] = f"{sum(x['dropped'] for x in results[p]):.0f}"
        kv[f"producer_{p}_failed"] = f"{sum(x['failed'] for x in results[p]):.0f}"
    if "naive" in paths:
        print()
        for p in paths:
            if p in ("naive", "publish_only"):
                continue
            w = med["naive"]["wall_us"] / med[p]["wall_us"]
            c = med["naive"]["cpu_us"] / med[p]["cpu_us"]
            print(f"naive / {p}: {w:.1f}x wall per call, {c:.1f}x cpu per event")
            kv[f"producer_ratio_naive_over_{p}_wall"] = f"{w:.2f}"
            kv[f"producer_ratio_naive_over_{p}_cpu"] = f"{c:.2f}"
    if "batched" in paths:
        ok = med["batched"]["wall_us"] <= GOAL_WALL_US
        kv["producer_goal_batched_wall_le_1us"] = "pass" if ok else "miss"
        if "naive" in paths:
            ratio = med["naive"]["wall_us"] / med["batched"]["wall_us"]
            kv["producer_goal_ratio_ge_5x"] = "pass" if ratio >= GOAL_RATIO else "miss"
    print()
    for k, v in kv.items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
