"""Kafka message values -> numpy columns (pure: no Kafka client).

Both wire formats end up as ``RowChunk``: per-row numpy columns plus the small
dictionaries (models, classes, segments, features) their codes index. A
``PredictionBatch`` envelope decodes with one fastavro call and ``np.frombuffer``
views; ``PredictionEvent`` messages are decoded one by one with fastavro and
accumulated by ``EventChunkBuilder`` until the next envelope, keeping message order.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from fastavro import parse_schema, schemaless_reader

from aggregator.errors import DecodeError
from schemas.registry import SchemaRegistry
from schemas.wire import (
    CLASS_DTYPE,
    EVENT_ID_OFFSET_DTYPE,
    EVENT_TIME_DTYPE,
    FLOAT_DTYPE,
    HEADER,
    MAGIC_BYTE,
    NO_CLASS,
    OUTCOME_CODES,
    OUTCOME_DTYPE,
    SchemaId,
    parsed_schema,
    raw_schema,
)

__all__ = [
    "EventChunkBuilder",
    "Heartbeat",
    "Marker",
    "RowChunk",
    "SchemaResolver",
    "decode_batch",
]

_EMPTY_I4: Final = np.empty(0, dtype=CLASS_DTYPE)
_EMPTY_F8: Final = np.empty(0, dtype=FLOAT_DTYPE)
_KINDS: Final = {
    "io.modelpulse.PredictionEvent": SchemaId.PREDICTION_EVENT,
    "io.modelpulse.PredictionBatch": SchemaId.PREDICTION_BATCH,
    "io.modelpulse.ResourceHeartbeat": SchemaId.RESOURCE_HEARTBEAT,
    "io.modelpulse.LabelFeedback": SchemaId.LABEL_FEEDBACK,
    "io.modelpulse.WatermarkMarker": SchemaId.WATERMARK_MARKER,
}


@dataclass(slots=True)
class RowChunk:
    """Rows of one or more messages, in message order.

    ``mv`` indexes ``mv_keys`` ((model, version) pairs); ``regression[k]`` says whether
    key k (None: unknown yet) predicts values (``pred_value``/``label_value``) or classes
    (``pred_code``/``label_code`` into ``classes``, -1 = none). Features are in long
    form: row ``feat_row``, name ``feature_names[feat_code]``, value ``feat_value``.
    ``offset`` is each row's Kafka offset.
    """

    mv_keys: list[tuple[str, str]]
    regression: list[bool | None]  # None: no prediction or label says which
    mv: np.ndarray
    offset: np.ndarray
    event_time_ms: np.ndarray
    latency_seconds: np.ndarray
    outcome: np.ndarray
    score: np.ndarray
    classes: list[str]
    pred_code: np.ndarray
    label_code: np.ndarray
    pred_value: np.ndarray
    label_value: np.ndarray
    segments: list[str]
    segment: np.ndarray  # int32, -1 = none
    feature_names: list[str]
    feat_row: np.ndarray
    feat_code: np.ndarray
    feat_value: np.ndarray

    def __len__(self) -> int:
        return int(self.event_time_ms.shape[0])


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A decoded ``ResourceHeartbeat``."""

    offset: int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Marker:
    """A watermark marker (or any record that only carries event time)."""

    offset: int
    event_time_ms: int


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


def decode_batch(record: dict[str, Any], offset: int) -> RowChunk:
    """Columns of a decoded ``PredictionBatch`` record (views of its bytes, no copies)."""
    n = record["count"]
    if n < 0:
        raise DecodeError("bad_column", f"negative count {n}")
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
        flat = np.flatnonzero(present)
        feat_row = flat // len(names)
        feat_code = (flat % len(names)).astype(np.int32)
        feat_value = feats[flat]
    else:
        feat_row, feat_code, feat_value = np.empty(0, np.int64), _EMPTY_I4, _EMPTY_F8
    segments = list(record["segments"])
    segment = _column(record["segment"], CLASS_DTYPE, n, "segment", optional=True)
    if not segment.size:
        segment = np.full(n, NO_CLASS, dtype=CLASS_DTYPE)
    elif n and (int(segment.max()) >= len(segments) or int(segment.min()) < NO_CLASS):
        raise DecodeError("bad_column", "segment code outside dictionary")
    _column(record["event_id_offsets"], EVENT_ID_OFFSET_DTYPE, n + 1, "event_id", optional=True)
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
    )


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

    def __len__(self) -> int:
        return len(self._cols[0])

    def add(self, r: dict[str, Any], offset: int) -> None:
        """Append one decoded record (fields as in ``prediction_event.avsc``)."""
        key = (r["model"], r["model_version"])
        mv = self._keys.get(key)
        pred, label = r["prediction"], r["label"]
        if mv is None:
            mv = self._keys[key] = len(self._keys)
            self._regression.append(None)
        if self._regression[mv] is None and (pred is not None or label is not None):
            self._regression[mv] = pred.__class__ is float or label.__class__ is float
        cols = self._cols
        row = len(cols[0])
        cols[0].append(mv)
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
        )
        self.__init__()  # type: ignore[misc]
        return chunk


class SchemaResolver:
    """Schema id -> (kind, reader arguments), for fixed ids and registry ids alike.

    Writer schemas that differ from the current one are read with Avro schema
    resolution against the current ``.avsc`` (fields added with defaults).
    """

    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self._registry = registry
        self._known: dict[int, tuple[int, Any, Any]] = {}
        for kind in SchemaId:
            self._known[int(kind)] = (int(kind), parsed_schema(kind), None)

    def resolve(self, schema_id: int) -> tuple[int, Any, Any]:
        """(kind, writer schema, reader schema or None) or raise ``DecodeError``."""
        found = self._known.get(schema_id)
        if found is not None:
            return found
        if self._registry is None:
            raise DecodeError("unknown_schema", f"schema id {schema_id} (no registry configured)")
        try:
            writer = self._registry.schema(schema_id)
        except Exception as exc:
            raise DecodeError("unknown_schema", f"schema id {schema_id}: {exc}") from exc
        name = f"{writer.get('namespace', '')}.{writer.get('name', '')}"
        kind = _KINDS.get(name)
        if kind is None:
            raise DecodeError("unknown_schema", f"schema id {schema_id} is {name}, not ours")
        current = raw_schema(kind)
        reader = None if writer == current else parse_schema(current)
        found = (int(kind), parse_schema(writer), reader)
        self._known[schema_id] = found
        return found

    def read(self, value: bytes | None) -> tuple[int, dict[str, Any]]:
        """Unframe and decode one message value into (kind, record)."""
        if value is None or len(value) < HEADER.size:
            raise DecodeError("truncated", "shorter than the 5-byte Confluent header")
        magic, schema_id = HEADER.unpack_from(value)
        if magic != MAGIC_BYTE:
            raise DecodeError("bad_magic", f"magic byte {magic}, expected 0")
        kind, writer, reader = self.resolve(schema_id)
        buf = io.BytesIO(value)
        buf.seek(HEADER.size)
        try:
            record = schemaless_reader(buf, writer, reader)
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}") from None
        if buf.tell() != len(value):
            raise DecodeError("undecodable", f"{len(value) - buf.tell()} trailing bytes")
        if not isinstance(record, dict):
            raise DecodeError("undecodable", "not a record")
        return kind, record
