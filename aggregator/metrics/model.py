"""Series of each model version: cumulative counters, histograms and segments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.catalog import MACRO
from aggregator.metrics.columns import _cells, _Columns, _mv_labels
from aggregator.metrics.specs import _VALID, CALIBRATION_BIN_LABELS
from aggregator.metrics.window import _window_rows
from aggregator.references import TrainingReference, resolve_references
from aggregator.state import SEGMENT_ROLES, StateConfig, StateView


def _model_rows(
    v: StateView,
    config: StateConfig,
    owners: np.ndarray,
    cols: _Columns,
    references: Mapping[tuple[str, str], TrainingReference] | None = None,
) -> None:
    """Series of each model version of ``v``, owned by its unit in ``owners``."""
    mvl = _mv_labels(v)
    if not mvl:
        return
    use = resolve_references(v, config, references or {})
    with_ref = [i for i, src in enumerate(use.source) if src]
    cols.extend(
        "model_drift_reference_info",
        [(*mvl[i], use.source[i]) for i in with_ref],
        1.0,
        owners[with_ref],
    )
    cum = v.cum
    regression = np.array([e[2] for e in v.entries], dtype=bool)
    classes = [e[4] for e in v.entries]
    out = cum["outcome"]
    for code, name in enumerate(_VALID):
        by_outcome = [(*lab, name) for lab in mvl]
        cols.extend("inference_predictions", by_outcome, out[:, code], owners)
        if code:
            cols.extend("inference_errors", by_outcome, out[:, code], owners)
    # Labelled: given inline, or joined later by event id (counted when joined).
    cols.extend("model_labeled_predictions", mvl, cum["labelled"] + cum["joined"], owners)
    cols.extend("model_unlabeled_predictions", mvl, out[:, 0] - cum["labelled"], owners)
    cols.extend(
        "model_info",
        [
            (*lab, "regression" if r else "classification")
            for lab, r in zip(mvl, regression, strict=True)
        ],
        1.0,
        owners,
    )
    cols.extend("model_update_time_seconds", mvl, [e[3] / 1000.0 for e in v.entries], owners)
    cols.histogram("inference_latency_seconds", mvl, cum["lat"], cum["lat_sum"], owners)
    has_score = np.flatnonzero(cum["score"].sum(axis=1) > 0)
    cols.histogram(
        "model_prediction_score",
        [mvl[i] for i in has_score],
        cum["score"][has_score],
        cum["score_sum"][has_score],
        owners[has_score],
    )
    reg = np.flatnonzero(regression)
    cols.histogram(
        "model_prediction_error",
        [mvl[i] for i in reg],
        cum["err"][reg],
        cum["err_sum"][reg],
        owners[reg],
    )
    conf = cum["conf"] * ~regression[:, None, None]
    # Every pair of a version's known classes from 0, not from its first count: a cell
    # that appears at 1 hides that count from increase(), which biased error-based
    # ratios (and the Wilson bounds built on them) upwards for rare labels.
    known = np.array([[bool(name) for name in row] for row in classes], dtype=bool).reshape(
        conf.shape[:2]
    )
    pairs = known[:, :, None] & known[:, None, :] & ~regression[:, None, None]
    cells, (i, a, pc) = _cells(mvl, classes, pairs | (conf > 0))
    cols.extend("model_confusion", cells, conf[i, a, pc], owners[i])
    cells, (i, g) = _cells(mvl, [e[6] for e in v.entries], cum["seg"] > 0)
    cols.extend("inference_segment_predictions", cells, cum["seg"][i, g], owners[i])
    _segment_rows(v, mvl, regression, owners, cols)
    _join_rows(v, mvl, owners, cols)
    # Both halves of a reliability bin that has any labelled row, so a ratio never lacks one.
    cal = cum["cal"] * ~regression[:, None, None]
    i, b = np.nonzero(cal.sum(axis=-1) > 0)
    for correct, flag in ((0, "false"), (1, "true")):
        cols.extend(
            "model_calibration",
            [(*mvl[j], CALIBRATION_BIN_LABELS[k], flag) for j, k in zip(i, b, strict=True)],
            cal[i, b, correct],
            owners[i],
        )
    # A class named like the macro average would share its labels: the catalog folds
    # such names, and the per-class rows leave them out in case a view still has one.
    not_macro = np.array([[n != MACRO for n in names] for names in classes], dtype=bool)
    for w in v.windows:
        _window_rows(v, w, config, mvl, regression, not_macro, owners, cols, use)


def _segment_rows(
    v: StateView,
    mvl: Sequence[tuple[str, ...]],
    regression: np.ndarray,
    owners: np.ndarray,
    cols: _Columns,
) -> None:
    """Quality counters per segment (closed panes): windows are ``increase()`` of them."""
    cum = v.cum
    segments = [e[6] for e in v.entries]
    classes = [e[4] for e in v.entries]
    labelled = cum["seg_lab"] > 0
    cells, (i, g) = _cells(mvl, segments, labelled)
    cols.extend("model_segment_labeled_predictions", cells, cum["seg_lab"][i, g], owners[i])
    reg = labelled & regression[:, None]
    cells, (i, g) = _cells(mvl, segments, reg)
    cols.extend("model_segment_absolute_error", cells, cum["seg_abs"][i, g], owners[i])
    cols.extend("model_segment_squared_error", cells, cum["seg_sq"][i, g], owners[i])
    # All three roles of every class seen in the segment (as label or prediction), so
    # a ratio never lacks a term: a class seen but never right there has correct = 0.
    counts = cum["seg_cls"] * ~regression[:, None, None, None]
    i, g, c = np.nonzero(counts.sum(axis=2) > 0)
    labels = [
        (*mvl[j], segments[j][a], classes[j][b])
        for j, a, b in zip(i.tolist(), g.tolist(), c.tolist(), strict=True)
    ]
    for role, name in enumerate(SEGMENT_ROLES):
        cols.extend(f"model_segment_{name}", labels, counts[i, g, role, c], owners[i])


def _join_rows(
    v: StateView, mvl: Sequence[tuple[str, ...]], owners: np.ndarray, cols: _Columns
) -> None:
    """The label join of each model version: joined, pending, expired, coverage, delay."""
    if v.join is None:
        return
    cum = v.cum
    joined = cum["joined"]
    expired, evicted = v.join["expired"], v.join["evicted"]
    cols.extend("model_joined_labels", mvl, joined, owners)
    cols.extend("model_pending_predictions", mvl, v.join["pending"], owners)
    for reason, counts in (("ttl", expired), ("cap", evicted)):
        cols.extend("model_expired_predictions", [(*lab, reason) for lab in mvl], counts, owners)
    # Predictions whose label had its chance: joined, gone unlabelled, or still pending
    # past the coverage age (--label-coverage-age).
    done = joined + expired + evicted + v.join["old_pending"]
    has = np.flatnonzero(done > 0)
    cols.extend(
        "model_label_coverage", [mvl[i] for i in has.tolist()], joined[has] / done[has], owners[has]
    )
    cols.histogram("model_label_delay_seconds", mvl, cum["delay"], cum["delay_sum"], owners)
