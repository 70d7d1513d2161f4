"""Exposition against prometheus_client: its parser, and its generate_latest byte for byte."""

from __future__ import annotations

import dataclasses
import doctest
import gzip
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

import aggregator
from aggregator import exposition, label_cache, shard
from aggregator.catalog import MACRO, Limits
from aggregator.decode import Heartbeat, Marker, SchemaResolver, decode_batch
from aggregator.exposition import CONTENT_TYPE, Family, LabelCache, render, render_payload
from aggregator.join.joiner import JoinLimits
from aggregator.join.labels import LabelChunkBuilder
from aggregator.metrics import (
    DEAD_LETTER_REASONS,
    DROP_REASONS,
    FOLD_KINDS,
    ShardHealth,
    build_families,
)
from aggregator.state import PartitionState, StateConfig, StateView
from producer.encode import Row, encode_batch

NAN = math.nan
INF = math.inf
float_to_go_string: Callable[[float], str] = floatToGoString  # untyped upstream


class _Collector:
    """The same families as prometheus_client MetricFamily objects (NaN series left out)."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for f in self._families:
            if f.kind == "histogram":
                assert f.buckets is not None
                assert f.sums is not None
                hist = HistogramMetricFamily(f.name, f.help, labels=f.label_names)
                les = [*map(floatToGoString, f.upper_bounds), "+Inf"]
                for values, row, total in zip(
                    f.label_values, f.buckets.tolist(), f.sums.tolist(), strict=True
                ):
                    if not (math.isnan(total) or any(map(math.isnan, row))):
                        hist.add_metric(
                            values, list(zip(les, np.cumsum(row).tolist(), strict=True)), total
                        )
                yield hist
                continue
            assert f.values is not None
            cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            metric = cls(f.name, f.help, labels=f.label_names)
            for values, value in zip(f.label_values, f.values.tolist(), strict=True):
                if not math.isnan(value):
                    metric.add_metric(values, value)
            yield metric


def reference(families: Sequence[Family]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(families))
    return generate_latest(registry)


def samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a parsed exposition, keyed by name and labels."""
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def gauge(values: Sequence[float], labels: Sequence[tuple[str, ...]] | None = None) -> Family:
    labels = [(str(i),) for i in range(len(values))] if labels is None else labels
    return Family("g", "gauge", "G.", ("k",), labels, values=np.array(values, dtype=np.float64))


def small_family_set() -> list[Family]:
    tricky = [('quote " here', "back\\slash"), ("new\nline", "ünï©ødé ✓"), ("", "plain")]
    return [
        Family(
            "inference_predictions",
            "counter",
            "Predictions seen.\nSecond line with \\ backslash.",
            ("model", "class"),  # not sorted: the output sorts them
            tricky,
            values=np.array([0.0, 12.0, 1234567.0]),
        ),
        Family(
            "inference_accuracy_ratio",
            "gauge",
            "",
            ("zone", "app"),
            tricky,
            values=np.array([0.1, -2.5e-7, 1e300]),
        ),
        Family("up", "gauge", "Up.", (), [()], values=np.array([1.0])),
        Family(
            "inference_latency_seconds",
            "histogram",
            "Latency.",
            ("model", "a_first"),  # "le" sorts between them
            tricky,
            upper_bounds=[0.005, 0.1, 1.0, 2.5e6],
            buckets=np.array([[1, 2, 3, 4, 5], [0, 0, 0, 0, 0], [7, 0, 0, 0, 1]]),
            sums=np.array([12.5, 0.0, 3e7]),
        ),
    ]


def test_doctests() -> None:
    assert doctest.testmod(exposition).failed == 0


def test_label_cache_stays_importable_from_exposition() -> None:
    assert exposition.LabelCache is label_cache.LabelCache


def test_public_names() -> None:
    assert set(exposition.__all__) == {
        "CONTENT_TYPE",
        "Family",
        "Kind",
        "LabelCache",
        "Payload",
        "render",
        "render_payload",
    }


def test_content_type_is_text_0_0_4() -> None:
    assert CONTENT_TYPE == CONTENT_TYPE_PLAIN_0_0_4


def test_small_family_set_matches_generate_latest_byte_for_byte() -> None:
    families = small_family_set()
    assert render(families) == reference(families)


def test_shapes_of_lines() -> None:
    body = render(small_family_set()).decode()
    help_line = (
        "# HELP inference_predictions_total Predictions seen.\\nSecond line with \\\\ backslash.\n"
    )
    assert help_line in body
    assert "# TYPE inference_predictions_total counter\n" in body
    assert "# HELP inference_accuracy_ratio \n" in body
    assert "\nup 1.0\n" in body
    assert 'inference_predictions_total{class="back\\\\slash",model="quote \\" here"} 0.0\n' in body
    assert 'inference_predictions_total{class="plain",model=""} 1.234567e+06\n' in body
    assert 'inference_latency_seconds_bucket{a_first="plain",le="2.5e+06",model=""} 7.0\n' in body
    assert 'inference_latency_seconds_bucket{a_first="plain",le="+Inf",model=""} 8.0\n' in body


def test_empty_inputs() -> None:
    assert render([]) == b""
    empty = Family("g", "gauge", "G.", ("k",), [], values=np.empty(0))
    assert render([empty]) == b"# HELP g G.\n# TYPE g gauge\n" == reference([empty])


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.text(max_size=12), st.text(max_size=12)), min_size=1, max_size=20, unique=True
    ),
    data=st.data(),
)
def test_labels_and_values_round_trip(rows: list[tuple[str, str]], data: st.DataObject) -> None:
    numbers = st.one_of(
        st.floats(allow_nan=False),
        st.integers(-(10**17), 10**17).map(float),
        st.sampled_from([0.0, -0.0, 1e6, 999999.0, 1e16, 1e-300, 5e-324, -1e300]),
    )
    values = data.draw(st.lists(numbers, min_size=len(rows), max_size=len(rows)))
    families = [
        Family("c", "counter", "C.", ("b", "a"), rows, values=np.array(values)),
        Family("g", "gauge", "G \\ \n", ("a", "b"), rows, values=np.array(values)),
    ]
    body = render(families)
    assert body == reference(families)
    parsed = samples(body)
    for name, names in (("c_total", ("b", "a")), ("g", ("a", "b"))):
        for row, value in zip(rows, values, strict=True):
            assert parsed[(name, frozenset(zip(names, row, strict=True)))] == value


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False),
            st.integers(-(10**16), 10**17).map(float),
            st.floats(min_value=1e5, max_value=1e17),
        ),
        min_size=1,
        max_size=40,
    )
)
@example(values=[0.0, -0.0, 1.0, -1.0, 999999.0, 1e6, 1234567.0, 1.5e15, 1e16, 12345678.9])
@example(values=[INF, -INF, 5e-324, 1.7976931348623157e308, -1e16 + 2, 1e-7, 0.1])
def test_numbers_match_float_to_go_string(values: list[float]) -> None:
    # Mixed integral and fractional values exercise every formatting path in one family.
    lines = render([gauge(values)]).decode().splitlines()[2:]
    assert [line.rpartition(" ")[2] for line in lines] == [float_to_go_string(v) for v in values]


def test_nan_series_are_omitted() -> None:
    family = gauge([1.0, NAN, 3.0, NAN])
    body = render([family])
    assert samples(body) == {
        ("g", frozenset({("k", "0")})): 1.0,
        ("g", frozenset({("k", "2")})): 3.0,
    }
    assert body == reference([family])
    assert render([gauge([NAN])]) == b"# HELP g G.\n# TYPE g gauge\n"
    one_left = render([gauge([NAN, 2.0, NAN])]).decode()
    assert one_left.endswith('g{k="1"} 2.0\n')


def test_histogram_cumulative_buckets_count_and_sum() -> None:
    family = Family(
        "lat_seconds",
        "histogram",
        "Latency.",
        ("model",),
        [("a",), ("b",), ("gone",)],
        upper_bounds=(0.1, 1.0),
        buckets=np.array([[1, 2, 3], [0, 0, 4], [1, 1, 1]], dtype=np.int64),
        sums=np.array([7.25, 40.0, NAN]),
    )
    body = render([family])
    assert body == reference([family])
    got = samples(body)

    def bucket(model: str, le: str) -> float:
        return got[("lat_seconds_bucket", frozenset({("model", model), ("le", le)}))]

    assert [bucket("a", le) for le in ("0.1", "1.0", "+Inf")] == [1.0, 3.0, 6.0]
    assert [bucket("b", le) for le in ("0.1", "1.0", "+Inf")] == [0.0, 0.0, 4.0]
    assert got[("lat_seconds_count", frozenset({("model", "a")}))] == 6.0
    assert got[("lat_seconds_sum", frozenset({("model", "a")}))] == 7.25
    assert got[("lat_seconds_count", frozenset({("model", "b")}))] == 4.0
    assert not any(dict(labels).get("model") == "gone" for _, labels in got)
    assert len(got) == 2 * 5


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.tuples(st.text(max_size=8)), min_size=1, max_size=8, unique=True),
    bounds=st.lists(
        st.floats(min_value=0, max_value=1e12, allow_subnormal=False), max_size=6, unique=True
    ),
    data=st.data(),
)
def test_histograms_match_generate_latest(
    rows: list[tuple[str]], bounds: list[float], data: st.DataObject
) -> None:
    # Non-negative bounds: below zero prometheus_client drops _count and _sum (see below).
    n, width = len(rows), len(bounds) + 1
    counts = data.draw(st.lists(st.integers(0, 10**7), min_size=n * width, max_size=n * width))
    sums = data.draw(st.lists(st.floats(allow_nan=False), min_size=n, max_size=n))
    family = Family(
        "h_seconds",
        "histogram",
        "H.",
        ("model",),
        rows,
        upper_bounds=sorted(bounds),
        buckets=np.array(counts, dtype=np.int64).reshape(n, width),
        sums=np.array(sums),
    )
    assert render([family]) == reference([family])


def test_histogram_without_labels_and_with_negative_bounds() -> None:
    # prometheus_client drops _count and _sum below a negative first bound (an
    # OpenMetrics rule); format 0.0.4 wants them, so they are kept.
    family = Family(
        "err",
        "histogram",
        "Error.",
        (),
        [()],
        upper_bounds=(-1.0, 0.0, 1.0),
        buckets=np.array([[1.0, 2.0, 3.0, 4.0]]),
        sums=np.array([-0.5]),
    )
    assert render([family]).decode().splitlines()[2:] == [
        'err_bucket{le="-1.0"} 1.0',
        'err_bucket{le="0.0"} 3.0',
        'err_bucket{le="1.0"} 6.0',
        'err_bucket{le="+Inf"} 10.0',
        "err_count 10.0",
        "err_sum -0.5",
    ]


def test_label_cache_reuses_prefixes_and_sees_new_series() -> None:
    cache = LabelCache()
    first = [("a", "x"), ("b", "y")]
    family = Family("c", "counter", "C.", ("k", "j"), first, values=np.array([1.0, 2.0]))
    assert render([family], cache) == reference([family])
    assert len(cache) == 2
    moved = Family("c", "counter", "C.", ("k", "j"), first, values=np.array([5.0, 0.5]))
    assert render([moved], cache) == reference([moved])
    assert len(cache) == 2
    grown = [("c", "z"), *first]
    more = Family("c", "counter", "C.", ("k", "j"), grown, values=np.array([3.0, 1.0, 2.0]))
    assert render([more], cache) == reference([more])
    assert len(cache) == 3


def test_label_cache_stays_bounded() -> None:
    cache = LabelCache(max_entries=5)
    for start in range(0, 40, 4):
        rows = [(str(i),) for i in range(start, start + 4)]
        family = gauge([float(i) for i in range(4)], rows)
        assert render([family], cache) == reference([family])
        assert len(cache) <= 5
    with pytest.raises(ValueError, match="max_entries"):
        LabelCache(max_entries=0)


def test_label_cache_keeps_families_apart() -> None:
    rows = [("a",), ("b",)]
    families = [
        Family("x", "gauge", "X.", ("k",), rows, values=np.array([1.0, 2.0])),
        Family("x", "counter", "X.", ("k",), rows, values=np.array([3.0, 4.0])),
        Family("x", "histogram", "X.", ("k",), rows, None, (1.0,), np.ones((2, 2)), np.zeros(2)),
    ]
    cache = LabelCache()
    for _ in range(2):
        assert render(families, cache).decode().count("\n") == 3 * 2 + 2 + 2 + 2 * 4


def test_non_string_label_value_is_named() -> None:
    family = Family("g", "gauge", "G.", ("k",), [(1,)], values=np.array([1.0]))  # type: ignore[list-item]
    with pytest.raises(TypeError, match="label_values for 'k'"):
        render([family])


def test_integer_arrays_are_accepted() -> None:
    family = Family("g", "gauge", "G.", ("k",), [("a",)], values=np.array([3], dtype=np.int32))
    assert family.values is not None
    assert family.values.dtype == np.float64
    assert render([family]).endswith(b'g{k="a"} 3.0\n')


def test_render_payload_gzip() -> None:
    families = small_family_set()
    payload = render_payload(families)
    assert payload.body == render(families)
    assert payload.gzip_body is not None
    assert gzip.decompress(payload.gzip_body) == payload.body
    assert render_payload(families, gzip_level=None).gzip_body is None


_ROWS = [("a",), ("b",)]
_TWO = np.array([1.0, 2.0])


def _hist(bounds: tuple[float, ...], buckets: tuple[int, int], sums: int) -> dict[str, Any]:
    return {
        "kind": "histogram",
        "values": None,
        "upper_bounds": bounds,
        "buckets": np.ones(buckets),
        "sums": np.ones(sums),
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "9lives"}, ValueError, "name '9lives'"),
        ({"name": "bad-name"}, ValueError, "name 'bad-name'"),
        ({"name": "x_total", "kind": "counter"}, ValueError, "'_total' is appended"),
        ({"kind": "summary"}, ValueError, "kind 'summary'"),
        ({"help": None}, TypeError, "help"),
        ({"label_names": ["k"]}, TypeError, "label_names must be a tuple"),
        ({"label_names": ("k-1",)}, ValueError, "label_names has invalid 'k-1'"),
        ({"label_names": ("__k",)}, ValueError, "label_names has reserved '__k'"),
        ({"label_names": ("k", "k"), "label_values": [("a", "b")]}, ValueError, "duplicates"),
        ({"label_values": [("a",), ("b", "c")]}, ValueError, "label_values entries have lengths"),
        ({"values": np.ones(3)}, ValueError, r"values has shape \(3,\), expected \(2,\)"),
        ({"values": np.ones((2, 1))}, ValueError, "values has shape"),
        ({"values": [1.0, 2.0]}, TypeError, "values must be a numpy array"),
        ({"values": np.array(["a", "b"])}, ValueError, "values has dtype"),
        ({"values": None}, ValueError, "needs values"),
        ({"sums": _TWO}, ValueError, "for histograms only"),
        ({"kind": "histogram", "values": None, "label_names": ("le",)}, ValueError, "'le'"),
        ({"kind": "histogram"}, ValueError, "not values"),
        ({"kind": "histogram", "values": None}, ValueError, "needs buckets and sums"),
        (_hist((1.0, INF), (2, 3), 2), ValueError, "upper_bounds must be finite"),
        (_hist((1.0, 1.0), (2, 3), 2), ValueError, "upper_bounds must increase"),
        (_hist((1.0,), (2, 3), 2), ValueError, r"buckets has shape \(2, 3\), expected \(2, 2\)"),
        (_hist((1.0,), (2, 2), 3), ValueError, r"sums has shape \(3,\)"),
    ],
)
def test_invalid_families_name_the_field(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args = _valid_args()
    with pytest.raises(error, match=match):
        Family(**(args | kwargs))


def test_table_baselines_are_valid() -> None:
    # Each row above breaks one thing of these; they must be valid as they are.
    Family(**_valid_args())
    Family(**(_valid_args() | _hist((1.0,), (2, 2), 2)))
    bools = _hist((1.0,), (2, 2), 2) | {"buckets": np.ones((2, 2), dtype=bool)}
    Family(**(_valid_args() | bools))


def _valid_args() -> dict[str, Any]:
    return {
        "name": "x",
        "kind": "gauge",
        "help": "X.",
        "label_names": ("k",),
        "label_values": _ROWS,
        "values": _TWO,
    }


# --- build_families: what a shard exports --------------------------------------------

PANE_MS = 1000
SHARD_CONFIG = StateConfig(
    pane_ms=PANE_MS,
    windows_ms=(5000, 10_000),
    lateness_ms=2000,
    drift_reference_ms=5000,
    limits=Limits(max_models=4, max_classes=4, max_segments=3, max_features=3),
    join=JoinLimits(ttl_ms=600_000, wait_ms=5000, max_pending=10_000),
)
T0_MS = 1_700_000_000_000


def _partition_rows(seed: int, n: int) -> list[Row]:
    """Classifiers (one with more classes than the cap) and a regressor, every field."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        model = ["a", "b", "r", "wide"][i % 4]
        if model == "r":
            pred: Any = float(rng.normal())
            label: Any = float(rng.normal()) if i % 3 else None
        else:
            names = ["x", "y", "z", "u", "v", "w"] if model == "wide" else ["x", "y", "z"]
            pred = names[int(rng.integers(len(names)))]
            label = names[int(rng.integers(len(names)))] if i % 3 else None
        rows.append(
            Row(
                model,
                "v1",
                (T0_MS + i * 10 - (1500 if i % 50 == 7 else 0)) / 1000,  # some late
                float(rng.lognormal(-4, 1)),
                int(rng.choice([0, 0, 0, 1, 2])),
                pred,
                float(rng.random()),
                label,
                ["eu", "us", "apac", "latam"][i // 4 % 4],  # one segment past the cap
                {"f": float(rng.normal()), "g": float(i % 7), "h": 1.0, "k": 2.0},
                f"{seed}-{i}" if label is None else "",  # unlabelled: joined later
            )
        )
    return rows


def _heartbeat(offset: int, instance: str, t_ms: int, gpus: int = 1) -> Heartbeat:
    return Heartbeat(
        offset,
        {
            "event_time_ms": t_ms,
            "service": "svc",
            "instance": instance,
            "cpu_usage_ratio": 0.5,
            "memory_usage_bytes": 1 << 30,
            "disk_usage_ratio": 0.25,
            "gpus": [
                {"index": g, "utilization_ratio": g / max(gpus, 1), "memory_used_bytes": 1}
                for g in range(gpus)
            ],
        },
    )


def _partition_view(partition: int, seed: int = 1, n: int = 2000) -> StateView:
    """A partition with every kind of series: windows, drift, folds, late and bad input."""
    resolver = SchemaResolver()
    rows = _partition_rows(seed, n)
    items: list[Any] = []
    for start in range(0, n, 40):
        for model in ("a", "b", "r", "wide"):
            part = [r for r in rows[start : start + 40] if r.model == model]
            if part:
                record = resolver.read(encode_batch(part))[1]
                items.append(decode_batch(record, len(items)))
    items.append(_heartbeat(len(items), f"pod-{partition}", T0_MS + n * 10))
    state = PartitionState(SHARD_CONFIG, partition)
    offsets = np.arange(len(items), dtype=np.int64)
    state.ingest(items, offsets, np.full(len(items), 2 * T0_MS), len(items))
    # Late labels for a third of the unlabelled rows (and one for an unknown id), joined
    # in the last pane, which a marker then closes.
    labels = LabelChunkBuilder()
    for r in rows[::9]:
        if r.event_id and r.outcome == 0:
            label = r.prediction if isinstance(r.prediction, str) else 0.5
            labels.add({"event_id": r.event_id, "event_time_ms": T0_MS + n * 10,
                        "model": r.model, "label": label}, len(labels))  # fmt: skip
    labels.add({"event_id": "none", "event_time_ms": T0_MS, "model": "a", "label": "x"}, 10**6)
    state.ingest_labels(labels.build(), len(labels))
    end = len(items)
    state.ingest([Marker(end, T0_MS + n * 10 + 3500)], np.array([end]), np.array([2 * T0_MS]),
                 end + 1)  # fmt: skip
    state.count_rejected("undecodable")
    return state.view()


@pytest.fixture(scope="module")
def shard_views() -> list[StateView]:
    return [_partition_view(0, 1), _partition_view(1, 2)]


def _health(views: Sequence[StateView]) -> ShardHealth:
    return ShardHealth(
        lag={v.partition: 3 for v in views},
        snapshot_age_seconds={v.partition: 1.5 for v in views},
        batch_seconds_sum=0.25,
        batches=4,
        messages=400,
        dead_letter_messages=2,
        up_since=1_700_000_000.0,
    )


def _sample_lines(body: bytes) -> list[bytes]:
    return [line for line in body.splitlines() if line and not line.startswith(b"#")]


def _series_value(body: bytes, name: bytes) -> float:
    (line,) = [x for x in _sample_lines(body) if x.split(b" ")[0] == name]
    return float(line.split(b" ")[1])


def test_every_family_is_present_in_the_full_payload(shard_views: list[StateView]) -> None:
    """The fixture behind the promtool check really holds every family, with series."""
    families = build_families(shard_views, SHARD_CONFIG, _health(shard_views))
    empty = [f.name for f in families if not len(f.label_values)]
    assert not empty, f"families without series: {empty}"
    body = render(families)
    folded = {
        dict(k[1])["kind"]
        for k, v in samples(body).items()
        if k[0] == "modelpulse_folded_total" and v
    }
    assert {"class", "segment", "feature"} <= folded


def test_promtool_check_metrics_reports_nothing(shard_views: list[StateView]) -> None:
    """promtool's linter (naming, units, a ``quantile`` label only on summaries...)."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is not on PATH: run scripts/setup.sh (it installs Debian's "
            "'prometheus' package, promtool included)",
            pytrace=False,
        )
    body = render(build_families(shard_views, SHARD_CONFIG, _health(shard_views)))
    proc = subprocess.run(
        [exe, "check", "metrics"], input=body, capture_output=True, timeout=120, check=False
    )
    report = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0 and not report.strip(), report


def test_series_gauge_counts_every_sample_line(shard_views: list[StateView]) -> None:
    for max_series in (None, 10**6, 1500):
        body = render(
            build_families(shard_views, SHARD_CONFIG, _health(shard_views), max_series=max_series)
        )
        lines = len(_sample_lines(body))
        assert _series_value(body, b"modelpulse_series") == lines, max_series


def test_counters_with_known_labels_start_at_zero() -> None:
    view = _partition_view(3, 5, n=200)
    body = render(build_families([view], SHARD_CONFIG))
    got = samples(body)
    for reason in DEAD_LETTER_REASONS:
        key = (
            "modelpulse_dead_lettered_total",
            frozenset({("partition", "3"), ("reason", reason)}),
        )
        assert key in got, reason
    assert {"late", "invalid_latency", "unknown_schema", "bad_magic"} <= set(DEAD_LETTER_REASONS)
    for kind in FOLD_KINDS:
        key = ("modelpulse_folded_total", frozenset({("partition", "3"), ("kind", kind)}))
        assert key in got, kind
    assert got[("modelpulse_folded_total", frozenset({("partition", "3"), ("kind", "model")}))] == 0
    # A reason the list does not know (a newer decoder's) is exported as well.
    odd = dataclasses.replace(view, rejected={**view.rejected, "brand_new": 2})
    got = samples(render(build_families([odd], SHARD_CONFIG)))
    labels = frozenset({("partition", "3"), ("reason", "brand_new")})
    assert got[("modelpulse_dead_lettered_total", labels)] == 2


def test_confusion_cells_of_known_classes_start_at_zero() -> None:
    """Every (actual, predicted) pair of a version's known classes is exported, zeros
    included: a cell first seen at 1 hides that count from increase()."""
    resolver = SchemaResolver()
    rows = [
        Row("m", "v1", T0_MS / 1000 + i, 0.01, 0, "x", 0.9, "x" if i else "y", None, None, "")
        for i in range(3)
    ]
    state = PartitionState(SHARD_CONFIG, 0)
    state.ingest(
        [decode_batch(resolver.read(encode_batch(rows))[1], 0)],
        np.arange(1),
        np.full(1, 2 * T0_MS),
        1,
    )
    state.ingest([Marker(1, T0_MS + 60_000)], np.arange(1, 2), np.full(1, 2 * T0_MS), 2)
    got = samples(render(build_families([state.view()], SHARD_CONFIG)))
    cells = {
        (dict(labels)["actual"], dict(labels)["predicted"]): v
        for (name, labels), v in got.items()
        if name == "model_confusion_total"
    }
    assert cells == {("x", "x"): 2, ("y", "x"): 1, ("x", "y"): 0, ("y", "y"): 0}


def test_every_dead_letter_reason_in_the_code_is_known_up_front() -> None:
    """A reason raised somewhere but missing from the list would start without a 0."""
    root = Path(aggregator.__file__).parent
    raised = {
        m.group(1)
        for path in root.glob("*.py")
        for m in re.finditer(r'DecodeError\(\s*"(\w+)"', path.read_text(encoding="utf-8"))
    }
    raised |= set(shard._UNREADABLE.values())
    assert raised and not raised - set(DEAD_LETTER_REASONS), raised - set(DEAD_LETTER_REASONS)


def _adversarial(views: list[StateView], case: str) -> list[StateView]:
    """Views that would export one labelset twice if the builder trusted them."""
    a, b = views
    beat = _heartbeat(0, "pod-x", T0_MS).record
    if case == "same_partition_twice":  # e.g. a view left over from before a rebalance
        return [dataclasses.replace(a, next_offset=a.next_offset - 1), a, b]
    if case == "instance_on_two_partitions":
        newer = {**beat, "event_time_ms": T0_MS + 5000, "cpu_usage_ratio": 0.75}
        a = dataclasses.replace(a, resources=[*a.resources, beat])
        return [a, dataclasses.replace(b, resources=[*b.resources, newer])]
    if case == "gpu_listed_twice":
        gpus = [*beat["gpus"], {**beat["gpus"][0], "utilization_ratio": 0.9}]
        return [dataclasses.replace(a, resources=[{**beat, "gpus": gpus}]), b]
    assert case == "class_named_macro"  # next to the macro average of its model
    i = next(k for k, e in enumerate(a.entries) if not e[2] and "x" in e[4])
    entries = list(a.entries)
    classes = [MACRO if c == "x" else c for c in entries[i][4]]
    entries[i] = (*entries[i][:4], classes, *entries[i][5:])
    return [dataclasses.replace(a, entries=entries), b]


@pytest.mark.parametrize(
    "case",
    ["same_partition_twice", "instance_on_two_partitions", "gpu_listed_twice", "class_named_macro"],
)
def test_no_duplicate_series_from_adversarial_views(
    shard_views: list[StateView], case: str
) -> None:
    views = _adversarial(shard_views, case)
    families = build_families(views, SHARD_CONFIG, _health(views))
    for f in families:
        assert len(set(f.label_values)) == len(f.label_values), f.name
    body = render(families)
    got = samples(body)  # asserts no sample twice
    assert _series_value(body, b"modelpulse_partitions_owned") == 2
    pod_x = {k[0]: v for k, v in got.items() if ("instance", "pod-x") in k[1]}
    if case == "instance_on_two_partitions":
        assert pod_x["inference_cpu_usage_ratio"] == 0.75  # the newest heartbeat wins
    if case == "gpu_listed_twice":
        assert pod_x["inference_gpu_usage_ratio"] == 0.0  # the first entry wins
    if case == "class_named_macro":
        macro = [k for k in got if k[0] == "model_precision" and ("class", MACRO) in k[1]]
        assert macro  # the average keeps its label; the lookalike class is left out


@pytest.mark.parametrize("partitions", [1, 3, 6])
def test_max_series_caps_the_whole_shard(partitions: int) -> None:
    views = [_partition_view(p, p + 1, n=600) for p in range(partitions)]
    health = _health(views)
    full = render(build_families(views, SHARD_CONFIG, health))
    total = len(_sample_lines(full))
    for max_series in (1000, total // 2, total - 1, total, total + 50):
        body = render(build_families(views, SHARD_CONFIG, health, max_series=max_series))
        lines = _sample_lines(body)
        assert len(lines) <= max_series, (partitions, max_series)
        dropped = samples(body)
        by_reason = {
            dict(k[1])["reason"]: v
            for k, v in dropped.items()
            if k[0] == "modelpulse_series_dropped"
        }
        assert set(by_reason) == set(DROP_REASONS)
        if max_series >= total:
            assert sum(by_reason.values()) == 0 and len(lines) == total
        else:
            assert sum(by_reason.values()) > 0
            # The lines left out plus the ones shown are the whole render.
            assert len(lines) + sum(by_reason.values()) == total


def test_max_series_leaves_out_whole_units_newest_first() -> None:
    views = [_partition_view(p, p + 1, n=600) for p in range(3)]
    full = samples(render(build_families(views, SHARD_CONFIG)))
    shown_all = {
        (dict(k[1])["model"], dict(k[1])["partition"]) for k in full if k[0] == "model_info"
    }
    first_seen = {
        (e[0], str(v.partition)): (e[3], v.partition, i)
        for v in views
        for i, e in enumerate(v.entries)
    }
    assert shown_all == set(first_seen)
    limit = len(_sample_lines(render(build_families(views, SHARD_CONFIG)))) // 2
    capped = samples(render(build_families(views, SHARD_CONFIG, max_series=limit)))
    shown = {(dict(k[1])["model"], dict(k[1])["partition"]) for k in capped if k[0] == "model_info"}
    assert 0 < len(shown) < len(shown_all)
    order = sorted(first_seen, key=first_seen.__getitem__)
    assert set(order[: len(shown)]) == shown  # the oldest ones stay
    # Whole units: every series of a shown model version is there, none of a hidden one.
    for key, value in full.items():
        labels = dict(key[1])
        if "model" in labels:
            unit = (labels["model"], labels["partition"])
            assert (key in capped) == (unit in shown), key
            if key in capped:
                assert capped[key] == value
    # The shard's own health is never left out.
    for key in full:
        if key[0].startswith("modelpulse_") and key[0] != "modelpulse_series":
            if (
                key[0] in ("modelpulse_dead_lettered_total", "modelpulse_folded_total")
                and not full[key]
            ):
                continue
            assert key in capped, key


def test_resource_instances_count_against_the_cap() -> None:
    view = _partition_view(0, 1, n=200)
    beats = [_heartbeat(0, f"pod-{i:03d}", T0_MS, gpus=64).record for i in range(40)]
    view = dataclasses.replace(view, resources=beats)
    body = render(build_families([view], SHARD_CONFIG, max_series=1500))
    got = samples(body)
    assert len(_sample_lines(body)) <= 1500
    shown = sorted({dict(k[1])["instance"] for k in got if k[0] == "inference_gpu_usage_ratio"})
    assert shown and shown == [f"pod-{i:03d}" for i in range(len(shown))] and len(shown) < 40
    dropped = got[("modelpulse_series_dropped", frozenset({("reason", "resource_instance")}))]
    assert dropped == (40 - len(shown)) * (3 + 64)
    assert got[("modelpulse_series_dropped", frozenset({("reason", "model_version")}))] == 0


def test_latency_quantile_label_is_q(shard_views: list[StateView]) -> None:
    (fam,) = [
        f
        for f in build_families(shard_views, SHARD_CONFIG)
        if f.name == "inference_latency_quantile_seconds"
    ]
    assert fam.label_names[-1] == "q" and "quantile" not in fam.label_names
    assert {lv[-1] for lv in fam.label_values} == {"0.5", "0.9", "0.99"}
