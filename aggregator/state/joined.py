"""Labels joined to pending predictions, binned into the partition's panes.

A joined pair is binned like an inline-labelled row into the measures marked
``joined`` (quality, calibration, segments, the label delay), in the pane of the
label's time: quality counts a label when it becomes known, as it does for a label
given at prediction time. A label time the windows have passed (or not reached yet:
the prediction partition behind) is clipped to the open panes, so it is never late
and never closes a pane; the delay histogram keeps the true delay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from aggregator.catalog import OVERFLOW
from aggregator.join.joiner import INVALID, KIND_MISMATCH, MODEL_MISMATCH, Matched
from aggregator.join.labels import LabelChunk
from aggregator.join.pending import Columns
from aggregator.state.rows import Rows

if TYPE_CHECKING:
    from aggregator.state.partition import PartitionState

__all__ = ["bin_matched", "label_reasons", "pending_columns"]


def pending_columns(
    cols: dict[str, np.ndarray], mv: np.ndarray, pred: np.ndarray, seg: np.ndarray
) -> tuple[np.ndarray, Columns]:
    """(keys, ``PREDICTION_COLUMNS``) of the accepted rows that wait for a label:
    ok, a prediction, an event id, and no label given inline."""
    ok = cols["out"] == 0
    is_cls = pred >= 0
    has_pv = ~np.isnan(cols["pv"])
    inline = (cols["label"] >= 0) | ~np.isnan(cols["lv"])
    wait = ok & (is_cls | has_pv) & (cols["key"] != 0) & ~inline
    rows = np.flatnonzero(wait)
    columns: Columns = {
        "version": mv[rows].astype(np.int32),
        "predicted": np.where(is_cls[rows], pred[rows], cols["pv"][rows]).astype(np.float64),
        "score": cols["score"][rows],
        "event_time_ms": cols["t"][rows],
        "segment": seg[rows].astype(np.int16),
    }
    return cols["key"][rows], columns


def label_reasons(labels: LabelChunk) -> np.ndarray:
    """Reason (``LABEL_REASONS``) of labels that cannot join anything, -1 elsewhere."""
    reason = np.full(len(labels), -1, dtype=np.int64)
    value = labels.label_code < 0
    bad_value = value & ~np.isfinite(labels.label_value)
    reason[bad_value | (labels.label_time_ms < 0) | (labels.key == 0)] = INVALID
    return reason


def bin_matched(state: PartitionState, matched: Matched) -> np.ndarray:
    """Check the pairs (model, version, kind) and bin the good ones; returns the reason
    per pair (-1: binned). Refused pairs are for the caller to ``unmatch``."""
    labels, pred = matched.labels, matched.prediction
    n = len(labels)
    reason = np.full(n, -1, dtype=np.int64)
    if not n:
        return reason
    entries = state.catalog.entries
    mv = pred["version"].astype(np.int64)
    names = labels.names
    # One check per distinct (model version, label's model, label's version, kind):
    # a handful per batch, looked up back to the rows.
    width = len(names) + 1
    is_value = (labels.label_code < 0).astype(np.int64)
    combo = ((mv * width + labels.model) * width + labels.version + 1) * 2 + is_value
    uniq, inverse = np.unique(combo, return_inverse=True)
    verdict = np.full(uniq.size, -1, dtype=np.int64)
    for j, c in enumerate(uniq.tolist()):
        rest, value = divmod(c, 2)
        rest, version_code = divmod(rest, width)
        g, model_code = divmod(rest, width)
        e = entries[g]
        model = names[model_code]
        version = names[version_code - 1] if version_code else ""
        if e.model != OVERFLOW and (
            model != e.model or (version and e.version not in (version, OVERFLOW))
        ):
            verdict[j] = MODEL_MISMATCH
        elif bool(value) != bool(e.regression):
            verdict[j] = KIND_MISMATCH
    reason[:] = verdict[inverse]
    good = np.flatnonzero(reason < 0)
    if not good.size:
        return reason
    mv_g = mv[good]
    label = np.full(good.size, -1, dtype=np.int64)
    cls = labels.label_code[good] >= 0
    if cls.any():
        pairs = mv_g[cls] * len(names) + labels.label_code[good][cls]
        uniq, inverse = np.unique(pairs, return_inverse=True)
        ids = [
            state.catalog.class_id(p // len(names), names[p % len(names)]) for p in uniq.tolist()
        ]
        label[cls] = np.asarray(ids, dtype=np.int64)[inverse]
    predicted = pred["predicted"][good]
    t_pred = pred["event_time_ms"][good]
    t_label = labels.label_time_ms[good]
    cfg = state.config
    newest = state.max_event_ms // cfg.pane_ms
    pane = np.clip(np.floor_divide(t_label, cfg.pane_ms), state.closed, max(newest, state.closed))
    cols = {
        "out": np.zeros(good.size, dtype=np.int64),
        "lat": np.zeros(good.size),
        "score": pred["score"][good],
        "pred": np.where(cls, predicted, -1).astype(np.int64),
        "label": label,
        "pv": np.where(cls, np.nan, predicted),
        "lv": np.where(cls, np.nan, labels.label_value[good]),
        "seg": pred["segment"][good].astype(np.int64),
    }
    rows = Rows(
        cfg,
        mv_g,
        cols,
        state._buckets,
        state._err_edges,
        None,
        delay=(t_label - t_pred) / 1000.0,
    )
    state.panes.add(pane, rows, joined=True)
    return reason
