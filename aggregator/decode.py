"""Kafka message values -> numpy columns (pure: no Kafka client).

Both wire formats end up as ``RowChunk``: per-row numpy columns plus the small
dictionaries (models, classes, segments, features) their codes index. A
``PredictionBatch`` envelope decodes with one fastavro call and ``np.frombuffer``
views; ``PredictionEvent`` messages are decoded one by one with fastavro and
accumulated by ``EventChunkBuilder`` until the next envelope, keeping message order.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import numpy as np
from fastavro import parse_schema, schemaless_reader
from fastavro.read import SchemaResolutionError

from aggregator.errors import DecodeError
from aggregator.state.columns import MAX_ROWS_PER_ENVELOPE, Heartbeat, Marker, RowChunk
from schemas.registry import (
    RegistryError,
    RegistryUnavailable,
    SchemaNotFound,
    record_subject,
)
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
    "SchemaSource",
    "decode_batch",
]

log = logging.getLogger("modelpulse.aggregator")

# Bound of the features of one envelope (``decode_batch``): the producer's default
# number of features per event.
FEATURES_PER_ROW: Final = 32

_EMPTY_I4: Final = np.empty(0, dtype=CLASS_DTYPE)
_EMPTY_F8: Final = np.empty(0, dtype=FLOAT_DTYPE)
_KINDS: Final = {
    "io.modelpulse.PredictionEvent": SchemaId.PREDICTION_EVENT,
    "io.modelpulse.PredictionBatch": SchemaId.PREDICTION_BATCH,
    "io.modelpulse.ResourceHeartbeat": SchemaId.RESOURCE_HEARTBEAT,
    "io.modelpulse.LabelFeedback": SchemaId.LABEL_FEEDBACK,
    "io.modelpulse.WatermarkMarker": SchemaId.WATERMARK_MARKER,
    "io.modelpulse.DriftReference": SchemaId.DRIFT_REFERENCE,
}


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
    record: dict[str, Any], offset: int, max_rows: int = MAX_ROWS_PER_ENVELOPE
) -> RowChunk:
    """Columns of a decoded ``PredictionBatch`` record (views of its bytes, no copies).

    An envelope of more than ``max_rows`` rows (or more feature values than
    ``max_rows * FEATURES_PER_ROW``) is refused as ``envelope_too_large`` before any
    column is built: a few kB of compressed input must not become gigabytes of arrays.
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


class SchemaSource(Protocol):
    """What ``SchemaResolver`` needs of a registry (``schemas.registry.SchemaRegistry``)."""

    def schema(self, schema_id: int) -> dict[str, Any]: ...

    def register(self, subject: str, schema: dict[str, Any]) -> int: ...


class SchemaResolver:
    """Schema id -> (kind, writer schema, reader schema or None).

    Without a registry the ids are the fixed ones of ``schemas/registry.json``. With a
    registry, ids are *only* registry ids (the fixed ids never shadow them): an id not
    seen yet is looked up once, and the writer schema's full record name decides the
    kind, whatever subject it was registered under. A writer schema that differs from
    the current ``.avsc`` is read with Avro schema resolution against it (added fields
    with defaults are fine; a writer it cannot resolve is ``incompatible_schema``).

    Registry answers are cached: found ids for good (an id's schema never changes),
    ids the registry does not have (or that are not our records) for
    ``NEGATIVE_TTL_SECONDS``, at most ``NEGATIVE_MAX`` of them, so a flood of junk ids
    costs one lookup per id per TTL. When the registry gives no answer, the lookup is
    retried inline (``RETRY_DELAYS``), then every unknown id fails fast as
    ``schema_unavailable`` until a backoff (doubling from ``BACKOFF_MIN_SECONDS`` to
    ``BACKOFF_MAX_SECONDS``) has passed; ids already cached keep decoding throughout.
    """

    NEGATIVE_TTL_SECONDS: Final = 60.0
    NEGATIVE_MAX: Final = 10_000
    RETRY_DELAYS: Final = (0.25, 0.75)
    BACKOFF_MIN_SECONDS: Final = 1.0
    BACKOFF_MAX_SECONDS: Final = 30.0
    # Dead-letter reasons this class raises (besides ``undecodable``).
    REASONS: Final = ("unknown_schema", "incompatible_schema", "schema_unavailable")

    def __init__(
        self,
        registry: SchemaSource | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._sleep = sleep
        self._known: dict[int, tuple[int, Any, Any]] = {}
        self._missing: dict[int, tuple[float, str]] = {}  # id -> (expires, why)
        self._own: dict[int, int] = {}  # kind -> registry id of our own writes
        self._down_until = 0.0
        self._backoff = self.BACKOFF_MIN_SECONDS
        self.lookups = 0  # registry requests made (for tests and logs)
        if registry is None:
            for kind in SchemaId:
                self._known[int(kind)] = (int(kind), parsed_schema(kind), None)

    @property
    def registry(self) -> SchemaSource | None:
        return self._registry

    def writer_id(self, kind: SchemaId) -> int:
        """The id this process frames its own records of ``kind`` with.

        The fixed id without a registry; with one, the id the registry returns for the
        current ``.avsc`` under its record-name subject (raises ``RegistryError``).
        """
        if self._registry is None:
            return int(kind)
        found = self._own.get(int(kind))
        if found is None:
            raw = raw_schema(kind)
            found = self._registry.register(record_subject(raw), raw)
            self._own[int(kind)] = found
            self._known[found] = (int(kind), parsed_schema(kind), None)
        return found

    def resolve(self, schema_id: int) -> tuple[int, Any, Any]:
        """(kind, writer schema, reader schema or None) or raise ``DecodeError``."""
        found = self._known.get(schema_id)
        if found is not None:
            return found
        if self._registry is None:
            raise DecodeError("unknown_schema", f"schema id {schema_id} (no registry configured)")
        now = self._clock()
        missing = self._missing.get(schema_id)
        if missing is not None and missing[0] > now:
            raise DecodeError("unknown_schema", missing[1])
        if now < self._down_until:
            raise DecodeError(
                "schema_unavailable",
                f"schema id {schema_id}: registry unavailable, next try in "
                f"{self._down_until - now:.1f}s",
            )
        try:
            writer = self._fetch(schema_id)
        except SchemaNotFound as exc:
            self._remember_missing(schema_id, f"schema id {schema_id}: {exc}", now)
            raise DecodeError("unknown_schema", f"schema id {schema_id}: {exc}") from None
        except RegistryError as exc:
            self._down_until = self._clock() + self._backoff
            log.warning(
                "schema registry unavailable (schema id %d): %s; unknown ids are dead-lettered "
                "as schema_unavailable for %.0fs",
                schema_id,
                exc,
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_SECONDS)
            raise DecodeError(
                "schema_unavailable", f"schema id {schema_id}: registry unavailable: {exc}"
            ) from None
        self._backoff = self.BACKOFF_MIN_SECONDS
        try:
            parsed: Any = parse_schema(writer)
            name = str(parsed["name"])
        except Exception as exc:  # fastavro raises several types on a bad schema
            why = f"schema id {schema_id} is not a valid Avro record schema: {exc}"
            self._remember_missing(schema_id, why, now)
            raise DecodeError("unknown_schema", why) from None
        kind = _KINDS.get(name)
        if kind is None:
            why = f"schema id {schema_id} is {name}, not a modelpulse record"
            self._remember_missing(schema_id, why, now)
            raise DecodeError("unknown_schema", why)
        current = raw_schema(kind)
        reader = None if writer == current else parsed_schema(kind)
        found = (int(kind), parsed, reader)
        self._known[schema_id] = found
        log.info("schema id %d: %s%s", schema_id, name, "" if reader is None else " (resolved)")
        return found

    def _fetch(self, schema_id: int) -> dict[str, Any]:
        assert self._registry is not None
        for delay in (*self.RETRY_DELAYS, None):
            self.lookups += 1
            try:
                return self._registry.schema(schema_id)
            except RegistryUnavailable:
                if delay is None:
                    raise
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _remember_missing(self, schema_id: int, why: str, now: float) -> None:
        missing = self._missing
        if len(missing) >= self.NEGATIVE_MAX:
            for sid in [s for s, (expires, _w) in missing.items() if expires <= now]:
                del missing[sid]
            while len(missing) >= self.NEGATIVE_MAX:
                del missing[next(iter(missing))]  # the oldest entry
        missing.pop(schema_id, None)
        missing[schema_id] = (now + self.NEGATIVE_TTL_SECONDS, why)
        log.warning(
            "dead-lettering schema id %d for %.0fs: %s", schema_id, self.NEGATIVE_TTL_SECONDS, why
        )

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
        except SchemaResolutionError as exc:
            raise DecodeError(
                "incompatible_schema",
                f"schema id {schema_id} cannot be read as the current {writer['name']}: {exc}",
            ) from None
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError(
                "undecodable", f"schema id {schema_id}: {type(exc).__name__}: {exc}"
            ) from None
        if buf.tell() != len(value):
            raise DecodeError(
                "undecodable", f"schema id {schema_id}: {len(value) - buf.tell()} trailing bytes"
            )
        if not isinstance(record, dict):
            raise DecodeError("undecodable", "not a record")
        return kind, record
