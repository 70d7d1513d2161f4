"""Gauges of the last closed window of each model version: quality, latency, drift."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregator.catalog import MACRO
from aggregator.durations import format_duration
from aggregator.metrics.columns import _cells, _Columns
from aggregator.metrics.specs import QUANTILES
from aggregator.quality import (
    calibration_errors,
    classification_metrics,
    estimated_accuracy,
    histogram_quantiles,
    jensen_shannon_distance,
    kolmogorov_smirnov_statistic,
    population_stability_index,
    regression_metrics,
    wasserstein_distance,
)
from aggregator.references import ReferenceUse
from aggregator.state import (
    DRIFT_CENTERS,
    MEASURES,
    StateConfig,
    StateView,
    WindowAggregate,
    score_bin_centers,
)


def _window_rows(
    v: StateView,
    w: WindowAggregate,
    config: StateConfig,
    mvl: Sequence[tuple[str, ...]],
    regression: np.ndarray,
    not_macro: np.ndarray,
    owners: np.ndarray,
    cols: _Columns,
    use: ReferenceUse,
) -> None:
    m = len(mvl)
    if not m or w.end_ms <= 0:  # no pane closed yet: no window to report
        return
    wl = format_duration(w.window_ms)
    wlab = [(*lab, wl) for lab in mvl]
    classification = ~regression
    cls_idx = np.flatnonzero(classification)
    reg_idx = np.flatnonzero(regression)
    total = w.outcome[:m].sum(axis=-1)
    cols.extend("model_window_predictions", wlab, total, owners)
    cols.extend("inference_throughput", wlab, total / (w.window_ms / 1000.0), owners)
    cols.extend("model_window_end_timestamp_seconds", wlab, w.end_ms / 1000.0, owners)
    lat_q = histogram_quantiles(w.lat[:m], config.latency_bounds, QUANTILES)
    for qi, q in enumerate(QUANTILES):
        cols.extend(
            "inference_latency_quantile_seconds",
            [(*x, repr(q)) for x in wlab],
            lat_q[:, qi],
            owners,
        )

    mae, rmse = regression_metrics(w.err[:m].sum(axis=-1), w.abs_err[:m], w.sq_err[:m])
    cols.extend("model_mae", [wlab[i] for i in reg_idx], mae[reg_idx], owners[reg_idx])
    cols.extend("model_rmse", [wlab[i] for i in reg_idx], rmse[reg_idx], owners[reg_idx])

    cm = classification_metrics(w.conf[:m])
    cols.extend("model_accuracy", [wlab[i] for i in cls_idx], cm.accuracy[cls_idx], owners[cls_idx])
    classes = [e[4] for e in v.entries]
    labels, (i, c) = _cells(mvl, classes, cm.present & classification[:, None] & not_macro, wl)
    macro_labels = [(*wlab[j], MACRO) for j in cls_idx]
    for fam, per, macro in (
        ("model_precision", cm.precision, cm.macro_precision),
        ("model_recall", cm.recall, cm.macro_recall),
        ("model_f1_score", cm.f1, cm.macro_f1),
        ("model_false_positive_rate", cm.false_positive_rate, cm.macro_false_positive_rate),
        ("model_false_negative_rate", cm.false_negative_rate, cm.macro_false_negative_rate),
    ):
        cols.extend(fam, labels, per[i, c], owners[i])
        cols.extend(fam, macro_labels, macro[cls_idx], owners[cls_idx])

    # Calibration and the label-free estimate (classification): see calibration_errors.
    ece, brier = calibration_errors(w.cal[:m], w.cal_score[:m], w.brier[:m])
    estimated = estimated_accuracy(w.est_sum[:m], w.est[:m])
    gap = estimated - cm.accuracy  # NaN (absent) while the window has no labelled row
    cls_labels = [wlab[i] for i in cls_idx]
    for fam, values in (
        ("model_expected_calibration_error", ece),
        ("model_brier_score", brier),
        ("model_estimated_accuracy", estimated),
        ("model_accuracy_gap", gap),
    ):
        cols.extend(fam, cls_labels, values[cls_idx], owners[cls_idx])
    _table_gauges(w, wlab, regression, owners, cols)

    reference = use.reference
    pred = use.prediction
    score_centers = score_bin_centers(config.score_bounds)
    for name, ref_hist, cur, which, centers in (
        ("score", reference["score"], w.score[:m], use.score, score_centers),
        # Classes have no order: KS and W1 would depend on the order names were seen.
        ("prediction", reference["pred_class"], w.pred_class[:m], pred & classification, None),
        ("prediction_value", reference["pred_hist"], w.pred_hist[:m], pred & regression,
         DRIFT_CENTERS),
    ):  # fmt: skip
        idx = np.flatnonzero(which)
        if not idx.size:
            continue
        r, c = ref_hist[idx], cur[idx]
        scores = [
            ("psi", population_stability_index(r, c)),
            ("js", jensen_shannon_distance(r, c)),
        ]
        if centers is not None:
            scores.append(("ks", kolmogorov_smirnov_statistic(r, c)))
            scores.append(("wasserstein", wasserstein_distance(r, c, centers)))
        for method, values in scores:
            labels = [(*wlab[j], name, method) for j in idx]
            cols.extend("model_drift_score", labels, values, owners[idx])
    features = [[f"feature:{n}" if n else "" for n in e[5]] for e in v.entries]
    named = np.array([[bool(n) for n in fs] for fs in features], dtype=bool).reshape(m, -1)
    mask = named & use.features
    if mask.any():
        r, c = reference["feat"], w.feat[:m]
        labels, (i, f) = _cells(mvl, features, mask, wl)
        for method, values in (
            ("psi", population_stability_index(r, c)),
            ("js", jensen_shannon_distance(r, c)),
            ("ks", kolmogorov_smirnov_statistic(r, c)),
            ("wasserstein", wasserstein_distance(r, c, DRIFT_CENTERS)),
        ):
            cols.extend(
                "model_drift_score", [(*x, method) for x in labels], values[i, f], owners[i]
            )


def _table_gauges(
    w: WindowAggregate,
    wlab: Sequence[tuple[str, ...]],
    regression: np.ndarray,
    owners: np.ndarray,
    cols: _Columns,
) -> None:
    """The measure table's windowed means (``Measure.gauge``): sum over the count of
    ``over``, for the model versions of its task that have rows in the window."""
    m = len(wlab)
    for measure in MEASURES:
        g = measure.gauge
        if g is None:
            continue
        num = w.sums[measure.name][:m].reshape(m, -1).sum(axis=1)
        den = w.sums[g.over][:m].reshape(m, -1).sum(axis=1)
        task = np.ones(m, dtype=bool)
        if g.task is not None:
            task = regression if g.task == "regression" else ~regression
        idx = np.flatnonzero(task & (den > 0))
        cols.extend(g.family, [wlab[i] for i in idx.tolist()], num[idx] / den[idx], owners[idx])
