"""Benchmark: ``aggregator.exposition.render`` against prometheus_client's ``generate_latest``.

Both render the same realistic mix (counters, ratio gauges with a few NaN,
one latency histogram with 12 bounds) from the same numpy arrays, in the same
run, so the ratio holds on a noisy machine where absolute times do not. The
reference is a custom collector building MetricFamily objects at scrape time,
as the aggregator would without this module. Outputs are checked byte for byte.

    python bench/bench_exposition.py            # 100k sample lines
    python bench/bench_exposition.py --series 20000 --runs 9

The last line, ``render_100k_ms=<median>`` (warm label cache, default size
only), is for scripts.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from aggregator.exposition import Family, LabelCache, render

LABEL_NAMES = ("model", "model_version", "segment", "class")
COUNTERS = (
    "inference_predictions",
    "inference_labels",
    "inference_true_positives",
    "inference_false_positives",
    "inference_false_negatives",
    "inference_true_negatives",
    "inference_errors",
    "inference_late_labels",
    "inference_dropped_events",
    "inference_feature_missing",
    "inference_outcome_positive",
    "inference_outcome_negative",
)
GAUGES = (
    "inference_accuracy_ratio",
    "inference_precision_ratio",
    "inference_recall_ratio",
    "inference_f1_ratio",
    "inference_false_positive_ratio",
    "inference_psi",
    "inference_latency_p99_seconds",
)
HISTOGRAM = "inference_latency_seconds"
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
LINES_PER_HISTOGRAM = len(BOUNDS) + 3  # buckets incl. +Inf, _count, _sum


def label_sets(n: int) -> list[tuple[str, ...]]:
    """``n`` distinct label tuples like the aggregator's: model, version, segment, class."""
    return [
        (f"fraud-model-{i % 40}", f"v{(i // 40) % 3}", f"segment-{i // 120}", f"class_{i % 7}")
        for i in range(n)
    ]


def make_data(n_lines: int, seed: int) -> tuple[list[Family], int, int]:
    """Families totalling about ``n_lines`` sample lines; 85 % of them counters and gauges."""
    rng = np.random.default_rng(seed)
    n_scalar = max(1, round(n_lines * 0.85 / (len(COUNTERS) + len(GAUGES))))
    n_hist = max(1, (n_lines - n_scalar * (len(COUNTERS) + len(GAUGES))) // LINES_PER_HISTOGRAM)
    scalar_labels, hist_labels = label_sets(n_scalar), label_sets(n_hist)
    families: list[Family] = []
    for name in COUNTERS:
        # Integral counts over several decades, some past 1e6 (Go exponent form).
        counts = np.floor(rng.lognormal(mean=6.0, sigma=3.0, size=n_scalar))
        families.append(
            Family(name, "counter", f"{name} so far.", LABEL_NAMES, scalar_labels, values=counts)
        )
    for name in GAUGES:
        ratios = rng.random(n_scalar)
        ratios[rng.random(n_scalar) < 0.01] = np.nan  # zero denominators: left out
        families.append(
            Family(
                name, "gauge", f"{name} over the window.", LABEL_NAMES, scalar_labels, values=ratios
            )
        )
    buckets = rng.poisson(40.0, size=(n_hist, len(BOUNDS) + 1)).astype(np.float64)
    sums = buckets.sum(axis=1) * rng.random(n_hist) * 0.2
    families.append(
        Family(
            HISTOGRAM,
            "histogram",
            "Inference latency.",
            LABEL_NAMES,
            hist_labels,
            upper_bounds=BOUNDS,
            buckets=buckets,
            sums=sums,
        )
    )
    series = n_scalar * (len(COUNTERS) + len(GAUGES)) + n_hist
    return families, series, n_hist


class ReferenceCollector:
    """The same families through prometheus_client's MetricFamily objects, built per scrape."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for f in self._families:
            labels = f.label_names
            if f.kind == "histogram":
                assert f.buckets is not None
                assert f.sums is not None
                hist = HistogramMetricFamily(f.name, f.help, labels=labels)
                les = [*map(floatToGoString, f.upper_bounds), "+Inf"]
                cumulative = np.cumsum(f.buckets, axis=1).tolist()
                for values, row, total in zip(
                    f.label_values, cumulative, f.sums.tolist(), strict=True
                ):
                    hist.add_metric(values, list(zip(les, row, strict=True)), total)
                yield hist
                continue
            assert f.values is not None
            metric: CounterMetricFamily | GaugeMetricFamily
            if f.kind == "counter":
                metric = CounterMetricFamily(f.name, f.help, labels=labels)
            else:
                metric = GaugeMetricFamily(f.name, f.help, labels=labels)
            for values, value in zip(f.label_values, f.values.tolist(), strict=True):
                if value == value:  # NaN: left out, as ours does
                    metric.add_metric(values, value)
            yield metric


def rebuild(families: Sequence[Family]) -> list[Family]:
    """Fresh Family objects over the same arrays: a render constructs (and validates) them."""
    return [
        Family(
            f.name,
            f.kind,
            f.help,
            f.label_names,
            f.label_values,
            values=f.values,
            upper_bounds=f.upper_bounds,
            buckets=f.buckets,
            sums=f.sums,
        )
        for f in families
    ]


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall times of ``runs`` calls, in ms."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def fmt(times: list[float]) -> str:
    spread = f"(min {min(times):.1f}, max {max(times):.1f})"
    return f"median {statistics.median(times):8.1f} ms  {spread}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--series",
        type=int,
        default=100_000,
        help="target sample lines, each bucket line counted (default 100000)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    families, series, n_hist = make_data(args.series, args.seed)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReferenceCollector(families))

    cache = LabelCache()
    ours = render(rebuild(families), cache)  # warms the cache
    reference = generate_latest(registry)
    sample_lines = sum(1 for line in ours.splitlines() if not line.startswith(b"#"))
    print(
        f"families: {len(COUNTERS)} counters, {len(GAUGES)} gauges, 1 histogram "
        f"({len(BOUNDS)} bounds)"
    )
    print(f"series (family x label set): {series:,} ({n_hist:,} of them histograms)")
    print(f"sample lines (Prometheus series, each bucket one): {sample_lines:,}")
    print(f"payload: {len(ours) / 1e6:.1f} MB, identical to generate_latest: {ours == reference}")

    # Interleaved so both see the same background load.
    ref_times, warm_times, cold_times = [], [], []
    for _ in range(args.runs):
        ref_times += timed(lambda: generate_latest(registry), 1)
        warm_times += timed(lambda: render(rebuild(families), cache), 1)
        cold_times += timed(lambda: render(rebuild(families), LabelCache()), 1)
    gzip_times = timed(lambda: gzip.compress(ours, compresslevel=1, mtime=0), args.runs)
    gz_size = len(gzip.compress(ours, compresslevel=1, mtime=0))

    print(f"generate_latest (collect + render): {fmt(ref_times)}")
    print(f"render, warm LabelCache:            {fmt(warm_times)}")
    print(f"render, cold LabelCache:            {fmt(cold_times)}")
    print(f"gzip level 1 of the body:           {fmt(gzip_times)}  -> {gz_size / 1e6:.2f} MB")
    warm = statistics.median(warm_times)
    ref = statistics.median(ref_times)
    print(
        f"ratio generate_latest / render: {ref / warm:.1f}x warm, "
        f"{ref / statistics.median(cold_times):.1f}x cold"
    )
    print(f"render_ms={warm:.1f} sample_lines={sample_lines}")
    if args.series == 100_000:
        print(f"render_100k_ms={warm:.1f}")


if __name__ == "__main__":
    main()
