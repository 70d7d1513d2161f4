"""Exposition against prometheus_client: its parser, and its generate_latest byte for byte."""

from __future__ import annotations

import doctest
import gzip
import math
from collections.abc import Callable, Iterator, Sequence
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

from aggregator import exposition
from aggregator.exposition import CONTENT_TYPE, Family, LabelCache, render, render_payload

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
