"""``python -m demo``: the whole stack on this machine, with traffic you can watch.

Starts Kafka (KRaft, scripts/kafka.sh), creates the topic, starts aggregator shards,
starts Prometheus scraping them (file_sd), runs a simulated fleet through the
producer library and prints a live per-model summary read from the shards. Ctrl-C
(or --duration) stops everything it started, cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic

from demo.fleet import INCIDENTS, Fleet, default_models
from demo.procs import (
    ROOT,
    Samples,
    ScriptError,
    ShardProcess,
    parse_metrics,
    printed,
    run_script,
    stop_all,
)

RUN = Path(os.environ.get("MODELPULSE_RUN_DIR", ROOT / ".run")) / "demo"


def _sh(script: str, *args: str) -> str:
    """``scripts/<script> args``; a failure ends the demo with the script's output."""
    try:
        return run_script(script, *args, timeout=None)
    except ScriptError as exc:
        raise SystemExit(f"demo: {exc}") from exc


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scripted incidents (seconds after start): "
        + "; ".join(f"{i.model}: {i.kind} at {i.start_s:.0f}s" for i in INCIDENTS),
    )
    p.add_argument("--duration", type=float, default=0, help="seconds to run; 0 = until Ctrl-C")
    p.add_argument("--rate", type=float, default=200, help="predictions per second per model")
    p.add_argument("--models", type=int, default=7, help="number of simulated models")
    p.add_argument("--shards", type=int, default=2, help="aggregator processes")
    p.add_argument("--partitions", type=int, default=6, help="partitions of the input topic")
    p.add_argument("--kafka-port", type=int, default=9092)
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--first-shard-port", type=int, default=9464)
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between summaries")
    p.add_argument(
        "--report",
        type=Path,
        metavar="PATH",
        help="at the end, write a PNG of the key dashboard panels (demo/report.py) to PATH",
    )
    return p.parse_args(argv)


FEEDBACK = "prediction-feedback"


def _ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=10).topics:
        return
    for fut in admin.create_topics([NewTopic(topic, num_partitions=partitions)]).values():
        fut.result(30)


def _scrape(shards: list[ShardProcess]) -> Samples:
    """Every answering shard's samples, merged (a shard starting or gone is skipped)."""
    out: Samples = defaultdict(list)
    for shard in shards:
        try:
            status, text = shard.get("/metrics", timeout=2)
        except OSError:
            continue
        if status == 200:
            for name, rows in parse_metrics(text).items():
                out[name].extend(rows)
    return out


def _value(samples: Any, name: str, **labels: str) -> float | None:
    rows = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    return sum(rows) if rows else None


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".", maxsplit=1)[0])
    return "-".rjust(width) if value is None else format(value, spec)


def _summary(samples: Any, elapsed: float) -> str:
    lines = [
        f"\n modelpulse demo, {elapsed:5.0f}s  (1m window, last closed pane)",
        f" {'model':<18}{'version':<8}{'pred/s':>8}{'errors':>8}{'accuracy':>10}"
        f"{'macro F1':>10}{'MAE':>8}{'p99 ms':>8}{'drift':>8}",
    ]
    models = sorted({(lab["model"], lab["version"]) for lab, _ in samples.get("model_info", [])})
    for model, version in models:
        w = {"model": model, "version": version, "window": "1m"}
        total = _value(samples, "inference_predictions_total", model=model, version=version)
        errors = _value(samples, "inference_errors_total", model=model, version=version)
        err = None if not total else (errors or 0) / total
        p99 = _value(samples, "inference_latency_quantile_seconds", q="0.99", **w)
        drift_rows = [
            v
            for lab, v in samples.get("model_drift_score", [])
            if lab["model"] == model and lab["window"] == "1m" and lab["method"] == "psi"
        ]
        lines.append(
            f" {model:<18}{version:<8}"
            f"{_fmt(_value(samples, 'inference_throughput', **w), '8.1f')}"
            f"{_fmt(None if err is None else 100 * err, '7.1f')}%"
            f"{_fmt(_value(samples, 'model_accuracy', **w), '10.3f')}"
            f"{_fmt(_value(samples, 'model_f1_score', **{'class': 'macro'}, **w), '10.3f')}"
            f"{_fmt(_value(samples, 'model_mae', **w), '8.2f')}"
            f"{_fmt(None if p99 is None else p99 * 1000, '8.1f')}"
            f"{_fmt(max(drift_rows) if drift_rows else None, '8.2f')}"
        )
    for model, version in models:
        pending = _value(samples, "model_pending_predictions", model=model, version=version)
        joined = _value(samples, "model_joined_labels_total", model=model, version=version)
        if not pending and not joined:
            continue  # its labels come inline, at publish()
        coverage = _value(samples, "model_label_coverage", model=model, version=version)
        unmatched = _value(samples, "modelpulse_unmatched_labels_total") or 0
        lines.append(
            f" late labels of {model}: {joined or 0:.0f} joined, {pending or 0:.0f} pending"
            f" (waiting up to the 7d time to live), coverage (older than 2m) "
            f"{'-' if coverage is None else format(coverage, '.1%')}, "
            f"{unmatched:.0f} unmatched (all models)"
        )
    dead = _value(samples, "modelpulse_dead_lettered_total") or 0
    lag = _value(samples, "modelpulse_consumer_lag") or 0
    owned = {lab.get("partition") for lab, _ in samples.get("modelpulse_events_total", [])}
    lines.append(
        f" shards: {len(owned)} partitions owned, lag {lag:.0f} msgs, dead-lettered {dead:.0f}"
    )
    return "\n".join(lines)


# The plain accuracy alert and its confidence-gated sibling, side by side for the two
# accuracy incidents of demo/fleet.py: a real drop (thousands of labels) and a dip of a
# model with rare labels (below the gated alert's minimum sample).
GATE_MODELS = ("fraud-detector", "ticket-priority")
PLAIN, GATED = "ModelAccuracyLow", "ModelAccuracyConfidentlyLow"
MIN_SAMPLE = 100  # labelled predictions per window (prometheus/rules/alerts.yml)


def _get(prometheus_url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{prometheus_url}{path}", timeout=2) as r:
        return json.loads(r.read())["data"]


def _by_model(prometheus_url: str, expr: str) -> dict[str, float]:
    """An instant query's value per model (summed over versions)."""
    rows = _get(prometheus_url, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    out: dict[str, float] = defaultdict(float)
    for row in rows["result"]:
        out[row["metric"].get("model", "")] += float(row["value"][1])
    return out


def _alerts(prometheus_url: str | None) -> str:
    """Firing (and pending) alerts from Prometheus' API, then plain vs gated accuracy."""
    if not prometheus_url:
        return " alerts: Prometheus not started"
    try:
        alerts = _get(prometheus_url, "/api/v1/alerts")["alerts"]
        labelled = _by_model(prometheus_url, "model:labelled_predictions:increase5m")
        labelled_1h = _by_model(prometheus_url, "model:labelled_predictions:increase1h")
        upper = _by_model(prometheus_url, "max by (model) (model:accuracy:wilson_upper5m)")
    except (OSError, ValueError, KeyError):
        return " alerts: Prometheus not answering yet"
    parts = sorted(
        f"{a['labels'].get('alertname')}[{a['labels'].get('model', a['labels'].get('reason', ''))}]"
        + ("" if a.get("state") == "firing" else " (pending)")
        for a in alerts
    )
    lines = [" alerts: " + (", ".join(parts) if parts else "none firing")]
    state = {(a["labels"].get("alertname"), a["labels"].get("model")): a["state"] for a in alerts}
    lines.append(
        f" {'accuracy alerts':<19}{'plain ' + PLAIN:<24}{'gated ' + GATED:<35}"
        f"{'labelled 5m / 1h':>19}{'accuracy <= (95%, 5m)':>23}"
    )
    for model in GATE_MODELS:
        n, n_1h = labelled.get(model), labelled_1h.get(model)
        few = max(n or 0, n_1h or 0) < MIN_SAMPLE
        note = f"  both < {MIN_SAMPLE} labelled: the gate holds" if n and few else ""
        plain, gated = state.get((PLAIN, model), "-"), state.get((GATED, model), "-")
        lines.append(
            f"   {model:<17}{plain:<24}{gated:<35}{_fmt(n, '10.0f')} /{_fmt(n_1h, '7.0f')}"
            f"{_fmt(None if few else upper.get(model), '23.3f')}{note}"
        )
    return "\n".join(lines)


def _write_report(prometheus_url: str, path: Path, fleet: Fleet) -> None:
    """The PNG of demo/report.py over the whole run, incidents marked (before shutdown)."""
    from demo.report import ReportError, write_report  # noqa: PLC0415 - matplotlib is dev-only

    markers = {f"{i.model} {i.kind}": fleet.start_time + i.start_s for i in fleet.incidents}
    try:
        out = write_report(
            prometheus_url, path, minutes=fleet.elapsed() / 60 + 0.5, markers=markers
        )
    except (ReportError, ImportError) as exc:
        print(f"demo: no report: {exc}", file=sys.stderr)
        return
    print(f"demo: report written to {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    RUN.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=RUN / "demo.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    print("demo: starting Kafka (KRaft) ...", flush=True)
    # Each run starts from empty topics: state from an older run (or an older version
    # of the aggregator's config) is not this demo's business.
    _sh("kafka.sh", "clean", "--name", "demo")
    if not args.no_prometheus:
        _sh("prometheus.sh", "clean", "--name", "demo")
    out = _sh("kafka.sh", "start", "--name", "demo", "--port", str(args.kafka_port))
    bootstrap = printed(out, "bootstrap")
    topic = "predictions"
    _ensure_topic(bootstrap, topic, args.partitions)
    # Late labels (fraud-detector's, 90 s after the prediction) go to a topic
    # co-partitioned with the predictions, so each shard joins its own partitions.
    _ensure_topic(bootstrap, FEEDBACK, args.partitions)

    ports = [args.first_shard_port + i for i in range(args.shards)]
    shards = [
        ShardProcess(
            [
                "--bootstrap-servers",
                bootstrap,
                "--http-host",
                "127.0.0.1",
                "--shard-id",
                f"shard-{i}",
                "--idle-timeout",
                "20s",
                "--drift-reference",
                "1m",
                "--feedback-topic",
                FEEDBACK,
                "--label-coverage-age",
                "2m",  # fraud-detector's labels come 90 s late
                "--label-models",
                "fraud-detector",  # the only model whose labels come later
            ],
            port,
            RUN / f"shard-{i}.log",
        ).start()
        for i, port in enumerate(ports)
    ]
    prometheus_url = None
    if not args.no_prometheus:
        targets = ROOT / "prometheus" / "targets"
        targets.mkdir(exist_ok=True)
        (targets / "aggregators.json").write_text(
            json.dumps([{"targets": [f"127.0.0.1:{p}" for p in ports], "labels": {"env": "demo"}}])
        )
        _sh("prometheus.sh", "start", "--name", "demo", "--port", str(args.prometheus_port))
        prometheus_url = f"http://127.0.0.1:{args.prometheus_port}"

    fleet = Fleet(bootstrap, topic, default_models(args.models), args.rate)
    fleet.start()
    print(f"demo: Kafka {bootstrap}, topic {topic!r} ({args.partitions} partitions)")
    for i, shard in enumerate(shards):
        print(f"demo: aggregator shard-{i}: {shard.url}/metrics  (log {shard.log_path})")
    if prometheus_url:
        print(f'demo: Prometheus {prometheus_url}  (try: model_accuracy{{window="1m"}})')
    print(
        f"demo: {args.models} models at {args.rate:.0f} predictions/s each; Ctrl-C stops",
        flush=True,
    )

    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        next_summary = time.monotonic() + args.interval
        while not stopping:
            if args.duration and fleet.elapsed() >= args.duration:
                break
            if not all(s.alive() for s in shards):
                print("demo: an aggregator shard exited; see its log", file=sys.stderr)
                break
            if time.monotonic() >= next_summary:
                next_summary += args.interval
                print(_summary(_scrape(shards), fleet.elapsed()), flush=True)
                print(_alerts(prometheus_url), flush=True)
            time.sleep(0.2)
    finally:
        if args.report and prometheus_url:
            _write_report(prometheus_url, args.report, fleet)
        print("\ndemo: stopping fleet, shards, Prometheus and Kafka ...", flush=True)
        fleet.stop()
        stats = fleet.publisher.stats()
        final = _scrape(shards)
        stop_all(shards, timeout=30)
        if prometheus_url:
            _sh("prometheus.sh", "stop", "--name", "demo")
        _sh("kafka.sh", "stop", "--name", "demo")
        counted = _value(final, "inference_predictions_total") or 0
        print(
            f"demo: published {stats.published} predictions ({stats.sent} acknowledged, "
            f"{stats.dropped} dropped, {stats.failed} failed); aggregators counted {counted:.0f} "
            "in closed panes (the last open panes are not counted yet)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
