"""The pane measures: one table row per array, and how a row of input is binned into it.

Every array of a partition's state is a measure: a per-model-version block of shape
``tail`` (e.g. a histogram's buckets), kept per pane in the window ring (``windowed``)
or only in the cumulative counters and the ring of panes still open. The table drives
everything that used to be written out per array: allocation and growth (``panes``),
binning (``bin``), window sums (``WindowAggregate``), snapshots and their digest
(``table_signature``), drift references (``drift``), the sample-line estimate that
sizes the catalog (``lines``) and, for simple measures, the exported family
(``gauge``: a windowed mean, rendered by ``aggregator.metrics`` without new code).

Adding a measure is one row in ``MEASURES`` and one bin function: ``log_loss`` below
is the example (docs/architecture.md, "Adding a window measure", has its diff).

A snapshot taken before the row existed then has another digest and takes the
config-changed path (``ConfigMismatch``: refuse, or ``--rebuild-state``).
"""

from __future__ import annotations

from typing import Final

import numpy as np

from aggregator.state.binning import drift_bin
from aggregator.state.config import (
    CALIBRATION_BINS,
    DRIFT_BINS,
    LABEL_DELAY_BOUNDS,
    N_OUTCOMES,
    SEGMENT_ROLES,
    StateConfig,
)
from aggregator.state.measure import Bin, Mean, Measure
from aggregator.state.rows import Rows

__all__ = [
    "F8",
    "I8",
    "MEASURES",
    "Bin",
    "Mean",
    "Measure",
    "lines_per_model_version",
    "table_signature",
    "tails",
]

I8: Final = np.int64
_DELAY_EDGES: Final = np.asarray(LABEL_DELAY_BOUNDS, dtype=np.float64)
F8: Final = np.float64


# -- bin functions (one per measure; the sums must stay exactly these expressions) --


def _outcome(r: Rows) -> Bin:
    return Bin(inner=r.out)


def _lat(r: Rows) -> Bin:
    return Bin(inner=r.lat_buckets(r.lat))


def _lat_sum(r: Rows) -> Bin:
    return Bin(weights=r.lat)


def _score(r: Rows) -> Bin:
    return Bin(inner=r.score_buckets(r.score), mask=r.has_score)  # NaN: last bin, masked


def _score_sum(r: Rows) -> Bin:
    return Bin(weights=r.score0)


def _labelled(r: Rows) -> Bin:
    return Bin(mask=r.ok & ((r.label >= 0) | ~np.isnan(r.lv)))


def _conf(r: Rows) -> Bin:
    label0, pred0 = np.maximum(r.label, 0), np.maximum(r.pred, 0)  # in range where masked
    return Bin(inner=label0 * r.ncls + pred0, mask=r.both)


def _pred_class(r: Rows) -> Bin:
    return Bin(rows=r.has_pred, inner=r.pred[r.has_pred])


def _est(r: Rows) -> Bin:
    return Bin(mask=r.scored)


def _est_sum(r: Rows) -> Bin:
    return Bin(weights=r.score0 * r.scored)


def _cal(r: Rows) -> Bin:
    return Bin(inner=r.cal_bin * 2 + r.correct, mask=r.cal)


def _cal_score(r: Rows) -> Bin:
    return Bin(inner=r.cal_bin, weights=r.score0 * r.cal)


def _brier(r: Rows) -> Bin:
    return Bin(weights=np.square(r.score0 - r.correct) * r.cal)


def _log_loss(r: Rows) -> Bin:
    """-log of the probability given to what happened (right or wrong), per scored row."""
    sel = r.cal
    score = r.score0[sel]
    p = np.where(r.correct[sel], score, 1.0 - score)
    np.maximum(p, 1e-15, out=p)  # scores are in [0, 1]: only the floor can bind
    np.log(p, out=p)
    np.negative(p, out=p)
    return Bin(rows=sel, weights=p)


def _joined(r: Rows) -> Bin:
    return Bin()  # every joined row counts once


def _delay(r: Rows) -> Bin | None:
    if r.delay is None:
        return None
    return Bin(inner=np.searchsorted(_DELAY_EDGES, r.delay, "left"))


def _delay_sum(r: Rows) -> Bin | None:
    return None if r.delay is None else Bin(weights=r.delay)


def _err(r: Rows) -> Bin:
    return Bin(rows=r.reg, inner=np.searchsorted(r.err_edges, r.err, "left"))


def _err_sum(r: Rows) -> Bin:
    return Bin(rows=r.reg, weights=r.err)


def _abs_err(r: Rows) -> Bin:
    return Bin(rows=r.reg, weights=np.abs(r.err))


def _sq_err(r: Rows) -> Bin:
    return Bin(rows=r.reg, weights=r.err * r.err)


def _pred_hist(r: Rows) -> Bin:
    has_pv = r.ok & ~np.isnan(r.pv)
    return Bin(rows=has_pv, inner=drift_bin(r.pv[has_pv]))


def _seg(r: Rows) -> Bin | None:
    if not r.any_seg:
        return None
    return Bin(rows=r.has_seg, inner=r.seg[r.has_seg])


def _seg_cls(r: Rows) -> Bin | None:
    """Per segment x role x class: label (actual), prediction, and hits (correct)."""
    if not r.any_seg:
        return None
    sb = r.seg_rows[0]
    hit = sb & r.correct
    roles, ncls = len(SEGMENT_ROLES), r.ncls
    cell = r.seg * roles
    return Bin(
        rows=np.concatenate([np.flatnonzero(sb), np.flatnonzero(sb), np.flatnonzero(hit)]),
        inner=np.concatenate(
            [
                (cell[sb] + 0) * ncls + r.label[sb],
                (cell[sb] + 1) * ncls + r.pred[sb],
                (cell[hit] + 2) * ncls + r.label[hit],
            ]
        ),
    )


def _seg_lab(r: Rows) -> Bin | None:
    if not r.any_seg:
        return None
    sb, sr = r.seg_rows
    rows = np.concatenate([np.flatnonzero(sb), np.flatnonzero(sr)])
    return Bin(rows=rows, inner=r.seg[rows])


def _seg_abs(r: Rows) -> Bin | None:
    if not r.any_seg:
        return None
    sr = r.seg_rows[1]
    return Bin(rows=sr, inner=r.seg[sr], weights=np.abs(r.seg_err))


def _seg_sq(r: Rows) -> Bin | None:
    if not r.any_seg:
        return None
    sr = r.seg_rows[1]
    return Bin(rows=sr, inner=r.seg[sr], weights=r.seg_err * r.seg_err)


def _feat(r: Rows) -> Bin | None:
    if r.feats is None:
        return None
    row, fid, value = r.feats
    return Bin(rows=row, inner=fid * DRIFT_BINS + drift_bin(value))


# -- shapes and sample lines -------------------------------------------------------


def _scalar(_c: StateConfig) -> tuple[int, ...]:
    return ()


def _hist_lines(bounds: tuple[float, ...]) -> int:
    return len(bounds) + 3  # cumulative lines of a histogram: buckets + "+Inf", _sum, _count


def _classes(c: StateConfig) -> int:
    return c.limits.max_classes


def _segments(c: StateConfig) -> int:
    return c.limits.max_segments


MEASURES: Final[tuple[Measure, ...]] = (
    # predictions and errors by outcome (4 + 3), info + update time; per window:
    # predictions, throughput, end timestamp.
    Measure("outcome", lambda c: (N_OUTCOMES,), I8, _outcome, lines=(9, 3)),
    Measure(
        "lat",
        lambda c: (len(c.latency_bounds) + 1,),
        I8,
        _lat,
        lines=lambda c: (_hist_lines(c.latency_bounds), 3),  # + 3 latency quantiles
    ),
    Measure("lat_sum", _scalar, F8, _lat_sum),
    Measure(
        "score",
        lambda c: (len(c.score_bounds) + 1,),
        I8,
        _score,
        drift=True,
        lines=lambda c: (_hist_lines(c.score_bounds), 4),  # + 4 drift methods
    ),
    Measure("score_sum", _scalar, F8, _score_sum),
    Measure(
        "err",
        lambda c: (len(c.error_bounds) + 1,),
        I8,
        _err,
        lines=lambda c: (_hist_lines(c.error_bounds), 2),  # + MAE, RMSE
        joined=True,
    ),
    Measure("err_sum", _scalar, F8, _err_sum, joined=True),
    Measure("abs_err", _scalar, F8, _abs_err, joined=True),
    Measure("sq_err", _scalar, F8, _sq_err, joined=True),
    Measure("labelled", _scalar, I8, _labelled, lines=(2, 0)),  # labelled, unlabelled
    Measure(
        "conf",
        lambda c: (_classes(c), _classes(c)),
        I8,
        _conf,
        # the matrix; per window accuracy + 5 ratios per class and macro
        lines=lambda c: (_classes(c) ** 2, 1 + 5 * (_classes(c) + 1)),
        joined=True,
    ),
    Measure("pred_class", lambda c: (_classes(c),), I8, _pred_class, drift=True, lines=(0, 4)),
    Measure("pred_hist", lambda c: (DRIFT_BINS,), I8, _pred_hist, drift=True),
    Measure(
        "feat",
        lambda c: (c.limits.max_features, DRIFT_BINS),
        I8,
        _feat,
        drift=True,
        # drift reference info; 4 drift methods per feature
        lines=lambda c: (1, 4 * c.limits.max_features),
    ),
    Measure("seg", lambda c: (_segments(c),), I8, _seg, lines=lambda c: (_segments(c), 0)),
    # Labelled ok rows with a score, classification only: per reliability bin x
    # (incorrect, correct) counts, per-bin score sums, and sum of (score - correct)^2.
    Measure(
        "cal",
        lambda c: (CALIBRATION_BINS, 2),
        I8,
        _cal,
        lines=(2 * CALIBRATION_BINS, 4),  # + ECE, Brier, estimated accuracy and its gap
        joined=True,
    ),
    Measure("cal_score", lambda c: (CALIBRATION_BINS,), F8, _cal_score, joined=True),
    Measure("brier", _scalar, F8, _brier, joined=True),
    Measure(
        "log_loss",
        _scalar,
        F8,
        _log_loss,
        lines=(0, 1),
        joined=True,
        gauge=Mean(
            "model_log_loss",
            "Mean log loss of the score as the probability of being right, labelled "
            "predictions, last closed window.",
            over="cal",
            task="classification",
        ),
    ),
    # Ok rows with a predicted class and a score, labelled or not: count, score sum.
    Measure("est", _scalar, I8, _est),
    Measure("est_sum", _scalar, F8, _est_sum),
    # Labels joined to a pending prediction (aggregator.join): their count, and the
    # delay from prediction to label. Counters: labelled (inline + joined), joined,
    # the delay histogram; gauges: pending predictions, label coverage; and the
    # predictions that expired or were evicted unlabelled.
    Measure("joined", _scalar, I8, _joined, predictions=False, joined=True, lines=(5, 0)),
    Measure(
        "delay",
        lambda c: (len(LABEL_DELAY_BOUNDS) + 1,),
        I8,
        _delay,
        predictions=False,
        joined=True,
        lines=(_hist_lines(LABEL_DELAY_BOUNDS), 0),
    ),
    Measure("delay_sum", _scalar, F8, _delay_sum, predictions=False, joined=True),
    # Quality per segment: cumulative only (windows are Prometheus' increase() of the
    # counters): per-pane copies for the longest window would cost segments x classes
    # x ring per model version (docs/architecture.md).
    Measure(
        "seg_cls",
        lambda c: (_segments(c), len(SEGMENT_ROLES), _classes(c)),
        I8,
        _seg_cls,
        windowed=False,
        joined=True,
        lines=lambda c: (_segments(c) * (1 + 3 * _classes(c)), 0),
    ),
    Measure("seg_lab", lambda c: (_segments(c),), I8, _seg_lab, windowed=False, joined=True),
    Measure("seg_abs", lambda c: (_segments(c),), F8, _seg_abs, windowed=False, joined=True),
    Measure("seg_sq", lambda c: (_segments(c),), F8, _seg_sq, windowed=False, joined=True),
)
BY_NAME: Final = {m.name: m for m in MEASURES}
PREDICTION_MEASURES: Final = tuple(m for m in MEASURES if m.predictions)
JOINED_MEASURES: Final = tuple(m for m in MEASURES if m.joined)


def tails(config: StateConfig) -> dict[str, tuple[int, ...]]:
    return {m.name: m.tail(config) for m in MEASURES}


def table_signature(config: StateConfig) -> list[list[object]]:
    """What of the table a snapshot depends on (hashed into ``StateConfig.digest``)."""
    return [
        [
            m.name,
            list(m.tail(config)),
            np.dtype(m.dtype).str,
            m.windowed,
            m.drift,
            m.predictions,
            m.joined,
        ]
        for m in MEASURES
    ]


def lines_per_model_version(config: StateConfig, n_windows: int) -> int:
    """Worst-case sample lines one model version exports (sizes the catalog)."""
    total = 0
    for m in MEASURES:
        cumulative, per_window = m.lines(config) if callable(m.lines) else m.lines
        total += cumulative + n_windows * per_window
    return total
