"""Benchmark: cost of ``PredictionPublisher.publish()`` against a real broker.

Ways of recording N predictions, same broker, same run:

* ``floor``: no broker: a Python function with ``publish()``'s signature that appends
  one tuple to a deque; the least a Python ``publish()`` can cost;
* ``batched``: ``PredictionPublisher`` in ``mode="batch"`` (columnar envelopes), one
  model, the caller's view with the flusher running;
* ``rotation3``: ``batched`` with three classifiers called in strict rotation (a
  service serving several models);
* ``event``: ``PredictionPublisher`` in ``mode="event"`` (one framed PredictionEvent
  per prediction, encoded by the background flusher), on the mixed inputs (three
  classifiers and one regressor, in random order);
* ``naive``: on the mixed inputs, what tutorials do: per prediction,
  fastavro ``schemaless_writer`` of the PredictionEvent schema into a BytesIO, the
  5-byte Confluent header, then
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
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from _util import create_topic, default_core, machine_line, median, pin_to_core, run_id, table
from confluent_kafka import Producer
from fastavro import schemaless_writer

from producer import PredictionPublisher, PublisherSettings
from schemas.wire import HEADER, MAGIC_BYTE, SchemaId, parsed_schema

PATHS = ("floor", "batched", "rotation3", "event", "naive", "publish_only")
# Goals of issue 11, as ratios within one run.
GOAL_FLOOR_SHARE = 2.0  # batched wall <= 2x the floor
GOAL_NAIVE_RATIO = 10.0  # naive wall >= 10x batched wall
GOAL_ROTATION = 1.2  # rotation3 wall <= 1.2x batched wall
GOAL_EVENT_CPU = 1.0  # event cpu <= naive cpu

Inputs = list[tuple[str, str, float, Any, Any, Any, float]]


MODELS: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("fraud", "v7", ("legit", "fraud")),
    ("churn", "v3", ("stay", "leave")),
    ("intent", "v1", ("buy", "browse", "support", "cancel")),
    ("eta", "v2", None),
]


def make_inputs(n: int, seed: int = 7, *, models: int = 4, rotate: bool = False) -> Inputs:
    """N predictions of the first ``models`` of MODELS (three classifiers and one
    regressor), in random order, or in strict rotation with ``rotate``."""
    rng = np.random.default_rng(seed)
    chosen = MODELS[:models]
    which = [i % models for i in range(n)] if rotate else rng.integers(0, models, n).tolist()
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
        model, version, classes = chosen[which[i]]
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


def run_floor(inputs: Inputs) -> dict[str, float]:
    """The bare-call floor: ``publish()``'s signature, one tuple appended to a deque."""
    queue: deque[tuple[Any, ...]] = deque()
    append = queue.append

    def publish(
        model: str,
        version: str = "",
        latency_seconds: float = 0.0,
        *,
        prediction: Any = None,
        score: float | None = None,
        label: Any = None,
        outcome: str = "ok",
        event_time: float | None = None,
        event_id: str = "",
        segment: str | None = None,
        features: Any = None,
    ) -> str:
        append(
            (model, version, event_time, latency_seconds, outcome, prediction, score, label,
             segment, features, event_id)
        )  # fmt: skip
        return event_id

    gc.collect()
    cpu0 = time.process_time()
    wall = _loop(publish, inputs)
    cpu = time.process_time() - cpu0
    n = len(inputs)
    return {
        "wall_us": wall / n * 1e6,
        "cpu_us": cpu / n * 1e6,
        "close_us": 0.0,
        "sent": n,
        "dropped": 0,
        "failed": 0,
        "queued": 0,
    }


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
    topics = {
        p: create_topic(args.bootstrap, f"bench-producer-{p}-{rid}") for p in paths if p != "floor"
    }
    mixed = make_inputs(args.events)
    inputs = {
        "floor": make_inputs(args.events, models=1),
        "batched": make_inputs(args.events, models=1),
        "rotation3": make_inputs(args.events, models=3, rotate=True),
        "event": mixed,
        "naive": mixed,
        "publish_only": make_inputs(args.events, models=1),
    }
    print(f"# bench_producer: {machine_line()}")
    print(
        f"# events={args.events} repeats={args.repeats} pinned={pinned} bootstrap={args.bootstrap}",
        flush=True,
    )

    noop = [_loop(_noop, mixed) / len(mixed) * 1e6 for _ in range(3)]
    results: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    for r in range(args.repeats):  # paths interleaved, so drift hits them alike
        for p in paths:
            if p == "floor":
                res = run_floor(inputs[p])
            elif p == "naive":
                res = run_naive(args.bootstrap, topics[p], inputs[p])
            elif p == "publish_only":
                res = run_publisher(args.bootstrap, topics[p], "batch", inputs[p], park=True)
            else:
                mode = "event" if p == "event" else "batch"
                res = run_publisher(args.bootstrap, topics[p], mode, inputs[p])
            results[p].append(res)
            print(
                f"  run {r + 1}/{args.repeats} {p:12s} wall {res['wall_us']:.3f} us/call  "
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

    # Each path against its floor or baseline, as the goals of issue 11 state them.
    shares: list[list[str]] = []

    def share(
        name: str, key: str, path: str, base: str, goal: float | None, *, inverse: bool
    ) -> None:
        if path not in med or base not in med:
            return
        now, ref = med[path][key], med[base][key]
        ratio = ref / now if inverse else now / ref
        kv[f"producer_share_{path}_vs_{base}_{key[:-3]}"] = f"{ratio:.2f}"
        unit = "us/call" if key == "wall_us" else "us/event cpu"
        row = [name, f"{now:.3f} {unit}", f"{base}: {ref:.3f}", f"{ratio:.2f}x", "-", ""]
        if goal is not None:
            ok = ratio >= goal if inverse else ratio <= goal
            row[4:] = [f"{'>=' if inverse else '<='} {goal:g}x", "pass" if ok else "miss"]
            kv[f"producer_goal_{path}_vs_{base}"] = "pass" if ok else "miss"
        shares.append(row)

    share("publish(), one model, caller view", "wall_us", "batched", "floor",
          GOAL_FLOOR_SHARE, inverse=False)  # fmt: skip
    share("naive / publish(), caller view", "wall_us", "batched", "naive",
          GOAL_NAIVE_RATIO, inverse=True)  # fmt: skip
    share("publish(), three models in rotation", "wall_us", "rotation3", "batched",
          GOAL_ROTATION, inverse=False)  # fmt: skip
    share("three models in rotation, caller view", "wall_us", "rotation3", "floor",
          None, inverse=False)  # fmt: skip
    share("per-event mode, cpu per event", "cpu_us", "event", "naive",
          GOAL_EVENT_CPU, inverse=False)  # fmt: skip
    if shares:
        print()
        print(table(["path", "now", "floor or baseline", "ratio", "goal", ""], shares))
    print()
    for k, v in kv.items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
