"""Encoders of single records, shared by the producer, the aggregator and the tests.

One place for how a record becomes Confluent-framed bytes, so what the shards write
(watermark markers), what the producer writes (events, labels, heartbeats) and what
the tests forge go through the same code. The columnar ``PredictionBatch`` envelope
is the producer's own (``producer.encode``).

>>> from schemas.wire import SchemaId, unframe
>>> unframe(encode_marker(5_000, "shard-0"))[0] == SchemaId.WATERMARK_MARKER
True
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any, Final, NamedTuple

import numpy as np
from fastavro import schemaless_writer

from schemas.wire import EVENT_TIME_DTYPE, OUTCOMES, SchemaId, frame, parsed_schema

__all__ = [
    "MARKER_GROUP_HEADER",
    "Row",
    "encode_event",
    "encode_events",
    "encode_heartbeat",
    "encode_label",
    "encode_marker",
    "encode_record",
    "event_times_ms",
    "is_regression",
]

# Header naming the consumer group whose shard wrote a marker: a shard trusts only its
# own group's markers (anyone can produce to the topic; see RELIABILITY.md).
MARKER_GROUP_HEADER: Final = "modelpulse.marker.group"


def encode_record(kind: SchemaId, record: Mapping[str, Any], schema_id: int | None = None) -> bytes:
    """``record`` written with the schema of ``kind``, framed with ``schema_id`` (the
    registry's id when one is used; default: the fixed id of ``kind``)."""
    out = io.BytesIO()
    schemaless_writer(out, parsed_schema(kind), record)
    return frame(kind if schema_id is None else schema_id, out.getvalue())


def encode_marker(
    event_time_ms: int, origin: str, schema_id: int = SchemaId.WATERMARK_MARKER
) -> bytes:
    """A framed ``WatermarkMarker``; ``schema_id`` is the registry's id when one is used."""
    return encode_record(
        SchemaId.WATERMARK_MARKER, {"event_time_ms": event_time_ms, "origin": origin}, schema_id
    )


class Row(NamedTuple):
    """One buffered prediction (positional, so ``publish()`` can build a plain tuple)."""

    model: str
    version: str
    time: float | datetime  # seconds since the epoch, or an aware datetime
    latency_seconds: float
    outcome: int  # index into OUTCOMES
    prediction: Any  # str/int class label, float value, or None
    score: float | None
    label: Any
    segment: str | None
    features: Mapping[str, float] | None
    event_id: str


def is_regression(value: Any) -> bool:
    """A float (not bool/int) prediction or label means a regression model."""
    return isinstance(value, float | np.floating)


def event_times_ms(times: Sequence[Any]) -> np.ndarray:
    """Event times (seconds or aware datetimes) as int64 ms since the epoch, floored."""
    try:
        seconds = np.asarray(times, dtype=np.float64)
    except TypeError:  # some rows carry datetimes
        seconds = np.array(
            [t.timestamp() if isinstance(t, datetime) else float(t) for t in times],
            dtype=np.float64,
        )
    return np.floor(seconds * 1000.0).astype(EVENT_TIME_DTYPE)


def _wire_value(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if is_regression(value):
        return float(value)
    return str(value)


def encode_event(
    row: Row,
    *,
    service: str = "",
    instance: str = "",
    schema_id: int = SchemaId.PREDICTION_EVENT,
) -> bytes:
    """Encode one row as a framed ``PredictionEvent`` (the interop format)."""
    t = row[2]
    seconds = t.timestamp() if isinstance(t, datetime) else float(t)
    record = {
        "event_id": row[10],
        "event_time_ms": math.floor(seconds * 1000.0),
        "model": row[0],
        "model_version": row[1],
        "latency_seconds": float(row[3]),
        "outcome": OUTCOMES[row[4]],
        "prediction": _wire_value(row[5]),
        "score": None if row[6] is None else float(row[6]),
        "label": _wire_value(row[7]),
        "segment": row[8],
        "features": dict(row[9]) if row[9] else {},
        "service": service,
        "instance": instance,
    }
    return encode_record(SchemaId.PREDICTION_EVENT, record, schema_id)


_pack_double = struct.Struct("<d").pack


def _long(value: int) -> bytes:
    """Avro ``long``: zig-zag, then a base-128 varint, low group first."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# A string of up to 63 bytes has a one-byte length: the common case, from a table.
_SHORT_LENGTH = tuple(bytes([n << 1]) for n in range(64))


def _string(text: str) -> bytes:
    data = text.encode()
    n = len(data)
    return (_SHORT_LENGTH[n] if n < 64 else _long(n)) + data


def _longs(values: np.ndarray) -> list[bytes]:
    """Avro ``long`` of every value of an int64 column, the varint groups built by numpy."""
    zigzag = ((values << 1) ^ (values >> 63)).view(np.uint64)
    shifts = np.arange(0, 70, 7, dtype=np.uint64)
    groups = ((zigzag[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    used = 1 + ((zigzag[:, None] >> shifts[1:]) != 0).sum(axis=1)
    # Every group but the last of a value carries the continuation bit.
    groups[np.arange(10) < (used - 1)[:, None]] |= 0x80
    data = groups.tobytes()
    return [data[10 * i : 10 * i + k] for i, k in enumerate(used.tolist())]


@cache
def _outcome_bytes() -> tuple[bytes, ...]:
    """Avro's enum index of each outcome code, from the schema (not the order of OUTCOMES)."""
    schema = parsed_schema(SchemaId.PREDICTION_EVENT)
    field = next(f for f in schema["fields"] if f["name"] == "outcome")
    symbols = list(field["type"]["symbols"])
    return tuple(_long(symbols.index(name)) for name in OUTCOMES)


def _class_or_value(value: Any, strings: dict[str, bytes]) -> bytes:
    """The ``["null", "string", "double"]`` union of prediction and label."""
    if value is None:
        return b"\x00"
    if value.__class__ is str:
        cached = strings.get(value)
        if cached is None:
            cached = strings[value] = b"\x02" + _string(value)
        return cached
    if is_regression(value):
        return b"\x04" + _pack_double(float(value))
    return b"\x02" + _string(str(value))


def _feature_map(features: Mapping[str, float] | None) -> bytes:
    if not features:
        return b"\x00"
    parts = [_long(len(features))]
    for name, value in features.items():
        parts.append(_string(name))
        parts.append(_pack_double(float(value)))
    parts.append(b"\x00")
    return b"".join(parts)


def encode_events(
    rows: Sequence[Row],
    *,
    service: str = "",
    instance: str = "",
    schema_id: int = SchemaId.PREDICTION_EVENT,
) -> list[bytes]:
    """``encode_event`` of every row, the same bytes, several times cheaper.

    The PredictionEvent schema is fixed, so each record is a join of ready-made byte
    pieces: the times as one numpy column, the strings that repeat (model, version,
    classes, segments) encoded once per call, the tail (service, instance) once. A row
    this writer does not handle goes through ``encode_event`` (fastavro), which also
    raises what fastavro raises for a bad row.
    """
    if not rows:
        return []
    header = frame(schema_id, b"")
    tail = _string(service) + _string(instance)
    outcomes = _outcome_bytes()
    strings: dict[str, bytes] = {}
    names: dict[tuple[str, str], bytes] = {}
    try:
        times = _longs(event_times_ms([r[2] for r in rows]))
    except Exception:  # an odd time: fastavro sorts it out (or raises) row by row
        return [
            encode_event(r, service=service, instance=instance, schema_id=schema_id) for r in rows
        ]
    out: list[bytes] = []
    append = out.append
    for row, time_ms in zip(rows, times, strict=True):
        try:
            (
                model,
                version,
                _,
                latency,
                outcome,
                prediction,
                score,
                label,
                segment,
                features,
                eid,
            ) = row
            key = (model, version)
            identity = names.get(key)
            if identity is None:
                identity = names[key] = _string(model) + _string(version)
            append(
                b"".join(
                    (
                        header,
                        _string(eid),
                        time_ms,
                        identity,
                        _pack_double(float(latency)),
                        outcomes[outcome],
                        _class_or_value(prediction, strings),
                        b"\x00" if score is None else b"\x02" + _pack_double(float(score)),
                        _class_or_value(label, strings),
                        b"\x00" if segment is None else b"\x02" + _string(segment),
                        _feature_map(features),
                        tail,
                    )
                )
            )
        except Exception:
            append(encode_event(row, service=service, instance=instance, schema_id=schema_id))
    return out


def encode_label(
    row: tuple[str, str, Any, float | datetime, str],
    *,
    schema_id: int = SchemaId.LABEL_FEEDBACK,
) -> bytes:
    """Encode one ``label()`` row ``(model, event_id, label, label_time, version)``."""
    model, event_id, label, t, version = row
    seconds = t.timestamp() if isinstance(t, datetime) else float(t)
    record = {
        "event_id": event_id,
        "event_time_ms": math.floor(seconds * 1000.0),
        "model": model,
        "model_version": version,
        "label": _wire_value(label),
    }
    return encode_record(SchemaId.LABEL_FEEDBACK, record, schema_id)


def encode_heartbeat(
    record: Mapping[str, Any], *, schema_id: int = SchemaId.RESOURCE_HEARTBEAT
) -> bytes:
    """Encode a ``ResourceHeartbeat`` record."""
    return encode_record(SchemaId.RESOURCE_HEARTBEAT, dict(record), schema_id)
