"""Quality metrics against scikit-learn, scipy, numpy and a port of Prometheus' Go code."""

from __future__ import annotations

import doctest
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.typing import NDArray
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    root_mean_squared_error,
)

from aggregator import quality, quantiles
from aggregator.quality import (
    ClassificationMetrics,
    calibration_errors,
    class_count_metrics,
    classification_metrics,
    estimated_accuracy,
    histogram_quantiles,
    jensen_shannon_distance,
    kolmogorov_smirnov_statistic,
    population_stability_index,
    regression_metrics,
    wasserstein_distance,
)

NAN = math.nan


def test_public_names_are_pinned() -> None:
    assert set(quality.__all__) == {
        "ClassificationMetrics",
        "SegmentMetrics",
        "calibration_errors",
        "class_count_metrics",
        "classification_metrics",
        "estimated_accuracy",
        "histogram_quantiles",
        "jensen_shannon_distance",
        "kolmogorov_smirnov_statistic",
        "population_stability_index",
        "regression_metrics",
        "wasserstein_distance",
    }


def test_docstring_examples_run() -> None:
    for module in (quality, quantiles):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0, module.__name__
        assert failed == 0, module.__name__


def test_moved_names_stay_importable_from_quality() -> None:
    assert quality.histogram_quantiles is quantiles.histogram_quantiles


# --- classification ---------------------------------------------------------------


@st.composite
def labelled(draw: st.DrawFn) -> tuple[int, list[int], list[int]]:
    """(n_classes, y_true, y_pred); small so classes often miss from one side."""
    n_classes = draw(st.integers(1, 5))
    n = draw(st.integers(1, 25))
    label = st.integers(0, n_classes - 1)
    y_true = draw(st.lists(label, min_size=n, max_size=n))
    y_pred = draw(st.lists(label, min_size=n, max_size=n))
    return n_classes, y_true, y_pred


def _confusion(n_classes: int, y_true: list[int], y_pred: list[int]) -> NDArray[np.int64]:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def _div(num: float, den: float) -> float:
    return num / den if den else NAN


def _assert_close(actual: object, expected: object) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=1e-12,
        atol=1e-12,
        equal_nan=True,
    )


BINARY_EDGE_CASES = [
    (2, [1], [1]),  # one sample, class 0 absent
    (2, [0, 0, 0], [1, 1, 1]),  # nothing right; class 1 never actual, 0 never predicted
    (2, [1, 1], [1, 1]),  # every event is class 1: its FPR is undefined
    (2, [0, 1, 1, 0], [0, 1, 0, 0]),
    (1, [0, 0], [0, 0]),  # a single class
    (4, [0, 1, 2], [2, 2, 2]),  # class 3 absent, 0 and 1 never predicted
]


@given(labelled())
@settings(max_examples=300)
@example(BINARY_EDGE_CASES[0])
@example(BINARY_EDGE_CASES[1])
@example(BINARY_EDGE_CASES[2])
@example(BINARY_EDGE_CASES[3])
@example(BINARY_EDGE_CASES[4])
@example(BINARY_EDGE_CASES[5])
def test_classification_matches_sklearn(case: tuple[int, list[int], list[int]]) -> None:
    n_classes, y_true, y_pred = case
    labels = list(range(n_classes))
    cm = _confusion(n_classes, y_true, y_pred)
    with warnings.catch_warnings():
        # With one class sklearn warns that labels= may be missing, though it is given.
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        np.testing.assert_array_equal(cm, confusion_matrix(y_true, y_pred, labels=labels))

    m = classification_metrics(cm)

    _assert_close(m.accuracy, accuracy_score(y_true, y_pred))

    present = sorted(set(y_true) | set(y_pred))
    np.testing.assert_array_equal(m.present, [c in present for c in labels])
    absent = [c for c in labels if c not in present]
    for per_class in (m.precision, m.recall, m.f1):
        assert np.isnan(per_class[absent]).all()

    # Per class where defined: sklearn's zero_division=nan marks the undefined ones.
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=present, average=None, zero_division=np.nan
    )
    _assert_close(m.precision[present], p)
    _assert_close(m.recall[present], r)
    _assert_close(m.f1[present], f)

    # Macro with sklearn's default zero_division, which warns where it scores 0.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        _assert_close(m.macro_precision, precision_score(y_true, y_pred, average="macro"))
        _assert_close(m.macro_recall, recall_score(y_true, y_pred, average="macro"))
        _assert_close(m.macro_f1, f1_score(y_true, y_pred, average="macro"))

    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    tn, fp, fn, tp = (mcm[:, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    fpr = [_div(fp[c], fp[c] + tn[c]) for c in labels]
    fnr = [_div(fn[c], fn[c] + tp[c]) for c in labels]
    _assert_close(m.false_positive_rate, fpr)
    _assert_close(m.false_negative_rate, fnr)

    def macro_skip(values: list[float]) -> float:
        defined = [values[c] for c in present if not math.isnan(values[c])]
        return sum(defined) / len(defined) if defined else NAN

    _assert_close(m.macro_false_positive_rate, macro_skip(fpr))
    _assert_close(m.macro_false_negative_rate, macro_skip(fnr))


def test_f1_of_a_never_predicted_class_is_zero_not_nan() -> None:
    m = classification_metrics([[0, 2], [0, 3]])  # class 0 actual twice, never predicted
    assert np.isnan(m.precision[0])
    assert m.recall[0] == 0.0
    assert m.f1[0] == 0.0
    assert m.macro_precision == pytest.approx((0.0 + 0.6) / 2)


def test_empty_confusion_is_all_nan() -> None:
    m = classification_metrics(np.zeros((3, 3), dtype=np.int64))
    assert not m.present.any()
    for name, value in m._asdict().items():
        if name != "present":
            assert np.isnan(value).all(), name


def test_only_present_classes_enter_the_macro_rates() -> None:
    # Class 2 is absent: its FPR is a defined 0 but must not dilute the mean.
    m = classification_metrics([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    assert m.false_positive_rate.tolist() == [0.5, 0.5, 0.0]
    assert m.macro_false_positive_rate == 0.5


@given(
    arrays(
        np.int64,
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)).map(
            lambda s: (s[0], s[1], s[2], s[2])
        ),
        elements=st.integers(0, 4),
    )
)
def test_classification_is_vectorised(stack: NDArray[np.int64]) -> None:
    stack[0, 0] = 0  # always include an empty window
    batched = classification_metrics(stack)
    n_classes = stack.shape[-1]
    for field in ClassificationMetrics._fields:
        expected_shape = stack.shape[:2] + ((n_classes,) if field in _PER_CLASS else ())
        assert getattr(batched, field).shape == expected_shape, field
    for index in np.ndindex(stack.shape[:2]):
        single = classification_metrics(stack[index])
        for field in ClassificationMetrics._fields:
            np.testing.assert_array_equal(getattr(batched, field)[index], getattr(single, field))


_PER_CLASS = {
    "precision",
    "recall",
    "f1",
    "false_positive_rate",
    "false_negative_rate",
    "present",
}


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.int64,
        st.tuples(st.integers(1, 3), st.integers(1, 5)).map(lambda s: (s[0], s[1], s[1])),
        elements=st.integers(0, 6),
    )
)
def test_class_counts_give_the_confusion_matrix_measures(stack: NDArray[np.int64]) -> None:
    """Row sums, column sums and the diagonal are all accuracy/precision/recall/F1 need:
    the per-segment counters give what the full matrix would."""
    full = classification_metrics(stack)
    counts = class_count_metrics(
        stack.sum(axis=-1), stack.sum(axis=-2), np.diagonal(stack, axis1=-2, axis2=-1)
    )
    for field in ("accuracy", "precision", "recall", "f1"):
        np.testing.assert_array_equal(getattr(counts, field), getattr(full, field), err_msg=field)


def test_class_counts_must_have_one_shape() -> None:
    with pytest.raises(ValueError, match="actual, predicted, correct"):
        class_count_metrics([1, 2], [1, 2], [1])


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 3, 4)])
def test_confusion_must_be_square(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="confusion"):
        classification_metrics(np.zeros(shape, dtype=np.int64))


# --- regression --------------------------------------------------------------------

_value = st.floats(-1e6, 1e6, allow_nan=False)


@given(st.lists(st.tuples(_value, _value), min_size=1, max_size=50))
def test_regression_matches_sklearn(pairs: list[tuple[float, float]]) -> None:
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    error = y_pred - y_true
    mae, rmse = regression_metrics(len(pairs), np.abs(error).sum(), np.square(error).sum())
    np.testing.assert_allclose(mae, mean_absolute_error(y_true, y_pred), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(rmse, root_mean_squared_error(y_true, y_pred), rtol=1e-9, atol=1e-9)


def test_regression_is_vectorised_and_nan_where_empty() -> None:
    count = np.array([[4, 0, 1], [0, 2, 5]])
    abs_sum = np.array([[6.0, 0.0, 3.0], [0.0, 2.0, 5.0]])
    sq_sum = np.array([[16.0, 0.0, 9.0], [0.0, 8.0, 5.0]])
    mae, rmse = regression_metrics(count, abs_sum, sq_sum)
    _assert_close(mae, [[1.5, NAN, 3.0], [NAN, 1.0, 1.0]])
    _assert_close(rmse, [[2.0, NAN, 3.0], [NAN, 2.0, 1.0]])


# --- histogram quantiles -------------------------------------------------------------


def _go_div(a: float, b: float) -> float:
    """Go's float64 division: no panic on 0, IEEE results instead."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return NAN
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _go_sort_search(n: int, f: Callable[[int], bool]) -> int:
    """Go's sort.Search: the smallest i in [0, n) with f(i), else n (binary search)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if not f(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _go_bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Port of Prometheus ``promql/quantile.go`` bucketQuantile (cumulative buckets)."""
    if math.isnan(q):
        return NAN
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets, key=lambda b: b[0])
    if not math.isinf(buckets[-1][0]):
        return NAN
    coalesced: list[list[float]] = []  # coalesceBuckets
    for upper, count in buckets:
        if coalesced and coalesced[-1][0] == upper:
            coalesced[-1][1] += count
        else:
            coalesced.append([upper, count])
    running = coalesced[0][1]  # ensureMonotonic
    for bucket in coalesced[1:]:
        running = max(running, bucket[1])
        bucket[1] = running
    if len(coalesced) < 2:
        return NAN
    observations = coalesced[-1][1]
    if observations == 0:
        return NAN
    rank = q * observations
    b = _go_sort_search(len(coalesced) - 1, lambda i: coalesced[i][1] >= rank)
    if b == len(coalesced) - 1:
        return coalesced[-2][0]
    if b == 0 and coalesced[0][0] <= 0:
        return coalesced[0][0]
    bucket_start = 0.0
    bucket_end = coalesced[b][0]
    count = coalesced[b][1]
    if b > 0:
        bucket_start = coalesced[b - 1][0]
        count -= coalesced[b - 1][1]
        rank -= coalesced[b - 1][1]
    return bucket_start + (bucket_end - bucket_start) * _go_div(rank, count)


def _go_quantiles(
    counts: Sequence[int], bounds: Sequence[float], qs: Sequence[float]
) -> list[float]:
    cumulative = np.cumsum(counts).tolist()
    pairs = [(float(u), float(c)) for u, c in zip([*bounds, math.inf], cumulative, strict=True)]
    return [_go_bucket_quantile(q, pairs) for q in qs]


@st.composite
def histograms(draw: st.DrawFn) -> tuple[NDArray[np.int64], list[float], list[float]]:
    """(counts [S, B + 1], upper bounds [B], quantiles) with edge cases likely."""
    bounds = [
        b / 4 for b in draw(st.lists(st.integers(-20, 40), max_size=6, unique=True).map(sorted))
    ]
    series = draw(st.integers(1, 4))
    counts = draw(
        arrays(np.int64, (series, len(bounds) + 1), elements=st.integers(0, 6) | st.just(0))
    )
    special = st.sampled_from([0.0, 1.0, 0.5, 0.25, -0.1, 1.5, NAN])
    qs = draw(st.lists(st.floats(0, 1) | special, min_size=1, max_size=6))
    return counts, bounds, qs


@given(histograms())
@settings(max_examples=300)
def test_quantiles_match_prometheus_go_algorithm(
    case: tuple[NDArray[np.int64], list[float], list[float]],
) -> None:
    counts, bounds, qs = case
    got = histogram_quantiles(counts, bounds, qs)
    assert got.shape == (counts.shape[0], len(qs))
    expected = [_go_quantiles(row.tolist(), bounds, qs) for row in counts]
    # Same operations in the same order: bit-for-bit equal, NaN and infinities included.
    np.testing.assert_array_equal(got, np.array(expected))


@pytest.mark.parametrize(
    ("counts", "bounds", "q", "expected"),
    [
        ([1, 2, 1, 0], [1.0, 2.0, 4.0], 0.5, 1.5),  # interpolated inside (1, 2]
        ([4, 0, 0, 0], [1.0, 2.0, 4.0], 0.5, 0.5),  # first bucket interpolates from 0
        ([4, 0, 0], [-1.0, 2.0], 0.5, -1.0),  # first bound <= 0 is returned as is
        ([1, 0, 0, 9], [1.0, 2.0, 4.0], 0.5, 4.0),  # +Inf bucket: highest finite bound
        ([0, 0, 0, 0], [1.0, 2.0, 4.0], 0.5, NAN),  # empty histogram
        ([3], [], 0.5, NAN),  # only the +Inf bucket
        ([0, 2, 0], [1.0, 2.0], 0.0, NAN),  # Go's 0/0 at q = 0 with an empty first bucket
        ([0, 2, 0], [0.0, 2.0], 0.0, 0.0),  # ...unless that bucket's bound is <= 0
        ([1, 2, 0], [1.0, 2.0], -0.5, -math.inf),
        ([1, 2, 0], [1.0, 2.0], 2.0, math.inf),
    ],
)
def test_quantile_special_cases(
    counts: list[int], bounds: list[float], q: float, expected: float
) -> None:
    got = histogram_quantiles(counts, bounds, [q])
    assert got.shape == (1,)
    np.testing.assert_array_equal(got[0], expected)
    np.testing.assert_array_equal(got, _go_quantiles(counts, bounds, [q]))


def test_quantiles_approximate_numpy_on_data_uniform_within_buckets() -> None:
    rng = np.random.default_rng(7)
    bounds = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    lower = np.concatenate([[0.0], bounds[:-1]])
    which = rng.choice(len(bounds), size=200_000, p=[0.1, 0.3, 0.3, 0.2, 0.1])
    # Uniform within each bucket is exactly what linear interpolation assumes.
    data = lower[which] + (bounds[which] - lower[which]) * (1.0 - rng.random(which.size))
    buckets = np.bincount(np.searchsorted(bounds, data, side="left"), minlength=len(bounds) + 1)
    assert buckets[-1] == 0
    qs = [0.05, 0.25, 0.5, 0.75, 0.9, 0.99]
    np.testing.assert_allclose(
        histogram_quantiles(buckets, bounds, qs), np.quantile(data, qs), rtol=0.01, atol=0.01
    )


def test_quantiles_are_vectorised_over_leading_axes() -> None:
    rng = np.random.default_rng(3)
    bounds = [0.1, 0.5, 1.0]
    counts = rng.integers(0, 5, size=(2, 3, 4))
    counts[1, 2] = 0
    qs = [0.5, 0.9, 0.99]
    got = histogram_quantiles(counts, bounds, qs)
    assert got.shape == (2, 3, 3)
    for index in np.ndindex(2, 3):
        np.testing.assert_array_equal(got[index], histogram_quantiles(counts[index], bounds, qs))
    assert np.isnan(got[1, 2]).all()


@pytest.mark.parametrize(
    ("counts", "bounds", "qs", "match"),
    [
        ([1, 1, 1], [2.0, 1.0], [0.5], "upper_bounds"),
        ([1, 1, 1], [1.0, 1.0], [0.5], "upper_bounds"),
        ([1, 1, 1], [1.0, math.inf], [0.5], "upper_bounds"),
        ([1, 1], [1.0, 2.0], [0.5], "buckets"),
        ([1, 1, 1], [1.0, 2.0], [[0.5]], "quantiles"),
    ],
)
def test_quantile_arguments_are_checked(
    counts: list[int], bounds: list[float], qs: list[float] | list[list[float]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        histogram_quantiles(counts, bounds, qs)


# --- drift -------------------------------------------------------------------------

_bins = st.shared(st.integers(1, 8), key="bins")
_histogram = _bins.flatmap(
    lambda k: st.lists(st.integers(0, 50), min_size=k, max_size=k).filter(any)
)


@given(_histogram)
def test_identical_or_proportional_histograms_do_not_drift(hist: list[int]) -> None:
    scaled = [3 * h for h in hist]
    assert population_stability_index(hist, scaled) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon_distance(hist, scaled) == pytest.approx(0.0, abs=1e-7)
    assert population_stability_index(hist, hist) == 0.0
    assert jensen_shannon_distance(hist, hist) == 0.0


def test_disjoint_histograms_are_at_js_distance_one() -> None:
    assert jensen_shannon_distance([5, 5, 0, 0], [0, 0, 1, 7]) == 1.0
    assert jensen_shannon_distance([1, 0], [0, 1]) == 1.0


@given(_histogram, _histogram)
def test_drift_is_symmetric_bounded_and_non_negative(ref: list[int], cur: list[int]) -> None:
    js = jensen_shannon_distance(ref, cur)
    assert 0.0 <= js <= 1.0
    assert js == pytest.approx(jensen_shannon_distance(cur, ref), abs=1e-12)
    psi = population_stability_index(ref, cur)
    assert psi >= 0.0
    assert np.isfinite(psi)
    assert psi == pytest.approx(population_stability_index(cur, ref), rel=1e-12)


@given(_histogram, _histogram)
def test_js_matches_scipy(ref: list[int], cur: list[int]) -> None:
    distance = pytest.importorskip("scipy.spatial.distance")
    expected = distance.jensenshannon(ref, cur, base=2)
    assert jensen_shannon_distance(ref, cur) == pytest.approx(expected, abs=1e-7)


def test_psi_hand_computed() -> None:
    # (0.25 - 0.5) ln(0.5) + (0.75 - 0.5) ln(1.5) = 0.25 ln 3
    assert population_stability_index([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(3))
    # An empty bin is floored at epsilon: finite, and dominated by that bin.
    eps = 1e-4
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - eps) * math.log(0.5 / eps)
    assert population_stability_index([4, 0], [2, 2], epsilon=eps) == pytest.approx(expected)


def test_drift_is_vectorised_and_nan_where_either_side_is_empty() -> None:
    ref = np.array([[[10, 0, 5], [0, 0, 0]], [[1, 2, 3], [4, 4, 4]]])
    cur = np.array([[[0, 0, 0], [1, 1, 1]], [[3, 2, 1], [4, 4, 4]]])
    for metric in (
        population_stability_index,
        jensen_shannon_distance,
        kolmogorov_smirnov_statistic,
        lambda r, c: wasserstein_distance(r, c, [0.0, 1.0, 3.0]),
    ):
        got = metric(ref, cur)
        assert got.shape == (2, 2)
        assert np.isnan(got[0]).all()
        for index in ((1, 0), (1, 1)):
            assert got[index] == metric(ref[index], cur[index])
        assert got[1, 1] == 0.0


def test_drift_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="bins"):
        jensen_shannon_distance([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="epsilon"):
        population_stability_index([1, 2], [1, 2], epsilon=0.0)
    with pytest.raises(ValueError, match="centers"):
        wasserstein_distance([1, 2], [1, 2], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="centers"):
        wasserstein_distance([1, 2], [1, 2], [1.0, 0.0])
    with pytest.raises(ValueError, match="counts"):
        calibration_errors([[1, 2]], [1.0, 2.0], 0.0)


# --- binned KS and Wasserstein-1 (oracles: scipy on the same binned data) ----------

_centers = _bins.flatmap(
    lambda k: st.lists(st.floats(-1e3, 1e3), min_size=k, max_size=k).map(sorted)
)


@given(_histogram, _histogram, _centers)
def test_wasserstein_matches_scipy_on_the_same_bins(
    ref: list[int], cur: list[int], centers: list[float]
) -> None:
    """W1 of the binned distributions (mass at bin centres) is scipy's, weights = counts."""
    stats = pytest.importorskip("scipy.stats")
    want = stats.wasserstein_distance(centers, centers, u_weights=ref, v_weights=cur)
    assert wasserstein_distance(ref, cur, centers) == pytest.approx(want, rel=1e-9, abs=1e-9)


def _scipy_binned_ks(ref: list[int], cur: list[int]) -> float:
    """max |CDF difference| of the two binned distributions, through scipy's rv_histogram.

    Bin i is [i, i + 1); evaluating each histogram's CDF at the upper edges gives the
    cumulative share of every bin, so the sup over the real line is the max over edges.
    """
    stats = pytest.importorskip("scipy.stats")
    edges = np.arange(len(ref) + 1, dtype=np.float64)
    f_ref = stats.rv_histogram((np.asarray(ref, float), edges), density=False).cdf(edges)
    f_cur = stats.rv_histogram((np.asarray(cur, float), edges), density=False).cdf(edges)
    return float(np.max(np.abs(f_ref - f_cur)))


@given(_histogram, _histogram)
def test_ks_matches_the_cdfs_of_the_same_bins(ref: list[int], cur: list[int]) -> None:
    want = _scipy_binned_ks(ref, cur)
    assert kolmogorov_smirnov_statistic(ref, cur) == pytest.approx(want, abs=1e-9)
    # The cumulative-sum form, independent of scipy.
    cdf = np.cumsum(cur) / sum(cur) - np.cumsum(ref) / sum(ref)
    assert kolmogorov_smirnov_statistic(ref, cur) == pytest.approx(np.abs(cdf).max(), abs=1e-12)


def test_binned_ks_equals_ks_2samp_when_each_bin_holds_one_value() -> None:
    """With every sample value on its own bin, the binned KS is the raw two-sample KS."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 20, 300), rng.integers(3, 25, 200)
    ref, cur = np.bincount(a, minlength=25), np.bincount(b, minlength=25)
    want = stats.ks_2samp(a, b).statistic
    assert kolmogorov_smirnov_statistic(ref, cur) == pytest.approx(want, abs=1e-12)
    assert wasserstein_distance(ref, cur, np.arange(25.0)) == pytest.approx(
        stats.wasserstein_distance(a, b), abs=1e-12
    )


@given(_histogram, _histogram)
def test_ks_and_wasserstein_are_symmetric_and_zero_on_the_same_shape(
    ref: list[int], cur: list[int]
) -> None:
    centers = np.arange(len(ref), dtype=np.float64) * 0.25
    ks = kolmogorov_smirnov_statistic(ref, cur)
    w1 = wasserstein_distance(ref, cur, centers)
    assert 0.0 <= ks <= 1.0 and w1 >= 0.0
    assert ks == pytest.approx(kolmogorov_smirnov_statistic(cur, ref), abs=1e-12)
    assert w1 == pytest.approx(wasserstein_distance(cur, ref, centers), abs=1e-12)
    scaled = [5 * h for h in ref]
    assert kolmogorov_smirnov_statistic(ref, scaled) == pytest.approx(0.0, abs=1e-12)
    assert wasserstein_distance(ref, scaled, centers) == pytest.approx(0.0, abs=1e-12)


# --- calibration (oracles: scikit-learn) -------------------------------------------


@settings(max_examples=50)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400))
def test_calibration_matches_sklearn(seed: int, n: int) -> None:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(seed)
    score = rng.random(n)
    score[: n // 10] = np.round(score[: n // 10], 1)  # values on the bin edges too
    correct = (rng.random(n) < score ** rng.uniform(0.5, 2)).astype(np.int64)
    edges = np.linspace(0.0, 1.0, 11)
    b = np.searchsorted(edges[1:-1], score)  # the reliability bins of the state
    counts = np.zeros((10, 2), dtype=np.int64)
    np.add.at(counts, (b, correct), 1)
    sums = np.bincount(b, weights=score, minlength=10)
    ece, brier = calibration_errors(counts, sums, float(np.sum((score - correct) ** 2)))

    if len(set(correct.tolist())) == 2:  # sklearn needs both classes present
        prob_true, prob_pred = calibration_curve(correct, score, n_bins=10)
        n_b = np.bincount(b, minlength=10)
        weights = n_b[n_b > 0] / n
        want = float(np.sum(weights * np.abs(prob_true - prob_pred)))
        assert ece == pytest.approx(want, abs=1e-9)
        assert counts[:, 1][n_b > 0] / n_b[n_b > 0] == pytest.approx(prob_true, abs=1e-12)
    assert brier == pytest.approx(brier_score_loss(correct, score), abs=1e-9)
    want_ece = sum(
        (b == k).sum() / n * abs(correct[b == k].mean() - score[b == k].mean())
        for k in range(10)
        if (b == k).any()
    )
    assert ece == pytest.approx(want_ece, abs=1e-9)
    assert estimated_accuracy(score.sum(), n) == pytest.approx(score.mean(), abs=1e-12)


def test_calibration_is_vectorised_and_nan_without_labels() -> None:
    counts = np.zeros((2, 3, 10, 2), dtype=np.int64)
    counts[1, 2, 9, 1] = 4  # four correct predictions at score 0.95
    sums = np.zeros((2, 3, 10))
    sums[1, 2, 9] = 3.8
    brier = np.zeros((2, 3))
    brier[1, 2] = 4 * 0.05**2
    ece, b = calibration_errors(counts, sums, brier)
    assert ece.shape == b.shape == (2, 3)
    assert np.isnan(ece[0]).all() and np.isnan(b[0]).all()
    assert ece[1, 2] == pytest.approx(0.05) and b[1, 2] == pytest.approx(0.0025)
