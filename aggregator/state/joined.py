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
from aggregator.join.joiner import INVALID, KIND_MISMATCH, MODEL_MISMATCH, JoinState, Matched
from aggregator.join.labels import LabelChunk
from aggregator.join.pending import Columns
from aggregator.state.intern import Interner
from aggregator.state.rows import Rows

if TYPE_CHECKING:
    from aggregator.state.partition import PartitionState

__all__ = [
    "bin_matched",
    "ingest_labels",
    "join_view",
    "label_reasons",
    "merge_letters",
    "pending_columns",
    "wait_for_labels",
]


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
    codes = labels.label_code[good].astype(np.int64)
    cls = codes >= 0
    # Class names new to a version are interned in log order, as for inline labels.
    label = Interner(state.catalog, state.grow).remap(codes, mv_g, names, cls, "classes")
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


def wait_for_labels(state: PartitionState, kept: dict[str, np.ndarray], mv: np.ndarray) -> None:
    """Accepted rows into the pending store; labels that came first join them now."""
    assert state.join is not None
    if state.join.limits.models:
        waits = state.join.waits_for([e.model for e in state.catalog.entries])
        if not waits[mv].all():
            sel = np.flatnonzero(waits[mv])
            kept, mv = {k: v[sel] for k, v in kept.items()}, mv[sel]
    keys, columns = pending_columns(kept, mv, kept["pred"], kept["seg"])
    matched = state.join.add_predictions(keys, columns)
    if matched is not None:
        _settle(state, matched)


def ingest_labels(state: PartitionState, labels: LabelChunk, next_offset: int) -> int:
    """Join a batch of labels (``PartitionState.ingest_labels``); returns pairs binned."""
    if state.join is None:
        raise RuntimeError("ingest_labels: this state has no join (StateConfig.join)")
    why = label_reasons(labels)
    bad = why >= 0
    _letters(state, labels.offset[bad], why[bad])
    good = labels.take(~bad)
    matched, reason = state.join.match(good)
    missed = reason >= 0
    _letters(state, good.offset[missed], reason[missed])
    binned = _settle(state, matched)
    state.join.next_offset = next_offset
    return binned


def _settle(state: PartitionState, matched: Matched) -> int:
    """Bin the pairs that fit; put the others' predictions back and dead-letter their
    labels. Returns the pairs binned."""
    assert state.join is not None
    why = bin_matched(state, matched)
    refused = why >= 0
    if refused.any():
        state.join.unmatch(matched, refused)
        _letters(state, matched.labels.offset[refused], why[refused])
    return int(refused.size - refused.sum())


def _letters(state: PartitionState, offsets: np.ndarray, why: np.ndarray) -> None:
    assert state.join is not None
    if why.size:
        np.add.at(state.join.unmatched, why, 1)
        state.label_letters.append((offsets, why))


def merge_letters(letters: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not letters:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    offsets = np.concatenate([o for o, _ in letters]).astype(np.int64)
    reasons = np.concatenate([r for _, r in letters]).astype(np.int64)
    return offsets, reasons


def join_view(state: PartitionState, j: JoinState, m: int) -> dict[str, np.ndarray]:
    """Per model version counts of the join; the old pending ones (a scan of the store)
    only when panes closed, like the windows."""
    key = (state.closed, m)
    if state.old_pending is None or state.old_pending[0] != key:
        state.old_pending = (key, j.old_pending(state.max_event_ms, m))
    out = {k: v[:m].copy() for k, v in j.per_mv.items()}
    out["old_pending"] = state.old_pending[1].copy()
    return out
