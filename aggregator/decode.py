"""Kafka message values -> numpy columns (pure: no Kafka client).

Both wire formats end up as ``RowChunk``: per-row numpy columns plus the small
dictionaries (models, classes, segments, features) their codes index. A
``PredictionBatch`` envelope decodes with one fastavro call and ``np.frombuffer``
views; ``PredictionEvent`` messages are decoded one by one with fastavro and
accumulated by ``EventChunkBuilder`` until the next envelope, keeping message order.
Every path keeps each row's ``event_id`` as its ``schemas.event_id`` hash
(``RowChunk.event_hash``), the key the label join looks predictions up by.

``SchemaResolver`` and ``SchemaSource`` live in ``aggregator.resolver``; they are
re-exported here, where most callers import them from.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from aggregator.errors import DecodeError
from aggregator.resolver import SchemaResolver, SchemaSource
from aggregator.state.columns import MAX_ROWS_PER_ENVELOPE, Heartbeat, Marker, RowChunk
from schemas.event_id import event_hashes, hash_event_ids
from schemas.wire import (
    CLASS_DTYPE,
    EVENT_ID_OFFSET_DTYPE,
    EVENT_TIME_DTYPE,
    FLOAT_DTYPE,
    NO_CLASS,
    OUTCOME_CODES,
    OUTCOME_DTYPE,
)

__all__ = [
    "EventChunkBuilder",
    "Heartbeat",
    "Marker",
    "RowChunk",
    "SchemaResolver",
    "SchemaSource",
    "decode_batch",
]

# Bound of the features of one envelope (``decode_batch``): the producer's default
# number of features per event.
FEATURES_PER_ROW: Final = 32

_EMPTY_I4: Final = np.empty(0, dtype=CLASS_DTYPE)
_EMPTY_F8: Final = np.empty(0, dtype=FLOAT_DTYPE)


def _column(
    data: bytes, dtype: np.dtype[Any], count: int, name: str, *, optional: bool = False
) -> np.ndarray:
    if optional and not data:
        return np.empty(0, dtype=dtype)
    if len(data) != count * dtype.itemsize:
        raise DecodeError(
            "bad_column", f"{name}: {len(data)} bytes for {count} x {dtype.itemsize}-byte items"
        )
    return np.frombuffer(data, dtype=dtype)


def decode_batch(
    record: dict[str, Any],
    offset: int,
    max_rows: int = MAX_ROWS_PER_ENVELOPE,
    *,
    ids: bool = True,
) -> RowChunk:
    """Columns of a decoded ``PredictionBatch`` record (views of its bytes, no copies).

    An envelope of more than ``max_rows`` rows (or more feature values than
    ``max_rows * FEATURES_PER_ROW``) is refused as ``envelope_too_large`` before any
    column is built: a few kB of compressed input must not become gigabytes of arrays.
    ``ids=False`` leaves ``event_hash`` at 0 (no late-label join reads it): hashing
    costs ~30 ns a row, a tenth of the batched path.
    """
    n = record["count"]
    if n < 0:
        raise DecodeError("bad_column", f"negative count {n}")
    if n > max_rows:
        raise DecodeError(
            "envelope_too_large", f"{n} rows, more than max_rows_per_envelope {max_rows}"
        )
    cells = n * len(record["feature_names"])
    if cells > max_rows * FEATURES_PER_ROW:
        raise DecodeError(
            "envelope_too_large",
            f"{n} rows x {len(record['feature_names'])} features, more than "
            f"{max_rows} x {FEATURES_PER_ROW} feature values",
        )
    regression = record["task"] == "regression"
    value_dtype = FLOAT_DTYPE if regression else CLASS_DTYPE
    pred = _column(record["prediction"], value_dtype, n, "prediction")
    label = _column(record["label"], value_dtype, n, "label")
    classes = list(record["classes"])
    if not regression and n and classes is not None:
        hi = max(int(pred.max()), int(label.max()))
        lo = min(int(pred.min()), int(label.min()))
        if hi >= len(classes) or lo < NO_CLASS:
            raise DecodeError("bad_column", f"class code outside dictionary of {len(classes)}")
    names = list(record["feature_names"])
    feats = _column(record["features"], FLOAT_DTYPE, n * len(names), "features", optional=True)
    if feats.size:
        present = ~np.isnan(feats)
        if present.all():  # the common case: no gather, the column itself
            flat = np.arange(feats.size)
            feat_value = feats
        else:
            flat = np.flatnonzero(present)
            feat_value = feats[flat]
        if len(names) == 1:
            feat_row, feat_code = flat, np.zeros(flat.size, dtype=np.int32)
        else:
            feat_row = flat // len(names)
            feat_code = (flat % len(names)).astype(np.int32)
    else:
        feat_row, feat_code, feat_value = np.empty(0, np.int64), _EMPTY_I4, _EMPTY_F8
    segments = list(record["segments"])
    segment = _column(record["segment"], CLASS_DTYPE, n, "segment", optional=True)
    if not segment.size:
        segment = np.full(n, NO_CLASS, dtype=CLASS_DTYPE)
    elif n and (int(segment.max()) >= len(segments) or int(segment.min()) < NO_CLASS):
        raise DecodeError("bad_column", "segment code outside dictionary")
    informative = regression or bool(n and (int(pred.max()) >= 0 or int(label.max()) >= 0))
    return RowChunk(
        mv_keys=[(record["model"], record["model_version"])],
        regression=[regression if informative else None],
        mv=np.zeros(n, dtype=np.int32),
        offset=np.full(n, offset, dtype=np.int64),
        event_time_ms=_column(record["event_time_ms"], EVENT_TIME_DTYPE, n, "event_time_ms"),
        latency_seconds=_column(record["latency_seconds"], FLOAT_DTYPE, n, "latency_seconds"),
        outcome=_column(record["outcome"], OUTCOME_DTYPE, n, "outcome"),
        score=_column(record["score"], FLOAT_DTYPE, n, "score"),
        classes=classes,
        pred_code=_EMPTY_I4 if regression else pred,
        label_code=_EMPTY_I4 if regression else label,
        pred_value=pred if regression else _EMPTY_F8,
        label_value=label if regression else _EMPTY_F8,
        segments=segments,
        segment=segment,
        feature_names=names,
        feat_row=feat_row,
        feat_code=feat_code,
        feat_value=feat_value,
        event_hash=_event_hash(record, n) if ids else np.zeros(n, dtype=np.uint64),
    )


def _event_hash(record: dict[str, Any], n: int) -> np.ndarray:
    """Hashes of an envelope's ``event_id`` column (all 0 when it carries no ids)."""
    offsets = _column(
        record["event_id_offsets"], EVENT_ID_OFFSET_DTYPE, n + 1, "event_id_offsets", optional=True
    )
    if not offsets.size:
        return np.zeros(n, dtype=np.uint64)
    data = record["event_id_data"]
    lengths = np.diff(offsets).astype(np.int64)
    if int(offsets[0]) != 0 or int(offsets[-1]) != len(data) or (n and int(lengths.min()) < 0):
        raise DecodeError(
            "bad_column",
            f"event_id_offsets: not increasing from 0 to the {len(data)} bytes of event_id_data",
        )
    return event_hashes(data, offsets[:-1].astype(np.int64), lengths)


class EventChunkBuilder:
    """Accumulate decoded ``PredictionEvent`` records into one ``RowChunk``.

    A per-event Python step is unavoidable for this format (one Avro record per
    message); it does the least it can: append scalars to lists, intern strings.
    """

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], int] = {}
        self._regression: list[bool | None] = []
        self._classes: dict[str, int] = {}
        self._segments: dict[str, int] = {}
        self._features: dict[str, int] = {}
        self._cols: tuple[list[Any], ...] = tuple([] for _ in range(11))
        self._feat: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        self._ids: list[str] = []  # hashed in build(), all at once

    def __len__(self) -> int:
        return len(self._cols[0])

    def add(self, r: dict[str, Any], offset: int) -> None:
        """Append one decoded record (fields as in ``prediction_event.avsc``)."""
        key = (r["model"], r["model_version"])
        mv = self._keys.get(key)
        pred, label = r["prediction"], r["label"]
        event_id = r["event_id"]
        if event_id.__class__ is not str:  # a writer's logical type (uuid): its text form
            event_id = str(event_id)
        if mv is None:
            mv = self._keys[key] = len(self._keys)
            self._regression.append(None)
        if self._regression[mv] is None and (pred is not None or label is not None):
            self._regression[mv] = pred.__class__ is float or label.__class__ is float
        cols = self._cols
        row = len(cols[0])
        cols[0].append(mv)
        self._ids.append(event_id)
        cols[1].append(offset)
        cols[2].append(r["event_time_ms"])
        cols[3].append(r["latency_seconds"])
        cols[4].append(OUTCOME_CODES[r["outcome"]])
        score = r["score"]
        cols[5].append(math.nan if score is None else score)
        classes = self._classes
        if pred.__class__ is str:
            cols[6].append(classes.setdefault(pred, len(classes)))
            cols[8].append(math.nan)
        else:
            cols[6].append(NO_CLASS)
            cols[8].append(math.nan if pred is None else pred)
        if label.__class__ is str:
            cols[7].append(classes.setdefault(label, len(classes)))
            cols[9].append(math.nan)
        else:
            cols[7].append(NO_CLASS)
            cols[9].append(math.nan if label is None else label)
        seg = r["segment"]
        cols[10].append(
            NO_CLASS if seg is None else self._segments.setdefault(seg, len(self._segments))
        )
        feats = r["features"]
        if feats:
            names = self._features
            fr, fc, fv = self._feat
            for name, value in feats.items():
                fr.append(row)
                fc.append(names.setdefault(name, len(names)))
                fv.append(value)

    def build(self) -> RowChunk:
        """The accumulated rows as a chunk; the builder starts empty again."""
        c = self._cols
        fr, fc, fv = self._feat
        chunk = RowChunk(
            mv_keys=list(self._keys),
            regression=self._regression,
            mv=np.array(c[0], dtype=np.int32),
            offset=np.array(c[1], dtype=np.int64),
            event_time_ms=np.array(c[2], dtype=EVENT_TIME_DTYPE),
            latency_seconds=np.array(c[3], dtype=FLOAT_DTYPE),
            outcome=np.array(c[4], dtype=OUTCOME_DTYPE),
            score=np.array(c[5], dtype=FLOAT_DTYPE),
            classes=list(self._classes),
            pred_code=np.array(c[6], dtype=CLASS_DTYPE),
            label_code=np.array(c[7], dtype=CLASS_DTYPE),
            pred_value=np.array(c[8], dtype=FLOAT_DTYPE),
            label_value=np.array(c[9], dtype=FLOAT_DTYPE),
            segments=list(self._segments),
            segment=np.array(c[10], dtype=CLASS_DTYPE),
            feature_names=list(self._features),
            feat_row=np.array(fr, dtype=np.int64),
            feat_code=np.array(fc, dtype=np.int32),
            feat_value=np.array(fv, dtype=FLOAT_DTYPE),
            event_hash=hash_event_ids(self._ids),
        )
        self.__init__()  # type: ignore[misc]
        return chunk
