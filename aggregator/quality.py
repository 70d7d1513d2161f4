"""Window aggregates -> model-quality numbers (pure numpy, no I/O).

Every function takes additive aggregates (confusion counts, error sums, bucket
counts) and is vectorised over any leading "series" axes, e.g. ``[models, windows]``.
An undefined value (a zero denominator) is NaN, so the exporter can leave that
series out rather than publish a made-up 0 or 1. No numpy warning escapes.
``histogram_quantiles`` lives in quantiles.py and is re-exported here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from aggregator.quantiles import histogram_quantiles

__all__ = [
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
]

_F8 = NDArray[np.float64]


class ClassificationMetrics(NamedTuple):
    """Quality of one or more confusion matrices; leading axes are the series axes.

    Per-class fields (last axis ``C``) are one-vs-rest and NaN where their
    denominator is 0. Macro fields average over ``present`` classes only and are
    NaN when no class is present.
    """

    accuracy: _F8
    precision: _F8
    recall: _F8
    f1: _F8
    false_positive_rate: _F8
    false_negative_rate: _F8
    present: NDArray[np.bool_]
    macro_precision: _F8
    macro_recall: _F8
    macro_f1: _F8
    macro_false_positive_rate: _F8
    macro_false_negative_rate: _F8


def _ratio(numerator: ArrayLike, denominator: ArrayLike) -> _F8:
    """``numerator / denominator`` as float64, NaN where the denominator is 0."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    # ``where=`` skips the zero denominators instead of computing and hiding 0/0.
    np.divide(num, den, out=out, where=den != 0)
    return out


def classification_metrics(confusion: ArrayLike) -> ClassificationMetrics:
    """Accuracy and one-vs-rest rates of ``confusion[..., actual, predicted]`` counts.

    ``f1`` is ``2 TP / (2 TP + FP + FN)``, scikit-learn's formula, so a present
    class that is never predicted has f1 0 although its precision is NaN.
    ``macro_precision``, ``macro_recall`` and ``macro_f1`` equal scikit-learn's
    ``average="macro"`` with the default ``zero_division``: the mean over the
    present classes (those with a non-zero row or column), an undefined class
    value counting as 0. ``macro_false_positive_rate`` and
    ``macro_false_negative_rate`` instead skip undefined class values: the mean
    over present classes where the rate is defined, NaN if there is none.

    >>> m = classification_metrics([[3, 1], [0, 4]])
    >>> float(m.accuracy), m.recall.tolist(), float(m.macro_f1)
    (0.875, [0.75, 1.0], 0.873015873015873)
    """
    counts = np.asarray(confusion)
    if counts.ndim < 2 or counts.shape[-1] != counts.shape[-2]:
        raise ValueError(f"confusion must have shape [..., C, C], got {counts.shape}")
    cm = counts.astype(np.float64)

    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    actual = cm.sum(axis=-1)  # row sums: events whose actual class is c
    predicted = cm.sum(axis=-2)  # column sums: events predicted as c
    total = actual.sum(axis=-1)
    fp = predicted - tp
    fn = actual - tp
    negatives = total[..., None] - actual  # FP + TN: events whose actual class is not c

    precision = _ratio(tp, predicted)
    recall = _ratio(tp, actual)
    f1 = _ratio(2.0 * tp, 2.0 * tp + fp + fn)
    fpr = _ratio(fp, negatives)
    fnr = _ratio(fn, actual)
    present = (actual > 0) | (predicted > 0)
    n_present = present.sum(axis=-1)

    def macro_zero(values: _F8) -> _F8:
        # scikit-learn's default zero_division scores an undefined class as 0.
        return _ratio(np.where(present & ~np.isnan(values), values, 0.0).sum(axis=-1), n_present)

    def macro_skip(values: _F8) -> _F8:
        defined = present & ~np.isnan(values)
        return _ratio(np.where(defined, values, 0.0).sum(axis=-1), defined.sum(axis=-1))

    return ClassificationMetrics(
        accuracy=_ratio(tp.sum(axis=-1), total),
        precision=precision,
        recall=recall,
        f1=f1,
        false_positive_rate=fpr,
        false_negative_rate=fnr,
        present=present,
        macro_precision=macro_zero(precision),
        macro_recall=macro_zero(recall),
        macro_f1=macro_zero(f1),
        macro_false_positive_rate=macro_skip(fpr),
        macro_false_negative_rate=macro_skip(fnr),
    )


class SegmentMetrics(NamedTuple):
    """Quality from per-class counts (see ``class_count_metrics``); NaN where undefined."""

    accuracy: _F8
    precision: _F8
    recall: _F8
    f1: _F8


def class_count_metrics(
    actual: ArrayLike, predicted: ArrayLike, correct: ArrayLike
) -> SegmentMetrics:
    """Accuracy and one-vs-rest precision/recall/F1 from three per-class counts.

    ``actual[..., c]`` counts labelled rows of class c, ``predicted[..., c]`` rows
    predicted as c, ``correct[..., c]`` rows both (the diagonal of the confusion
    matrix): the row sums, column sums and diagonal of ``classification_metrics``'
    matrix, which is all these four measures need. So per segment only 3 x C counts
    are kept and exported instead of C x C, and the recording rules compute the same
    numbers from the counters (prometheus/rules/recording.yml).

    >>> m = class_count_metrics([[2, 1]], [[1, 2]], [[1, 1]])
    >>> m.accuracy.tolist(), m.precision.tolist(), m.f1.tolist()
    ([0.6666666666666666], [[1.0, 0.5]], [[0.6666666666666666, 0.6666666666666666]])
    """
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    tp = np.asarray(correct, dtype=np.float64)
    if not a.shape == p.shape == tp.shape:
        raise ValueError(
            f"actual, predicted, correct: shapes {a.shape}, {p.shape}, {tp.shape} differ"
        )
    return SegmentMetrics(
        accuracy=_ratio(tp.sum(axis=-1), a.sum(axis=-1)),
        precision=_ratio(tp, p),
        recall=_ratio(tp, a),
        f1=_ratio(2 * tp, a + p),
    )


def regression_metrics(
    count: ArrayLike, abs_error_sum: ArrayLike, squared_error_sum: ArrayLike
) -> tuple[_F8, _F8]:
    """``(mae, rmse)`` from per-series counts and error sums; NaN where count is 0.

    >>> mae, rmse = regression_metrics([4, 0], [6.0, 0.0], [16.0, 0.0])
    >>> mae.tolist(), rmse.tolist()
    ([1.5, nan], [2.0, nan])
    """
    mae = _ratio(abs_error_sum, count)
    # sqrt(NaN) is NaN without a warning; only negative inputs would warn.
    rmse = np.sqrt(_ratio(squared_error_sum, count))
    return mae, rmse


def _distributions(reference: ArrayLike, current: ArrayLike) -> tuple[_F8, _F8, NDArray[np.bool_]]:
    """Both histograms as proportions, and where either one is empty."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.ndim < 1 or ref.shape[-1] != cur.shape[-1]:
        raise ValueError(
            f"reference and current must have the same number of bins, got {ref.shape}"
            f" and {cur.shape}"
        )
    ref_total = ref.sum(axis=-1, keepdims=True)
    cur_total = cur.sum(axis=-1, keepdims=True)
    empty = (ref_total[..., 0] == 0) | (cur_total[..., 0] == 0)
    return _ratio(ref, ref_total), _ratio(cur, cur_total), empty


def population_stability_index(
    reference: ArrayLike, current: ArrayLike, epsilon: float = 1e-6
) -> _F8:
    """PSI ``sum((c - r) * ln(c / r))`` of two count histograms ``[..., K]``.

    Proportions below ``epsilon`` are raised to ``epsilon`` (not renormalised), so
    a bin empty on one side adds a large finite term instead of ``inf``; bins
    above ``epsilon`` on both sides are exact. NaN where either histogram is empty.

    >>> round(float(population_stability_index([50, 50], [25, 75])), 6)  # ln(3) / 4
    0.274653
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    ref, cur, empty = _distributions(reference, current)
    ref = np.maximum(ref, epsilon)
    cur = np.maximum(cur, epsilon)
    # Empty histograms gave NaN proportions; silence their NaN arithmetic.
    with np.errstate(invalid="ignore"):
        psi = ((cur - ref) * np.log(cur / ref)).sum(axis=-1)
    return np.where(empty, np.nan, psi)


def jensen_shannon_distance(reference: ArrayLike, current: ArrayLike) -> _F8:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two count histograms ``[..., K]``.

    The square root of the JS divergence, as ``scipy.spatial.distance.jensenshannon(
    reference, current, base=2)`` computes it, clipped to [0, 1] against rounding.
    NaN where either histogram is empty.

    >>> float(jensen_shannon_distance([1, 0], [0, 1]))
    1.0
    """
    ref, cur, empty = _distributions(reference, current)
    mid = (ref + cur) / 2.0

    def rel_entr(p: _F8) -> _F8:
        # p * ln(p / m) with 0 * ln(0 / m) = 0; m >= p / 2 > 0 wherever p > 0, and
        # the ratio 1 elsewhere keeps 0/0 out of the computation.
        ratio = np.ones_like(p)
        np.divide(p, mid, out=ratio, where=p > 0)
        return p * np.log(ratio)

    divergence = (rel_entr(ref).sum(axis=-1) + rel_entr(cur).sum(axis=-1)) / math.log(2.0)
    # Rounding can push the divergence a hair outside [0, 2]; NaN (empty) passes through.
    distance = np.sqrt(np.clip(divergence / 2.0, 0.0, 1.0))
    return np.where(empty, np.nan, distance)


def kolmogorov_smirnov_statistic(reference: ArrayLike, current: ArrayLike) -> _F8:
    """Binned Kolmogorov-Smirnov statistic of two count histograms ``[..., K]``.

    ``max |CDF_current - CDF_reference|`` over the upper edges of the bins: the two-sample
    KS statistic of the binned data, which never exceeds the statistic of the raw values
    (values that share a bin cannot be told apart). The bins must be ordered (a value
    axis); for unordered categories the result depends on their order. In [0, 1]; NaN
    where either histogram is empty.

    >>> float(kolmogorov_smirnov_statistic([2, 2, 0], [0, 2, 2]))
    0.5
    """
    ref, cur, empty = _distributions(reference, current)
    if ref.shape[-1] == 0:
        raise ValueError("reference and current must have at least one bin")
    # Empty histograms gave NaN proportions; the result is replaced below.
    with np.errstate(invalid="ignore"):
        gap = np.abs(np.cumsum(cur - ref, axis=-1)).max(axis=-1)
    return np.where(empty, np.nan, np.minimum(gap, 1.0))


def wasserstein_distance(reference: ArrayLike, current: ArrayLike, centers: ArrayLike) -> _F8:
    """Wasserstein-1 distance of two count histograms ``[..., K]``, each bin's mass at its
    centre.

    ``sum_i |CDF_current(i) - CDF_reference(i)| * (centers[i + 1] - centers[i])``: exactly
    ``scipy.stats.wasserstein_distance(centers, centers, reference, current)``, in the
    units of ``centers`` (with equal-width bins, the spacing is the bin width). NaN where
    either histogram is empty.

    >>> float(wasserstein_distance([1, 0, 0], [0, 0, 1], [0.5, 1.5, 2.5]))
    2.0
    """
    c = np.asarray(centers, dtype=np.float64)
    if c.ndim != 1 or not np.all(np.isfinite(c)) or np.any(np.diff(c) < 0):
        raise ValueError("centers must be a 1-D array of finite, non-decreasing values")
    ref, cur, empty = _distributions(reference, current)
    if ref.shape[-1] != c.shape[0]:
        raise ValueError(f"centers must have one value per bin ({ref.shape[-1]}), got {c.shape}")
    with np.errstate(invalid="ignore"):
        gap = np.abs(np.cumsum(cur - ref, axis=-1)[..., :-1])
        distance = (gap * np.diff(c)).sum(axis=-1)
    return np.where(empty, np.nan, distance)


def calibration_errors(
    counts: ArrayLike, score_sums: ArrayLike, squared_error_sums: ArrayLike
) -> tuple[_F8, _F8]:
    """``(expected calibration error, Brier score)`` from reliability bins.

    ``counts[..., B, 2]`` are the labelled predictions per score bin, incorrect (0) and
    correct (1); ``score_sums[..., B]`` the sum of their scores per bin and
    ``squared_error_sums[...]`` the sum of ``(score - correct)^2`` over them. ECE is
    ``sum_b n_b / N * |accuracy_b - mean score_b|`` (= ``sum_b |correct_b - score_sum_b|
    / N``); Brier is the mean squared error, as ``sklearn.metrics.brier_score_loss(correct,
    score)``. Both NaN where ``N`` is 0.

    >>> ece, brier = calibration_errors([[[1, 1], [0, 2]]], [[1.0, 1.8]], [0.9])
    >>> round(float(ece[0]), 6), round(float(brier[0]), 6)
    (0.05, 0.225)
    """
    n = np.asarray(counts, dtype=np.float64)
    s = np.asarray(score_sums, dtype=np.float64)
    if n.ndim < 2 or n.shape[-1] != 2 or n.shape[:-1] != s.shape:
        raise ValueError(
            f"counts must have shape [..., B, 2] and score_sums [..., B], got {n.shape}"
            f" and {s.shape}"
        )
    total = n.sum(axis=(-2, -1))
    ece = _ratio(np.abs(n[..., 1] - s).sum(axis=-1), total)
    return ece, _ratio(squared_error_sums, total)


def estimated_accuracy(score_sums: ArrayLike, counts: ArrayLike) -> _F8:
    """Mean score of predictions: the accuracy a calibrated model implies, without labels.

    With ``score`` the probability of the predicted class, a calibrated model is right
    with that probability, so the mean score is its expected accuracy. For a model that
    is not calibrated (most are not) it is only that: compare it with the realised
    accuracy once labels arrive. NaN where ``counts`` is 0.

    >>> estimated_accuracy([3.0, 0.0], [4, 0]).tolist()
    [0.75, nan]
    """
    return _ratio(score_sums, counts)
