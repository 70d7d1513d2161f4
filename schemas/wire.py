"""The wire format shared by the producer and the aggregator.

Every Kafka message value is Confluent-framed: magic byte 0, a 4-byte big-endian
schema id, then the schemaless Avro body. Ids are fixed (``registry.json``) unless a
schema registry assigns them. The columnar layout of ``PredictionBatch`` is pinned
here as numpy dtypes so both sides agree on it byte for byte.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any, Final

import numpy as np
from fastavro import parse_schema

__all__ = [
    "CLASS_DTYPE",
    "EVENT_ID_OFFSET_DTYPE",
    "EVENT_TIME_DTYPE",
    "FLOAT_DTYPE",
    "HEADER",
    "MAGIC_BYTE",
    "NO_CLASS",
    "OUTCOMES",
    "OUTCOME_CODES",
    "OUTCOME_DTYPE",
    "SCHEMA_DIR",
    "SchemaId",
    "WireFormatError",
    "frame",
    "parsed_schema",
    "raw_schema",
    "unframe",
]

SCHEMA_DIR: Final = Path(__file__).resolve().parent
MAGIC_BYTE: Final = 0
HEADER: Final = struct.Struct(">bI")  # magic byte, schema id

# Order is the wire code of an outcome in PredictionBatch.outcome (uint8); append only.
OUTCOMES: Final = ("ok", "error", "timeout", "rejected", "unknown")
OUTCOME_CODES: Final = {name: code for code, name in enumerate(OUTCOMES)}

EVENT_TIME_DTYPE: Final = np.dtype("<i8")
FLOAT_DTYPE: Final = np.dtype("<f8")
OUTCOME_DTYPE: Final = np.dtype("u1")
CLASS_DTYPE: Final = np.dtype("<i4")
EVENT_ID_OFFSET_DTYPE: Final = np.dtype("<i4")
NO_CLASS: Final = -1


class SchemaId(IntEnum):
    """Fixed ids of the schemas in ``registry.json`` (used when no registry is set)."""

    PREDICTION_EVENT = 1
    PREDICTION_BATCH = 2
    RESOURCE_HEARTBEAT = 3
    LABEL_FEEDBACK = 4
    WATERMARK_MARKER = 5
    DRIFT_REFERENCE = 6


class WireFormatError(ValueError):
    """Bytes that are not a Confluent-framed message of ours."""


@cache
def _registry() -> dict[int, str]:
    doc = json.loads((SCHEMA_DIR / "registry.json").read_text())
    return {int(item["id"]): str(item["file"]) for item in doc["schemas"]}


@cache
def raw_schema(schema_id: int) -> dict[str, Any]:
    """The JSON of a fixed-id schema, as written in its ``.avsc`` file."""
    try:
        name = _registry()[schema_id]
    except KeyError:
        raise WireFormatError(f"unknown schema id {schema_id}") from None
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / name).read_text())
    return loaded


@cache
def parsed_schema(schema_id: int) -> Any:
    """The fastavro-parsed form of a fixed-id schema (cached)."""
    return parse_schema(raw_schema(schema_id))


def frame(schema_id: int, body: bytes) -> bytes:
    """Prefix an Avro body with the Confluent header.

    >>> frame(1, b"x")
    b'\\x00\\x00\\x00\\x00\\x01x'
    """
    return HEADER.pack(MAGIC_BYTE, schema_id) + body


def unframe(data: bytes | None) -> tuple[int, memoryview]:
    """Split a framed message into (schema id, body) or raise WireFormatError."""
    if data is None or len(data) < HEADER.size:
        raise WireFormatError("message shorter than the 5-byte Confluent header")
    magic, schema_id = HEADER.unpack_from(data)
    if magic != MAGIC_BYTE:
        raise WireFormatError(f"bad magic byte {magic}")
    return schema_id, memoryview(data)[HEADER.size :]
